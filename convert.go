package vdisk

import (
	"context"
	"sync"
	"sync/atomic"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/hugebuf"
)

// ConvertOptions tunes Convert.
type ConvertOptions struct {
	// Workers is the number of parallel read/write workers (qemu-img -m);
	// default 8.
	Workers int
	// ChunkSize is the largest single read/write; default 2 MiB (1 MiB
	// with Compress, 256 KiB when the target borrows the read buffers:
	// driver.CompressedLender).
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
	// NoOffload turns copy offload off: every byte is read and written by
	// vdisk, as with qemu-img convert without -C. Offload (see
	// FileExtenter) is otherwise used wherever it applies.
	NoOffload bool
	// Stats, when not nil, receives what the convert did (also when it
	// fails: the counts up to the failure).
	Stats *ConvertStats
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
	c, err := newConverter(dst, src, o)
	if err != nil {
		return err
	}
	return c.run(ctx, o)
}

// run is Convert once the options are settled.
func (c *converter) run(ctx context.Context, o *ConvertOptions) error {
	if c.lender != nil {
		// As many slabs as the free list holds (within
		// hugebuf.MaxArena) come from one mapping: one page fault per
		// 2 MiB instead of one per 4 KiB (3000 faults in a 256 MiB
		// convert -c were 1000 fewer). It is freed once Convert is
		// done and the target has given every lent cluster back.
		c.arena = hugebuf.NewArena(int(c.chunk), cap(c.slabs))
		defer c.arena.Close()
	}
	dst := c.dst
	c.stats.begin(dst)
	if o != nil && o.Stats != nil {
		defer func() { *o.Stats = c.stats.result() }()
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	c.seq.init(ctx)
	if c.o.Progress != nil {
		c.o.Progress(0, c.size)
	}
	jobs := make(chan convJob, c.workers)
	var wg sync.WaitGroup
	for w := 0; w < c.workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.work(ctx, cancel, jobs)
		}()
	}
	err := c.produce(ctx, jobs)
	close(jobs)
	wg.Wait()
	if err != nil {
		return err
	}
	return context.Cause(ctx)
}

// converter is one Convert: its settled options and shared state.
type converter struct {
	dst, src *Disk
	o        *ConvertOptions
	workers  int
	chunk    int64
	zd       int64 // zero detection granule; < 0: none
	size     int64
	cw       driver.CompressedWriter // compressed path, or nil
	lender   driver.CompressedLender // cw, when it takes lent buffers
	slabs    chan *slab              // lent read buffers for reuse
	arena    *hugebuf.Arena          // the first slabs' memory
	unit     int64                   // cw's unit

	progMu sync.Mutex
	done   int64
	seq    turns

	offload   bool        // data jobs try copy offload
	pieces    bool        // data jobs go through offloadJob
	noOffload atomic.Bool // offload was refused: read and write from now on
	seeks     dataRuns    // what SEEK_HOLE told about the source files
	stats     convStats
}

// newConverter settles the options (defaults, the compressed path for
// compressed or stream-only targets) and checks the target.
func newConverter(dst, src *Disk, o *ConvertOptions) (*converter, error) {
	oc := ConvertOptions{}
	if o != nil {
		oc = *o
	}
	if oc.Above > 0 {
		// The target has a backing: zeros must be written, not skipped.
		oc.TargetNotZero = true
	}
	if len(dst.layers) > 0 && vboxEncrypted(dst.layers[0]) {
		// VirtualBox decrypts sectors no image holds into noise: write
		// every sector, zeros encrypted.
		oc.TargetNotZero = true
		oc.ZeroDetect = -1
	}
	c := &converter{dst: dst, src: src, o: &oc, workers: oc.Workers, chunk: oc.ChunkSize, zd: oc.ZeroDetect, size: src.Size()}
	if c.workers <= 0 {
		c.workers = 8
	}
	if c.chunk <= 0 {
		c.chunk = 2 << 20
	}
	if c.zd == 0 {
		c.zd = 4096
	}
	top := dst.Top()
	if so, ok := top.img.(driver.StreamOnly); ok && so.StreamOnly() {
		oc.Compress = true
	}
	if oc.Compress {
		cw, ok := top.img.(driver.CompressedWriter)
		if !ok {
			return nil, driver.Errorf(ErrUnsupported, dst.name(), -1, "format %s cannot store compressed clusters", top.Format.Name)
		}
		if oc.TargetNotZero {
			return nil, driver.Errorf(ErrUnsupported, dst.name(), -1, "compressed output needs a new target without a backing file")
		}
		c.cw, c.unit = cw, cw.CompressedUnit()
		c.lender, _ = cw.(driver.CompressedLender)
		if oc.ChunkSize <= 0 {
			// The target's compressor holds its own clusters in flight:
			// the workers' chunks only read ahead of it, and half the
			// default keeps a convert -c within 64 MiB of memory. A
			// target that borrows the chunks keeps a few of them pinned
			// besides: smaller ones touch less memory (each first touch
			// of a page is a fault) and pin less.
			c.chunk = 1 << 20
			if c.lender != nil {
				c.chunk = 256 << 10
			}
		}
		if c.unit <= 0 || c.chunk%c.unit != 0 && c.unit < c.chunk {
			c.chunk = max(c.unit, c.chunk/c.unit*c.unit)
		}
		c.chunk = max(c.chunk, c.unit)
		oc.Sequential = true
		if c.lender != nil {
			c.slabs = make(chan *slab, c.workers+8)
		}
	}
	if dst.Size() < c.size {
		return nil, driver.Errorf(ErrInvalidOption, dst.name(), -1, "target is smaller (%d bytes) than the source (%d bytes)", dst.Size(), c.size)
	}
	if err := dst.writable(); err != nil {
		return nil, err
	}
	c.setupPieces()
	return c, nil
}

