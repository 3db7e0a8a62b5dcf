package vdisk

import (
	"context"

	"sync"

	"github.com/vdisk/vdisk/driver"
)

// ConvertOptions tunes Convert.
type ConvertOptions struct {
	// Workers is the number of parallel read/write workers (qemu-img -m);
	// default 8.
	Workers int
	// ChunkSize is the largest single read/write; default 2 MiB.
	ChunkSize int64
	// ZeroDetect is qemu-img's -S: runs of at least this many zero bytes
	// (aligned to it) in data are not written. 0 means the default (4 KiB);
	// a negative value disables sparse handling: everything is written, and
	// the target ends up fully allocated (qemu-img -S 0).
	ZeroDetect int64
	// TargetNotZero says the target does not already read as zeros (an
	// existing target, qemu-img -n): zero runs are written as zeroes
	// instead of skipped.
	TargetNotZero bool
	// Sequential makes writes reach the target in increasing offset order
	// (stream-optimised formats need it); reading and zero detection still
	// run in parallel.
	Sequential bool
	// Progress is called with bytes of virtual size processed.
	Progress Progress
	// Compress writes data clusters compressed through the target top
	// image's driver.CompressedWriter (qemu-img convert -c). It needs a
	// fresh (zeroed) target; writes are issued in offset order.
	Compress bool
	// Above, when > 0, copies only the runs held by the source's layers
	// 0..Above-1: the target is a diff whose backing already provides the
	// content of the source's layers from Above down (an incremental copy,
	// VDCopyEx onto an existing chain). Runs held lower are skipped.
	Above int
}

type convJob struct {
	seq  int64
	off  int64
	n    int64
	data bool // read from source; otherwise a zero run
	// noProgress: the producer already counted these bytes.
	noProgress bool
}

// Convert copies the content of src (the whole chain, flattened) into dst.
// Unallocated and zero runs stay holes on the target: cost grows with the
// allocated data, not the virtual size. dst must be at least as large as src.
func Convert(ctx context.Context, dst, src *Disk, o *ConvertOptions) error {
	if o == nil {
		o = &ConvertOptions{}
	}
	if o.Above > 0 {
		// The target has a backing: zeros must be written, not skipped.
		oc := *o
		oc.TargetNotZero = true
		o = &oc
	}
	workers := o.Workers
	if workers <= 0 {
		workers = 8
	}
	chunk := o.ChunkSize
	if chunk <= 0 {
		chunk = 2 << 20
	}
	zd := o.ZeroDetect
	if zd == 0 {
		zd = 4096
	}
	size := src.Size()
	var cw driver.CompressedWriter
	var unit int64
	if so, ok := dst.Top().Image.(driver.StreamOnly); ok && so.StreamOnly() && !o.Compress {
		oc := *o
		oc.Compress = true
		o = &oc
	}
	if o.Compress {
		var ok bool
		cw, ok = dst.Top().Image.(driver.CompressedWriter)
		if !ok {
			return driver.Errorf(ErrUnsupported, dst.name(), -1, "format %s cannot store compressed clusters", dst.Top().Format.Name)
		}
		if o.TargetNotZero || o.Above > 0 {
			return driver.Errorf(ErrUnsupported, dst.name(), -1, "compressed output needs a new target without a backing file")
		}
		unit = cw.CompressedUnit()
		if unit <= 0 || chunk%unit != 0 && unit < chunk {
			chunk = max(unit, chunk/unit*unit)
		}
		if unit > chunk {
			chunk = unit
		}
		oc := *o
		oc.Sequential = true
		o = &oc
	}
	if dst.Size() < size {
		return driver.Errorf(ErrInvalidOption, dst.name(), -1, "target is smaller (%d bytes) than the source (%d bytes)", dst.Size(), size)
	}
	if err := dst.writable(); err != nil {
		return err
	}

	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	jobs := make(chan convJob, workers)

	var progMu sync.Mutex
	var done int64
	report := func(n int64) {
		if o.Progress == nil {
			return
		}
		progMu.Lock()
		done += n
		o.Progress(done, size)
		progMu.Unlock()
	}
	if o.Progress != nil {
		o.Progress(0, size)
	}

	// Ordering for sequential targets.
	var seqMu sync.Mutex
	seqCond := sync.NewCond(&seqMu)
	var nextSeq int64
	waitTurn := func(seq int64) bool {
		seqMu.Lock()
		defer seqMu.Unlock()
		for nextSeq != seq {
			if ctx.Err() != nil {
				return false
			}
			seqCond.Wait()
		}
		return true
	}
	finishTurn := func() {
		seqMu.Lock()
		nextSeq++
		seqCond.Broadcast()
		seqMu.Unlock()
	}
	context.AfterFunc(ctx, func() {
		seqMu.Lock()
		seqCond.Broadcast()
		seqMu.Unlock()
	})

	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, chunk)
			for j := range jobs {
				if ctx.Err() != nil {
					continue
				}
				var err error
				if cw != nil {
					err = compressJob(ctx, src, cw, unit, j, buf[:j.n], waitTurn)
				} else {
					err = convertJob(ctx, dst, src, j, buf[:j.n], zd, o, waitTurn)
				}
				if err != nil {
					cancel(err)
				}
				if o.Sequential {
					finishTurn()
				}
				if !j.noProgress {
					report(j.n)
				}
			}
		}()
	}

	// Producer: walk the source's status runs.
	var seq int64
	var compressedEnd int64
	err := func() error {
		defer close(jobs)
		off := int64(0)
		for off < size {
			if ctx.Err() != nil {
				return nil
			}
			var e Extent
			var err error
			if zd < 0 {
				e = Extent{Start: off, Length: size - off, Data: true}
			} else {
				e, err = src.Status(off, size-off)
				if err != nil {
					return err
				}
			}
			isData := e.Data
			if o.Above > 0 && e.Depth >= o.Above {
				report(e.Length)
				off += e.Length
				continue
			}
			if !isData && !o.TargetNotZero {
				report(e.Length)
				off += e.Length
				continue
			}
			end := off + e.Length
			if cw != nil {
				// Whole clusters: round the data run out to the unit,
				// never going back over clusters already queued.
				report(e.Length)
				start := max(off/unit*unit, compressedEnd)
				cend := min(size, (end+unit-1)/unit*unit)
				for p := start; p < cend; {
					n := min(chunk-p%chunk, cend-p)
					select {
					case jobs <- convJob{seq: seq, off: p, n: n, data: true, noProgress: true}:
						seq++
					case <-ctx.Done():
						return nil
					}
					p += n
				}
				compressedEnd = max(compressedEnd, cend)
				off = end
				continue
			}
			for off < end {
				n := min(chunk-off%chunk, end-off)
				select {
				case jobs <- convJob{seq: seq, off: off, n: n, data: isData}:
					seq++
				case <-ctx.Done():
					return nil
				}
				off += n
			}
		}
		return nil
	}()
	wg.Wait()
	if err != nil {
		return err
	}
	if cerr := context.Cause(ctx); cerr != nil {
		return cerr
	}
	return nil
}

