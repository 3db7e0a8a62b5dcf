package vdisk

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/vdisk/vdisk/driver"
)

// Live jobs: commit, merge, stream, rebase and external snapshots on an
// open Disk, while other goroutines read and write it. The Disk's content
// is the same to every reader at every moment of a job:
//   - data is only ever written into a layer where a layer above it holds
//     the range (so no reader sees the change) or where the layer itself
//     is unallocated and the data equals what shows through it;
//   - each chunk is copied under a write range lock, so no request to the
//     same range runs meanwhile;
//   - writes to the top during a job that copies the top are tracked and
//     copied again; the last of them, and every change to the chain's
//     shape (dropping layers, rewriting parent references, emptying), run
//     under the Disk's exclusive lock, with no request in flight.
// An interrupted job (error, cancellation, crash) leaves a chain with the
// same content: references are rewritten only after the copied data is
// durable. A job's Progress callback may run under the disk's locks: it
// must return quickly and must not call the disk.

// jobChunk is the unit a job copies under one range lock.
const jobChunk = 1 << 20

// beginJob marks the disk busy with job name.
func (d *Disk) beginJob(name string) error {
	d.jobMu.Lock()
	defer d.jobMu.Unlock()
	if d.job != "" {
		return driver.Errorf(ErrBusy, d.Name(), -1, "a %s job is already running on the disk", d.job)
	}
	d.job = name
	return nil
}

func (d *Disk) endJob() {
	d.jobMu.Lock()
	d.job = ""
	d.jobMu.Unlock()
}

// Job is the name of the live job running on the disk, "" when none.
func (d *Disk) Job() string {
	d.jobMu.Lock()
	defer d.jobMu.Unlock()
	return d.job
}

func (d *Disk) busy() error {
	if j := d.Job(); j != "" {
		return driver.Errorf(ErrBusy, d.name(), -1, "a %s job is running on the disk", j)
	}
	return nil
}

// Name is the top image's name.
func (d *Disk) Name() string {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.layers[0].Name
}

// reopen gives layer depth read-write (or read-only) access, reopening its
// image. The caller holds d.mu exclusively.
func (d *Disk) reopen(ctx context.Context, depth int, writable bool) error {
	l := d.layers[depth]
	if l.ReadOnly != writable {
		return nil
	}
	if _, snap := l.img.(*snapshotImage); snap {
		return driver.Errorf(ErrReadOnly, l.Name, -1, "an internal snapshot view cannot be written")
	}
	if !l.ReadOnly {
		if err := l.img.Flush(); err != nil {
			return driver.WithFile(err, "flush", l.Name)
		}
	}
	if err := l.img.Close(); err != nil {
		return driver.WithFile(err, "close", l.Name)
	}
	fl := l.fl
	fl.writable = writable
	nl, err := openLayer(ctx, l.Storage, d.log, l.path, l.Format.Name, l.kvs, fl)
	if err != nil {
		// Get the layer back as it was; without it the disk cannot read.
		back := l.fl
		back.writable = !writable
		if ol, err2 := openLayer(context.Background(), l.Storage, d.log, l.path, l.Format.Name, l.kvs, back); err2 == nil {
			l.img = ol.img
		} else {
			d.closed = true
			d.log.Error("a layer could not be reopened; the disk is closed", "image", l.Name, "error", err2)
		}
		return err
	}
	l.img, l.fl, l.ReadOnly = nl.img, nl.fl, !writable
	return nil
}

// exclusive runs fn with the disk's exclusive lock held (no request in
// flight), refusing a closed disk.
func (d *Disk) exclusive(fn func() error) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return d.check(0, 0)
	}
	err := fn()
	d.reshape()
	return err
}

// shared runs fn with the disk's shared lock, refusing a closed disk.
func (d *Disk) shared(fn func() error) error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.closed {
		return d.check(0, 0)
	}
	return fn()
}

// progressTotal adapts a job's growing amount of work to a Progress.
type progressTotal struct {
	p           Progress
	done, total int64
	// rate limits the first pass of a job to this many bytes of the disk
	// per second (0: no limit), as qemu's job speed does.
	rate  int64
	start time.Time
	paced int64 // bytes the limit has accounted for
}

