package cache

import (
	"context"
	"hash/crc32"
	"io"
	"math"
	"sync"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/rangelock"
)

// File is a source file read through a block cache. Wrap returns it
// (inside a value that also has the source's HoleSeeker and Versioned
// methods when the source has them); As finds it again.
type File struct {
	e         *engine
	closeOnce sync.Once
	closeErr  error
}

// Cached is what every file Wrap returns implements besides driver.File.
type Cached interface {
	driver.File
	Prefetch(ctx context.Context, progress func(done, total int64)) error
	Stats() Stats
	Source() driver.File
}

var _ Cached = (*File)(nil)

// Wrap puts a block cache in front of src. The cache is the VCI file
// cacheName in st, created when missing and discarded (with a warning to
// o.Logger) when it is corrupt or was filled from another source; with
// cacheName "" the cache lives in memory only. Closing the returned file
// closes src.
func Wrap(src driver.File, st driver.Storage, cacheName string, o Options) (driver.File, error) {
	return wrap(src, st, cacheName, o, nil)
}

func wrap(src driver.File, st driver.Storage, cacheName string, o Options, onClose func()) (driver.File, error) {
	e, err := newEngine(src, st, cacheName, o)
	if err != nil {
		return nil, err
	}
	e.onClose = onClose
	f := &File{e: e}
	_, hs := src.(driver.HoleSeeker)
	_, vs := src.(driver.Versioned)
	switch {
	case hs && vs:
		return fileHSV{f}, nil
	case hs:
		return fileHS{f}, nil
	case vs:
		return fileV{f}, nil
	}
	return f, nil
}

// As returns the cache behind a file Wrap returned.
func As(f driver.File) (*File, bool) {
	switch c := f.(type) {
	case *File:
		return c, true
	case fileHS:
		return c.File, true
	case fileV:
		return c.File, true
	case fileHSV:
		return c.File, true
	}
	return nil, false
}

// The source's optional interfaces, passed through.
type (
	fileHS  struct{ *File }
	fileV   struct{ *File }
	fileHSV struct{ *File }
)

func (f fileHS) SeekData(off int64) (int64, error)  { return f.e.src.(driver.HoleSeeker).SeekData(off) }
func (f fileHS) SeekHole(off int64) (int64, error)  { return f.e.src.(driver.HoleSeeker).SeekHole(off) }
func (f fileV) Version() string                     { return f.e.src.(driver.Versioned).Version() }
func (f fileHSV) SeekData(off int64) (int64, error) { return f.e.src.(driver.HoleSeeker).SeekData(off) }
func (f fileHSV) SeekHole(off int64) (int64, error) { return f.e.src.(driver.HoleSeeker).SeekHole(off) }
func (f fileHSV) Version() string                   { return f.e.src.(driver.Versioned).Version() }

// Source returns the file the cache reads from.
func (f *File) Source() driver.File { return f.e.src }

// Name is the source's name.
func (f *File) Name() string { return f.e.src.Name() }

// Size is the source's size (as of open, then as changed through f).
func (f *File) Size() (int64, error) {
	e := f.e
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return 0, driver.Errorf(driver.ErrClosed, f.Name(), -1, "cached file is closed")
	}
	return e.size, nil
}

// blockRange returns the blocks [b0, b1] that [off, off+n) touches.
func (e *engine) blockRange(off, n int64) (int64, int64) {
	return off / e.l.bs, (off + n - 1) / e.l.bs
}

func (e *engine) lockBlocks(off, n int64, write bool) *rangelock.Range {
	b0, b1 := e.blockRange(off, n)
	end := int64(math.MaxInt64)
	if b1 < math.MaxInt64/e.l.bs {
		end = (b1 + 1) * e.l.bs
	}
	return e.locks.Lock(b0*e.l.bs, end-b0*e.l.bs, write)
}