// compressJob reads whole clusters and hands the non-zero ones to the
// target's compressed writer, in offset order.
func compressJob(ctx context.Context, src *Disk, cw driver.CompressedWriter, unit int64, j convJob, buf []byte, waitTurn func(int64) bool) error {
	if _, err := src.ReadAt(buf, j.off); err != nil {
		return err
	}
	if !waitTurn(j.seq) {
		return ctx.Err()
	}
	for p := int64(0); p < j.n; p += unit {
		q := min(j.n, p+unit)
		if driver.IsZero(buf[p:q]) {
			continue
		}
		if err := cw.WriteCompressed(buf[p:q], j.off+p); err != nil {
			return err
		}
	}
	return nil
}

func convertJob(ctx context.Context, dst, src *Disk, j convJob, buf []byte, zd int64, o *ConvertOptions, waitTurn func(int64) bool) error {
	if !j.data {
		if o.Sequential && !waitTurn(j.seq) {
			return ctx.Err()
		}
		return dst.WriteZeroes(j.off, j.n, true)
	}
	if _, err := src.ReadAt(buf, j.off); err != nil {
		return err
	}
	if o.Sequential && !waitTurn(j.seq) {
		return ctx.Err()
	}
	if zd < 0 {
		_, err := dst.WriteAt(buf, j.off)
		return err
	}
	// Write the non-zero pieces; zero pieces (aligned runs of zd bytes) are
	// skipped on a zeroed target or written as zeroes otherwise.
	var runStart int64 = -1 // start of the pending non-zero run (relative)
	var zeroStart int64 = -1
	flushData := func(end int64) error {
		if runStart < 0 {
			return nil
		}
		_, err := dst.WriteAt(buf[runStart:end], j.off+runStart)
		runStart = -1
		return err
	}
	flushZero := func(end int64) error {
		if zeroStart < 0 {
			return nil
		}
		var err error
		if o.TargetNotZero {
			err = dst.WriteZeroes(j.off+zeroStart, end-zeroStart, true)
		}
		zeroStart = -1
		return err
	}
	for p := int64(0); p < j.n; {
		// piece ends at the next zd-aligned virtual offset
		abs := j.off + p
		q := min(j.n, p+zd-abs%zd)
		if q-p == zd && driver.IsZero(buf[p:q]) {
			if err := flushData(p); err != nil {
				return err
			}
			if zeroStart < 0 {
				zeroStart = p
			}
		} else {
			if err := flushZero(p); err != nil {
				return err
			}
			if runStart < 0 {
				runStart = p
			}
		}
		p = q
	}
	if err := flushData(j.n); err != nil {
		return err
	}
	return flushZero(j.n)
}