// report adds n bytes to the progress.
func (c *converter) report(n int64) {
	if c.o.Progress == nil {
		return
	}
	c.progMu.Lock()
	c.done += n
	c.o.Progress(c.done, c.size)
	c.progMu.Unlock()
}

// work runs jobs until the channel closes; the first error cancels ctx.
func (c *converter) work(ctx context.Context, cancel context.CancelCauseFunc, jobs <-chan convJob) {
	var buf []byte
	if c.lender == nil { // lent clusters are read into slabs
		var free func()
		buf, free = hugebuf.Alloc(int(c.chunk))
		// Every use of buf is a synchronous call (io.WriterAt keeps
		// nothing) that has returned once the jobs are done.
		defer free()
	}
	for j := range jobs {
		if ctx.Err() != nil {
			continue
		}
		var err error
		switch {
		case c.cw != nil:
			err = c.compressJob(ctx, j, buf)
		case c.pieces && j.data:
			err = c.offloadJob(ctx, j, buf[:j.n])
		default:
			err = convertJob(ctx, c.dst, c.src, j, buf[:j.n], c.zd, c.o, c.seq.wait, &c.stats)
		}
		if err != nil {
			cancel(err)
		}
		if c.o.Sequential {
			c.seq.finish()
		}
		if !j.noProgress {
			c.report(j.n)
		}
	}
}

// produce walks the source's status runs and queues the copy jobs.
func (c *converter) produce(ctx context.Context, jobs chan<- convJob) error {
	var seq, compressedEnd int64
	send := func(j convJob) bool {
		j.seq = seq
		select {
		case jobs <- j:
			seq++
			return true
		case <-ctx.Done():
			return false
		}
	}
	for off := int64(0); off < c.size; {
		if ctx.Err() != nil {
			return nil
		}
		e := Extent{Start: off, Length: c.size - off, State: driver.Data}
		if c.zd >= 0 {
			var err error
			if e, err = c.src.Status(off, c.size-off); err != nil {
				return err
			}
		}
		end := off + e.Length
		switch {
		case c.o.Above > 0 && e.Depth >= c.o.Above:
			c.stats.skipped.Add(e.Length)
			c.report(e.Length)
		case !e.IsData() && !c.o.TargetNotZero:
			c.stats.zero.Add(e.Length)
			c.report(e.Length)
		case c.cw != nil:
			// Whole clusters: round the data run out to the unit, never
			// going back over clusters already queued.
			c.report(e.Length)
			start := max(off/c.unit*c.unit, compressedEnd)
			cend := min(c.size, (end+c.unit-1)/c.unit*c.unit)
			for p := start; p < cend; {
				n := min(c.chunk-p%c.chunk, cend-p)
				if !send(convJob{off: p, n: n, data: true, noProgress: true}) {
					return nil
				}
				p += n
			}
			compressedEnd = max(compressedEnd, cend)
		default:
			for p := off; p < end; {
				n := min(c.chunk-p%c.chunk, end-p)
				if !send(convJob{off: p, n: n, data: e.IsData()}) {
					return nil
				}
				p += n
			}
		}
		off = end
	}
	return nil
}