// pace sleeps as long as the job is ahead of its rate after n more bytes.
// It is called with no lock held.
func (t *progressTotal) pace(ctx context.Context, n int64) error {
	if t.rate <= 0 {
		return nil
	}
	if t.start.IsZero() {
		t.start = time.Now()
	}
	t.paced += n
	due := t.start.Add(time.Duration(float64(t.paced) / float64(t.rate) * float64(time.Second)))
	wait := time.Until(due)
	if wait <= 0 {
		return nil
	}
	tm := time.NewTimer(wait)
	defer tm.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-tm.C:
		return nil
	}
}

func (t *progressTotal) add(n int64) {
	t.total += n
	t.report()
}

func (t *progressTotal) step(n int64) {
	t.done += n
	t.report()
}

func (t *progressTotal) report() {
	if t.p != nil {
		t.p(min(t.done, t.total), t.total)
	}
}

// copyDown copies into layer dst, over [off, end), every run that layers
// from..dst-1 hold, chunk by chunk, each under a write range lock.
func (d *Disk) copyDown(ctx context.Context, dst, from int, off, end int64, pr *progressTotal) error {
	for off < end {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(jobChunk-off%jobChunk, end-off)
		err := d.shared(func() error {
			size := d.layers[from].img.Size()
			if off >= size {
				return nil
			}
			h := &held{r: d.lockRange(off, n, true)}
			defer d.locks.Unlock(h.r)
			return d.copyRunsRange(ctx, dst, from, dst, off, min(off+n, size), h)
		})
		if err != nil {
			return err
		}
		pr.step(n)
		off += n
		if err := pr.pace(ctx, n); err != nil {
			return err
		}
	}
	return nil
}

// copyBufs are copyRunsRange's buffers: a job calls it for every chunk.
var copyBufs = sync.Pool{New: func() any { b := make([]byte, copyPiece); return &b }}

// copyPiece is the largest piece copyRunsRange reads and writes at once.
const copyPiece = 2 << 20

// copyRunsRange copies into layer dst every run of [off, end) that the
// sub-chain [from, to) holds (zero runs as zeroes, so they shadow what lies
// below). Callers hold d.mu and a write lock over the range (r may be nil
// under the exclusive lock).
func (d *Disk) copyRunsRange(ctx context.Context, dst, from, to int, off, end int64, h *held) error {
	var buf []byte
	for off < end {
		if err := ctx.Err(); err != nil {
			return err
		}
		e, err := d.statusFrom(from, off, end-off)
		if err != nil {
			return err
		}
		if !e.Present() || e.Depth >= to {
			off += e.Length
			continue
		}
		runEnd := off + e.Length
		for off < runEnd {
			n := min(copyPiece, runEnd-off)
			if !e.IsData() {
				if err := d.zeroLayer(dst, off, n, false, h); err != nil {
					return err
				}
				off += n
				continue
			}
			if buf == nil {
				bp := copyBufs.Get().(*[]byte)
				defer copyBufs.Put(bp)
				buf = *bp
			}
			p := buf[:n]
			n = int64(len(p))
			if err := d.readFrom(from, p, off); err != nil {
				return err
			}
			if driver.IsZero(p) {
				err = d.zeroLayer(dst, off, n, false, h)
			} else {
				err = d.writeLayer(dst, p, off, h)
			}
			if err != nil {
				return err
			}
			off += n
		}
	}
	return nil
}