// ReadAt serves p from the cache, fetching the missing blocks from the
// source in parallel and keeping them.
func (f *File) ReadAt(p []byte, off int64) (int, error) {
	e := f.e
	if off < 0 {
		return 0, driver.Errorf(driver.ErrOutOfRange, f.Name(), off, "negative read offset")
	}
	if len(p) == 0 {
		return 0, nil
	}
	if int64(len(p)) > math.MaxInt64-off {
		return 0, driver.Errorf(driver.ErrOutOfRange, f.Name(), off, "read past the largest offset")
	}
	lk := e.lockBlocks(off, int64(len(p)), false)
	defer e.locks.Unlock(lk)
	e.mu.Lock()
	size, closed := e.size, e.closed
	e.mu.Unlock()
	if closed {
		return 0, driver.Errorf(driver.ErrClosed, f.Name(), off, "cached file is closed")
	}
	if off >= size {
		return 0, io.EOF
	}
	n := min(int64(len(p)), size-off)
	b0, b1 := e.blockRange(off, n)
	seg := func(b int64) ([]byte, int64) {
		lo, hi := max(off, b*e.l.bs), min(off+n, (b+1)*e.l.bs)
		return p[lo-off : hi-off], lo - b*e.l.bs
	}
	if b0 == b1 && (off%e.l.bs != 0 || n != e.l.bs) {
		dst, in := seg(b0)
		if err := e.readBlock(b0, dst, in, true); err != nil {
			return 0, err
		}
	} else {
		// Missing blocks the read covers whole are fetched straight into
		// p, in runs (one source read each, up to fetchUnit), then
		// stored from there; the others are read block by block. Up to
		// Parallel goroutines run the pieces, so the misses of several
		// blocks fetch at the same time.
		direct := e.claimDirect(off, n, b0, b1)
		var tasks []func() error
		unit := max(e.l.bs, fetchUnit)
		for b := b0; b <= b1; {
			if cs := direct[b]; cs != nil {
				r0 := b
				for b <= b1 && direct[b] != nil && (b == r0 || (b*e.l.bs)%unit != 0) {
					b++
				}
				r1 := b - 1
				dst := p[r0*e.l.bs-off : (r1+1)*e.l.bs-off]
				calls := make([]*call, 0, r1-r0+1)
				for x := r0; x <= r1; x++ {
					calls = append(calls, direct[x])
				}
				tasks = append(tasks, func() error { return e.fillDirect(r0, dst, calls) })
				continue
			}
			blk := b
			tasks = append(tasks, func() error {
				dst, in := seg(blk)
				return e.readBlock(blk, dst, in, true)
			})
			b++
		}
		if err := runTasks(tasks, e.o.Parallel); err != nil {
			return 0, err
		}
	}
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

// WriteAt writes through to the source, then updates the cached copies of
// the blocks it touches. The cache is durably marked unclean first, so a
// crash before the next Sync discards it instead of trusting blocks the
// source may have overwritten.
func (f *File) WriteAt(p []byte, off int64) (int, error) {
	e := f.e
	if off < 0 || int64(len(p)) > math.MaxInt64-off {
		return 0, driver.Errorf(driver.ErrOutOfRange, f.Name(), off, "write outside the addressable range")
	}
	if len(p) == 0 {
		return e.src.WriteAt(p, off)
	}
	lk := e.lockBlocks(off, int64(len(p)), true)
	defer e.locks.Unlock(lk)
	if err := f.beginWrite(); err != nil {
		return 0, err
	}
	defer e.commitMu.RUnlock()
	n, err := e.src.WriteAt(p, off)
	b0, b1 := e.blockRange(off, int64(len(p)))
	for b := b0; b <= b1; b++ {
		e.mu.Lock()
		en := e.byBlock[b]
		if en == nil {
			e.mu.Unlock()
			continue
		}
		if err != nil {
			// The source may hold any mix of old and new bytes.
			e.dropLocked(en)
			e.mu.Unlock()
			continue
		}
		en.pins++
		verified, sum := en.verified, en.crc
		e.mu.Unlock()
		// The whole block is rewritten, to keep its checksum.
		lo, hi := max(off, b*e.l.bs), min(off+int64(n), (b+1)*e.l.bs)
		blk := make([]byte, e.l.bs)
		werr := readFull(e.f, blk, e.slotOff(en.slot))
		if werr == nil && !verified && crc32.Checksum(blk, castagnoli) != sum {
			werr = driver.Corruptf(e.name, e.slotOff(en.slot), "cached block %d: checksum mismatch", b)
		}
		if werr == nil {
			copy(blk[lo-b*e.l.bs:], p[lo-off:hi-off])
			sum = crc32.Checksum(blk, castagnoli)
			_, werr = e.f.WriteAt(blk, e.slotOff(en.slot))
		}
		e.mu.Lock()
		en.pins--
		if werr != nil {
			e.dropLocked(en)
		} else {
			en.crc, en.verified = sum, true
			e.dirty = true
		}
		e.mu.Unlock()
	}
	e.mu.Lock()
	if end := off + int64(n); end > e.size {
		e.size = end
		e.dirty = true
	}
	e.mu.Unlock()
	return n, err
}

// beginWrite takes commitMu shared and marks the cache unclean; on
// success the caller releases commitMu.
func (f *File) beginWrite() error {
	e := f.e
	e.mu.Lock()
	closed := e.closed
	e.mu.Unlock()
	if closed {
		return driver.Errorf(driver.ErrClosed, f.Name(), -1, "cached file is closed")
	}
	e.commitMu.RLock()
	if err := e.markUnclean(); err != nil {
		e.commitMu.RUnlock()
		return err
	}
	e.mu.Lock()
	e.writes++
	e.mu.Unlock()
	return nil
}

// dropRange forgets the cached blocks that [off, off+n) touches.
func (e *engine) dropRange(off, n int64) {
	b0, b1 := e.blockRange(off, n)
	e.mu.Lock()
	defer e.mu.Unlock()
	if b1-b0 > int64(len(e.byBlock)) {
		for b, en := range e.byBlock {
			if b >= b0 && b <= b1 {
				e.dropLocked(en)
			}
		}
		return
	}
	for b := b0; b <= b1; b++ {
		if en := e.byBlock[b]; en != nil {
			e.dropLocked(en)
		}
	}
}

// Truncate resizes the source and forgets the blocks past the new end.
func (f *File) Truncate(size int64) error {
	e := f.e
	if size < 0 {
		return driver.Errorf(driver.ErrOutOfRange, f.Name(), size, "negative size")
	}
	lk := e.locks.Lock(0, math.MaxInt64, true)
	defer e.locks.Unlock(lk)
	if err := f.beginWrite(); err != nil {
		return err
	}
	defer e.commitMu.RUnlock()
	err := e.src.Truncate(size)
	e.mu.Lock()
	old := e.size
	e.mu.Unlock()
	if low := min(old, size); low < math.MaxInt64 {
		// The block holding the new end must read zeros past it if the
		// file grows again: drop it too.
		e.dropRange(low, math.MaxInt64-low)
	}
	if err != nil {
		return err
	}
	e.mu.Lock()
	e.size = size
	e.dirty = true
	e.mu.Unlock()
	return nil
}

// PunchHole passes the hole to the source and forgets the cached blocks
// it touches.
func (f *File) PunchHole(off, n int64) error {
	e := f.e
	if off < 0 || n < 0 || n > math.MaxInt64-off {
		return driver.Errorf(driver.ErrOutOfRange, f.Name(), off, "hole outside the addressable range")
	}
	if n == 0 {
		return nil
	}
	lk := e.lockBlocks(off, n, true)
	defer e.locks.Unlock(lk)
	if err := f.beginWrite(); err != nil {
		return err
	}
	defer e.commitMu.RUnlock()
	err := e.src.PunchHole(off, n)
	e.dropRange(off, n)
	return err
}

// Sync flushes the source, then records the cache's metadata durably (and
// clean, if the source flush covered every write). Only the source's
// error is returned.
func (f *File) Sync() error {
	e := f.e
	e.mu.Lock()
	w, s := e.writes, e.synced
	e.mu.Unlock()
	if w != s {
		if err := e.src.Sync(); err != nil {
			return err
		}
		e.mu.Lock()
		e.synced = max(e.synced, w)
		e.mu.Unlock()
	}
	// The source is durable: a cache that cannot record its blocks is
	// only less useful (an unclean one is discarded on the next open), so
	// this is a warning, not the caller's error.
	if err := e.commit(); err != nil {
		e.log.Warn("cache: cannot record the cached blocks", "cache", e.name, "err", err)
	}
	return nil
}

// Close syncs like Sync and closes the cache file and the source.
func (f *File) Close() error {
	f.closeOnce.Do(func() {
		e := f.e
		err := f.Sync()
		e.mu.Lock()
		e.closed = true
		e.mu.Unlock()
		e.flushes.Wait()
		if cerr := e.f.Close(); err == nil {
			err = cerr
		}
		if cerr := e.src.Close(); err == nil {
			err = cerr
		}
		if e.onClose != nil {
			e.onClose()
		}
		f.closeErr = err
	})
	return f.closeErr
}

// runTasks runs tasks on up to parallel goroutines (the first inline when
// it is alone) and returns the first error. Every task runs: a claimed
// fetch must always end, to release its waiters.
func runTasks(tasks []func() error, parallel int) error {
	if len(tasks) == 1 {
		return tasks[0]()
	}
	var wg sync.WaitGroup
	var errMu sync.Mutex
	var first error
	next := make(chan func() error)
	for range min(parallel, len(tasks)) {
		wg.Go(func() {
			for t := range next {
				if err := t(); err != nil {
					errMu.Lock()
					if first == nil {
						first = err
					}
					errMu.Unlock()
				}
			}
		})
	}
	for _, t := range tasks {
		next <- t
	}
	close(next)
	wg.Wait()
	return first
}