// turns hands out write turns in sequence order (for targets written
// front to back); a cancelled context releases every waiter.
type turns struct {
	mu   sync.Mutex
	cond *sync.Cond
	next int64
	ctx  context.Context
}

func (t *turns) init(ctx context.Context) {
	t.cond, t.ctx = sync.NewCond(&t.mu), ctx
	context.AfterFunc(ctx, func() {
		t.mu.Lock()
		t.cond.Broadcast()
		t.mu.Unlock()
	})
}

// wait blocks until seq's turn; false when the context ended first.
func (t *turns) wait(seq int64) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	for t.next != seq {
		if t.ctx.Err() != nil {
			return false
		}
		t.cond.Wait()
	}
	return true
}

func (t *turns) finish() {
	t.mu.Lock()
	t.next++
	t.cond.Broadcast()
	t.mu.Unlock()
}

// compressJob reads whole clusters into the worker's buffer and hands the
// non-zero ones to the target's compressed writer, in offset order. A
// target that borrows clusters (driver.CompressedLender) gets them in a
// slab, without a copy: the worker has no buffer then.
func (c *converter) compressJob(ctx context.Context, j convJob, buf []byte) error {
	var s *slab
	if c.lender != nil {
		s = c.getSlab()
		defer s.release()
		buf = s.buf
	}
	buf = buf[:j.n]
	if _, err := c.src.ReadAt(buf, j.off); err != nil {
		return err
	}
	c.stats.read.Add(j.n)
	if !c.seq.wait(j.seq) {
		return ctx.Err()
	}
	for p := int64(0); p < j.n; p += c.unit {
		q := min(j.n, p+c.unit)
		if driver.IsZero(buf[p:q]) {
			c.stats.zero.Add(q - p)
			continue
		}
		var err error
		if s != nil {
			s.refs.Add(1)
			if err = c.lender.WriteCompressedLent(buf[p:q], j.off+p, s.release); err != nil {
				s.refs.Add(-1)
			}
		} else {
			err = c.cw.WriteCompressed(buf[p:q], j.off+p)
		}
		if err != nil {
			return err
		}
		c.stats.written.Add(q - p)
	}
	return nil
}

// slab is a chunk-sized read buffer whose clusters are lent to the target
// (driver.CompressedLender). The reading worker holds one reference and
// each lent cluster one more; the last release puts it back on the free
// list. The pipeline holds consecutive clusters, so besides the workers'
// slabs only a few are pinned by it at a time.
type slab struct {
	buf     []byte
	refs    atomic.Int32
	free    chan *slab
	arena   *hugebuf.Arena // buf's memory, held while refs > 0; nil: the heap's
	release func()
}

// getSlab returns a free slab with the worker's reference taken.
func (c *converter) getSlab() *slab {
	var s *slab
	select {
	case s = <-c.slabs:
	default:
		s = &slab{free: c.slabs}
		if s.buf = c.arena.Piece(); s.buf != nil {
			s.arena = c.arena
		} else {
			s.buf = make([]byte, c.chunk)
		}
		s.release = s.put
	}
	if s.arena != nil {
		s.arena.Acquire()
	}
	s.refs.Store(1)
	return s
}

// put drops one reference; the last returns the slab to the free list
// (or to the garbage collector when the list is full) and ends its use
// of the arena.
func (s *slab) put() {
	if s.refs.Add(-1) != 0 {
		return
	}
	a := s.arena
	select {
	case s.free <- s:
	default:
	}
	if a != nil {
		a.Release()
	}
}

func convertJob(ctx context.Context, dst, src *Disk, j convJob, buf []byte, zd int64, o *ConvertOptions, waitTurn func(int64) bool, st *convStats) error {
	if !j.data {
		if o.Sequential && !waitTurn(j.seq) {
			return ctx.Err()
		}
		st.zero.Add(j.n)
		return dst.WriteZeroes(j.off, j.n, true)
	}
	if _, err := src.ReadAt(buf, j.off); err != nil {
		return err
	}
	st.read.Add(j.n)
	if o.Sequential && !waitTurn(j.seq) {
		return ctx.Err()
	}
	if zd < 0 {
		n, err := dst.WriteAt(buf, j.off)
		st.written.Add(int64(n))
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
		n, err := dst.WriteAt(buf[runStart:end], j.off+runStart)
		st.written.Add(int64(n))
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
		st.zero.Add(end - zeroStart)
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