// copyTracked copies layers from..dst-1 into dst over the whole disk and
// then, while the top is being written, the ranges written meanwhile, in
// passes, until few are left; the rest is copied by finish under the
// exclusive lock. Without tracking (from > 0: those layers do not change)
// one pass is all.
func (d *Disk) copyTracked(ctx context.Context, dst, from int, size int64, pr *progressTotal, finish func() error) error {
	var t *dirtyMap
	if from == 0 {
		t = newDirtyMap(size, max(d.gran, 64<<10))
		d.addTracker(t)
		defer d.removeTracker(t)
	}
	pr.add(size)
	if err := d.copyDown(ctx, dst, from, 0, size, pr); err != nil {
		return err
	}
	const settle = 16 << 20 // dirty bytes left for the exclusive pass
	for pass := 0; t != nil && pass < 8 && t.count() > settle; pass++ {
		runs := t.take()
		for _, rg := range runs {
			pr.add(rg[1] - rg[0])
			if err := d.copyDown(ctx, dst, from, rg[0], min(rg[1], size), pr); err != nil {
				return err
			}
		}
	}
	return d.exclusive(func() error {
		if t != nil {
			for _, rg := range t.take() {
				end := min(rg[1], d.layers[from].img.Size())
				if rg[0] >= end {
					continue
				}
				pr.add(end - rg[0])
				if err := d.copyRunsRange(ctx, dst, from, dst, rg[0], end, nil); err != nil {
					return err
				}
				pr.step(end - rg[0])
			}
		}
		l := d.layers[dst]
		if err := l.img.Flush(); err != nil {
			return driver.WithFile(err, "flush", l.Name)
		}
		return finish()
	})
}

// prepareTarget gives layer dst write access and grows it to size when it
// is smaller (the grown range reading zeros). The caller holds d.mu
// exclusively.
func (d *Disk) prepareTarget(ctx context.Context, dst int, size int64) error {
	if err := d.reopen(ctx, dst, true); err != nil {
		return err
	}
	l := d.layers[dst]
	old := l.img.Size()
	if old >= size {
		return nil
	}
	r, ok := l.img.(driver.Resizer)
	if !ok {
		return driver.Errorf(ErrUnsupported, l.Name, -1, "the target is smaller than the images above it and format %s cannot grow", l.Format.Name)
	}
	if err := r.Resize(ctx, size, "off"); err != nil {
		return driver.WithFile(err, "resize", l.Name)
	}
	return d.shadowGrowth(dst, old)
}

// settle ends a job: the layers it wrote go back to read-only, also when
// the job's context was cancelled.
func (d *Disk) settle(ctx context.Context) {
	ctx = context.WithoutCancel(ctx)
	d.exclusive(func() error { d.settleReadOnly(ctx); return nil })
}

// settleReadOnly gives every layer but the top read-only access again
// after a job (best effort: a failure only keeps a write lock longer).
func (d *Disk) settleReadOnly(ctx context.Context) {
	for i := 1; i < len(d.layers); i++ {
		if !d.layers[i].ReadOnly {
			if err := d.reopen(ctx, i, false); err != nil {
				d.log.Warn("could not reopen a layer read-only after a job", "image", d.layers[i].Name, "error", err)
			}
		}
	}
}

// dropLayers closes layers [from, to) and removes them from the chain,
// returning their names.
func (d *Disk) dropLayers(from, to int) []string {
	var names []string
	for _, l := range d.layers[from:to] {
		names = append(names, l.Name)
		if !l.ReadOnly {
			if err := l.img.Flush(); err != nil {
				d.log.Warn("flush of a layer leaving the chain failed", "image", l.Name, "error", err)
			}
		}
		if err := l.closeImage(); err != nil {
			d.log.Warn("close of a layer leaving the chain failed", "image", l.Name, "error", err)
		}
	}
	d.layers = append(d.layers[:from:from], d.layers[to:]...)
	return names
}

// CommitOptions configures a commit (qemu-img commit, qemu's block-commit).
type CommitOptions struct {
	// Base is the index of the layer committed into (1, the direct
	// backing file, when 0).
	Base int
	// Keep leaves the top's data and the chain as they are (qemu-img
	// commit -d; implied by a Base other than 1 in the CLI).
	Keep bool
	// Rate limits the copy to this many bytes of the disk per second
	// (qemu-img commit -r, the speed of qemu's block-commit); 0: no limit.
	// Writes the disk takes meanwhile are copied after it, unlimited.
	Rate int64
	// Progress reports bytes copied out of bytes to copy.
	Progress Progress
	// Open configures how the file-name function Commit opens the chain;
	// Disk.Commit ignores it.
	Open *OpenOptions
}

// Commit writes the content of the layers above Base into Base while the
// disk stays in use. Unless Keep, the layers between the top and Base
// then leave the chain, the top is reparented onto Base and emptied (where
// its format can be; otherwise it keeps data equal to Base's), so the
// chain reads the same with the committed data one level down.
func (d *Disk) Commit(ctx context.Context, o *CommitOptions) error {
	if o == nil {
		o = &CommitOptions{}
	}
	base := max(o.Base, 1)
	if err := d.beginJob("commit"); err != nil {
		return err
	}
	defer d.endJob()
	var size int64
	err := d.exclusive(func() error {
		if err := d.writable(); err != nil {
			return err
		}
		if base >= len(d.layers) {
			return driver.OptionErrorf("commit %s: the image has no backing file at depth %d", d.name(), base)
		}
		size = d.layers[0].img.Size()
		if err := d.prepareTarget(ctx, base, size); err != nil {
			return err
		}
		if o.Keep && base > 1 {
			return d.reopen(ctx, base-1, true) // its parent modification UUID changes
		}
		return nil
	})
	if err != nil {
		return err
	}
	defer d.settle(ctx)
	pr := &progressTotal{p: o.Progress, rate: o.Rate}
	return d.copyTracked(ctx, base, 0, size, pr, func() error {
		target := d.layers[base]
		if o.Keep {
			return refreshParentMod(d.layers[base-1], target)
		}
		top := d.layers[0]
		if base == 1 {
			if err := refreshParentMod(top, target); err != nil {
				return err
			}
		} else {
			if err := reparent(top, parentRefFor(top, target)); err != nil {
				return err
			}
			d.dropLayers(1, base)
		}
		if em, ok := top.img.(driver.Emptier); ok {
			if err := em.MakeEmpty(); err != nil {
				return driver.WithFile(err, "empty", top.Name)
			}
			return driver.WithFile(top.img.Flush(), "flush", top.Name)
		}
		d.log.Info("the image format cannot be emptied; its data stays (it equals the backing file's now)", "image", top.Name)
		return nil
	})
}

// MergeOptions configures Merge.
type MergeOptions struct {
	// Progress reports bytes copied out of bytes to copy.
	Progress Progress
	stream   bool  // run for Stream (the job's name)
	rate     int64 // Stream's Rate
	// Open configures how the file-name function Merge opens the chain;
	// Disk.Merge ignores it.
	Open *OpenOptions
}

// Merge merges layers from..to (inclusive, top-first indices, 0 = top)
// into one, as VirtualBox's VDMerge does, while the disk stays in use.
//
// Forward (from < to): the content of layers from..to-1 is written into
// layer to, and those layers leave the chain: the layer above from is
// reparented onto to (when from is the top, to becomes the top: qemu's
// active commit). Backward (from > to): the content of layers to+1..from
// is copied into the unallocated parts of layer to, which is then
// reparented onto the layer below from (or made standalone when from is
// the base).
//
// Images that leave the chain are closed, not deleted; Merge returns their
// names.
func (d *Disk) Merge(ctx context.Context, from, to int, o *MergeOptions) ([]string, error) {
	if o == nil {
		o = &MergeOptions{}
	}
	if from == to {
		return nil, nil
	}
	if from < 0 || to < 0 {
		return nil, driver.OptionErrorf("merge %s: negative layer index", d.Name())
	}
	job := "merge"
	if o.stream {
		job = "stream"
	}
	if err := d.beginJob(job); err != nil {
		return nil, err
	}
	defer d.endJob()
	defer d.settle(ctx)
	if from < to {
		return d.mergeForward(ctx, from, to, o.Progress)
	}
	return d.mergeBackward(ctx, from, to, o.Progress, o.rate)
}

// checkIndices validates layer indices and that layer relink (when >= 0)
// can have its parent reference rewritten.
func (d *Disk) checkIndices(from, to, relink int) error {
	if err := d.writable(); err != nil {
		return err
	}
	if n := len(d.layers); from >= n || to >= n {
		return driver.OptionErrorf("merge %s: the chain has %d layers (0..%d), asked for %d..%d", d.name(), n, n-1, from, to)
	}
	if relink >= 0 && !canReparent(d.layers[relink]) {
		l := d.layers[relink]
		return driver.Errorf(ErrUnsupported, l.Name, -1, "format %s cannot change its parent reference", l.Format.Name)
	}
	return nil
}

func (d *Disk) mergeForward(ctx context.Context, from, to int, progress Progress) ([]string, error) {
	var size int64
	err := d.exclusive(func() error {
		relink := from - 1
		if err := d.checkIndices(from, to, relink); err != nil {
			return err
		}
		size = d.layers[from].img.Size()
		if err := d.prepareTarget(ctx, to, size); err != nil {
			return err
		}
		if relink > 0 {
			return d.reopen(ctx, relink, true)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	var dropped []string
	pr := &progressTotal{p: progress}
	err = d.copyTracked(ctx, to, from, min(size, d.Layers()[to].img.Size()), pr, func() error {
		target := d.layers[to]
		if from > 0 {
			if err := reparent(d.layers[from-1], parentRefFor(d.layers[from-1], target)); err != nil {
				return err
			}
		}
		dropped = d.dropLayers(from, to)
		return nil
	})
	return dropped, err
}

func (d *Disk) mergeBackward(ctx context.Context, from, to int, progress Progress, rate int64) ([]string, error) {
	var size int64
	err := d.exclusive(func() error {
		if err := d.checkIndices(from, to, to); err != nil {
			return err
		}
		size = d.layers[to].img.Size()
		if err := d.reopen(ctx, to, true); err != nil {
			return err
		}
		if to > 0 {
			return d.reopen(ctx, to-1, true) // its parent modification UUID changes
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	pr := &progressTotal{p: progress, rate: rate}
	pr.add(size)
	var t *dirtyMap
	if to == 0 {
		// A discard into the top after its chunk was filled makes the
		// range fall through again: such ranges are filled once more
		// before the layers below leave.
		t = newDirtyMap(size, max(d.gran, 64<<10))
		d.addTracker(t)
		defer d.removeTracker(t)
	}
	if err := d.fillUnallocated(ctx, to, from+1, size, pr); err != nil {
		return nil, err
	}
	var dropped []string
	err = d.exclusive(func() error {
		if t != nil {
			for _, rg := range t.take() {
				if err := d.fillUnallocatedRange(ctx, to, from+1, rg[0], min(rg[1], d.layers[to].img.Size()), nil); err != nil {
					return err
				}
			}
		}
		target := d.layers[to]
		if err := target.img.Flush(); err != nil {
			return driver.WithFile(err, "flush", target.Name)
		}
		var ref *driver.ParentRef
		if from+1 < len(d.layers) {
			ref = parentRefFor(target, d.layers[from+1])
		}
		if err := reparent(target, ref); err != nil {
			return err
		}
		if to > 0 {
			if err := refreshParentMod(d.layers[to-1], target); err != nil {
				return err
			}
		}
		dropped = d.dropLayers(to+1, from+1)
		return nil
	})
	return dropped, err
}

// fillUnallocated writes into layer at, where it is unallocated, what
// layers at+1..below-1 hold there, chunk by chunk under write range locks
// (so a concurrent write to the top, when at is the top, either lands
// before a chunk is examined or after it is filled).
func (d *Disk) fillUnallocated(ctx context.Context, at, below int, size int64, pr *progressTotal) error {
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(jobChunk-off%jobChunk, size-off)
		err := d.shared(func() error {
			h := &held{r: d.lockRange(off, n, true)}
			defer d.locks.Unlock(h.r)
			return d.fillUnallocatedRange(ctx, at, below, off, min(off+n, d.layers[at].img.Size()), h)
		})
		if err != nil {
			return err
		}
		pr.step(n)
		off += n
		if err := pr.pace(ctx, n); err != nil {
			return err
		}
	}
	return nil
}

// fillUnallocatedRange is fillUnallocated over [off, end) under a lock the
// caller holds (r nil: the exclusive lock).
func (d *Disk) fillUnallocatedRange(ctx context.Context, at, below int, off, end int64, h *held) error {
	for pos := off; pos < end; {
		e, err := d.checkedStatus(at, pos, end-pos)
		if err != nil {
			return err
		}
		if e.State == driver.Unallocated {
			if err := d.copyRunsRange(ctx, at, at+1, below, pos, pos+e.Length, h); err != nil {
				return err
			}
		}
		pos += e.Length
	}
	return nil
}

// StreamOptions configures Stream.
type StreamOptions struct {
	// Base is the index of the layer that stays below the top; 0 pulls
	// the whole chain in and makes the top standalone.
	Base int
	// Rate limits the copy to this many bytes of the disk per second (the
	// speed of qemu's block-stream); 0: no limit.
	Rate int64
	// Progress reports bytes examined out of the disk's size.
	Progress Progress
	// Open configures how the file-name function Stream opens the chain;
	// Disk.Stream ignores it.
	Open *OpenOptions
}

// Stream copies into the top, where it holds nothing, the content of the
// layers above Base, and then makes Base the top's parent (qemu's
// block-stream): a backward merge into the top, while the disk stays in
// use. It returns the names of the layers that left the chain.
func (d *Disk) Stream(ctx context.Context, o *StreamOptions) ([]string, error) {
	if o == nil {
		o = &StreamOptions{}
	}
	n := len(d.Layers())
	from := n - 1
	if o.Base > 0 {
		if o.Base >= n {
			return nil, driver.OptionErrorf("stream %s: the chain has no layer %d", d.Name(), o.Base)
		}
		from = o.Base - 1
	}
	if from == 0 {
		return nil, nil
	}
	return d.Merge(ctx, from, 0, &MergeOptions{Progress: o.Progress, stream: true, rate: o.Rate})
}

// SnapshotOptions configures an external snapshot.
type SnapshotOptions struct {
	// Format of the new top; "" takes the current top's format.
	Format string
	// Options are the new image's create options.
	Options []driver.KV
	// Overwrite replaces an existing file of that name.
	Overwrite bool
}

// Snapshot puts a new, empty differencing image name on top of the chain
// while the disk stays in use (qemu's blockdev-snapshot-sync): the old top
// is flushed and becomes read-only, and every later write goes to the new
// image. The name is resolved like any file name of the top's storage.
func (d *Disk) Snapshot(ctx context.Context, name string, o *SnapshotOptions) error {
	if o == nil {
		o = &SnapshotOptions{}
	}
	if err := d.beginJob("snapshot"); err != nil {
		return err
	}
	defer d.endJob()
	return d.exclusive(func() error {
		if err := d.writable(); err != nil {
			return err
		}
		old := d.layers[0]
		if err := old.img.Flush(); err != nil {
			return driver.WithFile(err, "flush", old.Name)
		}
		format := o.Format
		if format == "" {
			format = old.Format.Name
		}
		// The old top's UUIDs as the new image records them: written by
		// the flush above.
		l, err := createLayer(ctx, old.Storage, d.log, name, format, o.Options, d.size, o.Overwrite, parentRefFor(&Layer{Name: name}, old), parentInfo(old), old.fl.secrets)
		if err != nil {
			return err
		}
		if err := vboxInherit(l, old.fl.vbox); err != nil {
			l.img.Close()
			old.Storage.Remove(name)
			return err
		}
		l.fl.paths = old.fl.paths
		d.layers = append([]*Layer{l}, d.layers...)
		if err := d.reopen(ctx, 1, false); err != nil {
			d.layers = d.layers[1:]
			l.img.Close()
			old.Storage.Remove(name)
			return err
		}
		return nil
	})
}

func parentInfo(l *Layer) *driver.ParentInfo {
	pi := &driver.ParentInfo{Format: l.Format.Name, Size: l.img.Size(), Path: l.Name}
	if id, ok := l.img.(driver.Identifier); ok {
		pi.UUID, pi.ModUUID = id.UUID(), id.ModificationUUID()
	}
	return pi
}

// RebaseOptions configures Rebase.
type RebaseOptions struct {
	// Format of the new backing image; "" probes it (never guessing raw).
	Format string
	// Unsafe only rewrites the reference (qemu-img rebase -u): nothing is
	// copied, and the new backing file need not exist when Format is given.
	Unsafe bool
	// Progress reports bytes examined out of the disk's size.
	Progress Progress
	// Open configures how the file-name function Rebase opens the chain;
	// Disk.Rebase ignores it.
	Open *OpenOptions
}

// Rebase changes the top's backing file to backing ("" makes it
// standalone). In safe mode every range the top does not hold itself and
// where the old and new backing chains differ is first copied into the
// top, so the disk reads the same; the new chain then replaces the old
// one under the disk. Unsafe only rewrites the reference.
func (d *Disk) Rebase(ctx context.Context, backing string, o *RebaseOptions) error {
	if o == nil {
		o = &RebaseOptions{}
	}
	if err := d.beginJob("rebase"); err != nil {
		return err
	}
	defer d.endJob()
	top := d.Top()
	if err := d.shared(d.writable); err != nil {
		return err
	}
	if !canReparent(top) {
		return driver.Errorf(ErrUnsupported, top.Name, -1, "format %s cannot change its parent reference", top.Format.Name)
	}
	unsafe := top.fl.paths == driver.PathTrusted
	var nb *Disk
	var ref *driver.ParentRef
	if backing != "" {
		bpath, err := resolveParent(top.Name, backing, unsafe || filepath.IsAbs(backing))
		if err != nil {
			return err
		}
		nb, err = openParentDisk(ctx, bpath, o.Format, top.Storage, d.log, unsafe)
		switch {
		case err == nil:
			ref = &driver.ParentRef{Name: backing, Format: nb.layers[0].Format.Name}
			if id, ok := nb.layers[0].img.(driver.Identifier); ok {
				ref.UUID, ref.ModUUID = id.UUID(), id.ModificationUUID()
			}
		case o.Unsafe && o.Format != "" && errors.Is(err, ErrNotFound) && knownFormat(o.Format):
			// Like qemu-img rebase -u -F: the reference is only rewritten,
			// so the new backing file need not exist (yet).
			d.log.Warn("the new backing file does not exist; recording the reference anyway", "image", top.Name, "backing", backing, "error", err)
			ref = &driver.ParentRef{Name: backing, Format: o.Format}
		default:
			return err
		}
	}
	adopted := false
	defer func() {
		if nb != nil && !adopted {
			nb.Close()
		}
	}()
	var t *dirtyMap
	if !o.Unsafe {
		// A discard into the top after its range was examined makes the
		// range fall through again: it is examined once more before the
		// backing chain changes.
		t = newDirtyMap(d.Size(), max(d.gran, 64<<10))
		d.addTracker(t)
		defer d.removeTracker(t)
		pr := &progressTotal{p: o.Progress}
		if err := d.rebaseCopy(ctx, nb, pr); err != nil {
			return err
		}
	}
	return d.exclusive(func() error {
		if t != nil {
			buf := newRebaseBufs(d.gran)
			for _, rg := range t.take() {
				if err := d.rebaseRange(nb, buf, rg[0], min(rg[1], d.layers[0].img.Size()), nil); err != nil {
					return err
				}
			}
		}
		if err := reparent(d.layers[0], ref); err != nil {
			return err
		}
		if o.Unsafe && nb == nil && len(d.layers) == 1 {
			return nil
		}
		// The disk now follows the new reference.
		d.dropLayers(1, len(d.layers))
		if nb != nil {
			d.layers = append(d.layers, nb.layers...)
			adopted = true
		}
		return nil
	})
}

// rebaseCopy copies into the top, where it is unallocated, the old
// backing content wherever it differs from the new backing's (nil: zeros).
func (d *Disk) rebaseCopy(ctx context.Context, nb *Disk, pr *progressTotal) error {
	size := d.Size()
	pr.add(size)
	buf := newRebaseBufs(d.gran)
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(jobChunk-off%jobChunk, size-off)
		err := d.shared(func() error {
			h := &held{r: d.lockRange(off, n, true)}
			defer d.locks.Unlock(h.r)
			return d.rebaseRange(nb, buf, off, off+n, h)
		})
		if err != nil {
			return err
		}
		pr.step(n)
		off += n
	}
	return d.shared(func() error {
		top := d.layers[0]
		return driver.WithFile(top.img.Flush(), "flush", top.Name)
	})
}

// rebaseBufs are rebaseRange's buffers and comparison granule.
type rebaseBufs struct {
	old, new []byte
	g        int64
}

func newRebaseBufs(gran int64) *rebaseBufs {
	return &rebaseBufs{old: make([]byte, jobChunk), new: make([]byte, jobChunk), g: max(gran, 4096)}
}

// rebaseRange does rebaseCopy's work over [off, end) (at most jobChunk
// long at a time) under a lock the caller holds (r nil: the exclusive
// lock).
func (d *Disk) rebaseRange(nb *Disk, b *rebaseBufs, off, end int64, h *held) error {
	for pos := off; pos < end; {
		e, err := d.checkedStatus(0, pos, min(end-pos, jobChunk))
		if err != nil {
			return err
		}
		runEnd := pos + e.Length
		if e.State != driver.Unallocated {
			pos = runEnd
			continue
		}
		op, np := b.old[:e.Length], b.new[:e.Length]
		if err := d.readLayerView(1, op, pos); err != nil {
			return err
		}
		if err := readPadded(nb, np, pos); err != nil {
			return err
		}
		// Whole granules, so a differing piece is written once.
		for i := int64(0); i < e.Length; {
			j := min(e.Length, i+b.g-(pos+i)%b.g)
			if !bytes.Equal(op[i:j], np[i:j]) {
				if err := d.writeLayer(0, op[i:j], pos+i, h); err != nil {
					return err
				}
			}
			i = j
		}
		pos = runEnd
	}
	return nil
}

// parentRefFor builds the reference that child should record for parent:
// the parent's name relative to the child's directory when possible.
func parentRefFor(child, parent *Layer) *driver.ParentRef {
	name := parent.Name
	if rel, err := filepath.Rel(filepath.Dir(child.Name), parent.Name); err == nil {
		name = rel
	}
	ref := &driver.ParentRef{Name: name, Format: parent.Format.Name}
	if id, ok := parent.img.(driver.Identifier); ok {
		ref.UUID, ref.ModUUID = id.UUID(), id.ModificationUUID()
	}
	return ref
}

func canReparent(l *Layer) bool {
	_, ok := l.img.(driver.Reparenter)
	return ok
}

func reparent(l *Layer, ref *driver.ParentRef) error {
	rp, ok := l.img.(driver.Reparenter)
	if !ok {
		return driver.Errorf(ErrUnsupported, l.Name, -1, "format %s cannot change its parent reference", l.Format.Name)
	}
	if err := rp.SetParent(ref); err != nil {
		return driver.WithFile(err, "set parent", l.Name)
	}
	return driver.WithFile(l.img.Flush(), "flush", l.Name)
}

// refreshParentMod records target's modification UUID in child, the image
// right above it, where both record UUIDs: writing into target changed it
// (VDMerge does the same), and a stale one makes every open warn.
func refreshParentMod(child, target *Layer) error {
	cid, ok := child.img.(driver.Identifier)
	tid, ok2 := target.img.(driver.Identifier)
	if !ok || !ok2 {
		return nil
	}
	m, old := tid.ModificationUUID(), cid.ParentModificationUUID()
	if m == "" || old == "" || strings.EqualFold(m, old) {
		return nil
	}
	if err := cid.SetParentModificationUUID(m); err != nil {
		return driver.WithFile(err, "set parent modification UUID", child.Name)
	}
	return driver.WithFile(child.img.Flush(), "flush", child.Name)
}

func knownFormat(name string) bool {
	_, err := driver.Lookup(name)
	return err == nil
}

// readPadded reads from d (nil: nothing) with zeros past its end.
func readPadded(d *Disk, p []byte, off int64) error {
	clear(p)
	if d == nil || off >= d.size {
		return nil
	}
	n := min(int64(len(p)), d.size-off)
	return d.readFrom(0, p[:n], off)
}
