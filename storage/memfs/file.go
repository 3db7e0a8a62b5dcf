package memfs

import (
	"io"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vdisk/vdisk/driver"
)

type page = [PageSize]byte

// inode is the content of one file.
type inode struct {
	mu    sync.RWMutex
	size  int64
	pages map[int64]*page // page number → content; nil content: allocated zeros
	// index lists the page numbers with non-nil content, sorted; it is
	// rebuilt on demand when dirty.
	index   []int64
	dirty   bool
	modTime time.Time

	// Guarded by FS.mu.
	readOnly  bool
	exclusive bool
	shared    int
}

func newInode() *inode {
	return &inode{pages: make(map[int64]*page), modTime: modNow()}
}

func (ino *inode) clone() *inode {
	ino.mu.RLock()
	defer ino.mu.RUnlock()
	c := &inode{size: ino.size, pages: make(map[int64]*page, len(ino.pages)),
		modTime: ino.modTime, readOnly: ino.readOnly, dirty: true}
	for i, pg := range ino.pages {
		if pg != nil {
			cp := *pg
			pg = &cp
		}
		c.pages[i] = pg
	}
	return c
}

// pagesIn returns the numbers of the present pages in [first, last], in no
// particular order, walking whichever is smaller: the range or the map.
func (ino *inode) pagesIn(first, last int64) []int64 {
	var out []int64
	if last-first < int64(len(ino.pages)) {
		for i := first; i <= last; i++ {
			if _, ok := ino.pages[i]; ok {
				out = append(out, i)
			}
		}
		return out
	}
	for i := range ino.pages {
		if i >= first && i <= last {
			out = append(out, i)
		}
	}
	return out
}

// readLocked fills p from off; the range must lie within the file.
func (ino *inode) readLocked(p []byte, off int64) {
	for len(p) > 0 {
		pi, po := off/PageSize, off%PageSize
		c := min(int64(len(p)), PageSize-po)
		if pg := ino.pages[pi]; pg != nil {
			copy(p[:c], pg[po:])
		} else {
			clear(p[:c])
		}
		p, off = p[c:], off+c
	}
}

// writeLocked stores p at off, extending the file.
func (ino *inode) writeLocked(p []byte, off int64) {
	end := off + int64(len(p))
	for len(p) > 0 {
		pi, po := off/PageSize, off%PageSize
		c := min(int64(len(p)), PageSize-po)
		chunk := p[:c]
		zero := driver.IsZero(chunk)
		pg, present := ino.pages[pi]
		switch {
		case pg == nil && zero:
			// Zeros over a hole or allocated zeros: allocated zeros.
			if !present {
				ino.pages[pi] = nil
			}
		case pg == nil:
			pg = new(page)
			copy(pg[po:], chunk)
			ino.pages[pi] = pg
			ino.dirty = true
		default:
			copy(pg[po:], chunk)
			if zero && driver.IsZero(pg[:]) {
				ino.pages[pi] = nil
				ino.dirty = true
			}
		}
		p, off = p[c:], off+c
	}
	if end > ino.size {
		ino.size = end
	}
	ino.modTime = modNow()
}

// truncateLocked sets the size, dropping the pages past it and zeroing the
// tail of the last one.
func (ino *inode) truncateLocked(size int64) {
	if size < ino.size {
		cut := (size + PageSize - 1) / PageSize // first page entirely past size
		for _, i := range ino.pagesIn(cut, (ino.size-1)/PageSize) {
			delete(ino.pages, i)
		}
		if po := size % PageSize; po != 0 {
			if pg := ino.pages[size/PageSize]; pg != nil {
				clear(pg[po:])
				if driver.IsZero(pg[:]) {
					ino.pages[size/PageSize] = nil
				}
			}
		}
		ino.dirty = true
	}
	ino.size = size
	ino.modTime = modNow()
}

// punchLocked deallocates [off, end); pages left all-zero are dropped.
func (ino *inode) punchLocked(off, end int64) {
	for _, i := range ino.pagesIn(off/PageSize, (end-1)/PageSize) {
		lo := max(off, i*PageSize) - i*PageSize
		hi := min(end, (i+1)*PageSize) - i*PageSize
		pg := ino.pages[i]
		if pg != nil && (lo != 0 || hi != PageSize) {
			clear(pg[lo:hi])
			if !driver.IsZero(pg[:]) {
				continue
			}
		}
		delete(ino.pages, i)
	}
	ino.dirty = true
	ino.modTime = modNow()
}

// fillLocked makes every page of [off, end) present; with zero it also
// zeroes the range. It extends the file to end.
func (ino *inode) fillLocked(off, end int64, zero bool) {
	for i := off / PageSize; i <= (end-1)/PageSize; i++ {
		pg, present := ino.pages[i]
		switch {
		case !present:
			ino.pages[i] = nil
		case pg != nil && zero:
			lo := max(off, i*PageSize) - i*PageSize
			hi := min(end, (i+1)*PageSize) - i*PageSize
			clear(pg[lo:hi])
			if (lo == 0 && hi == PageSize) || driver.IsZero(pg[:]) {
				ino.pages[i] = nil
				ino.dirty = true
			}
		}
	}
	if end > ino.size {
		ino.size = end
	}
	ino.modTime = modNow()
}

// dataIndex returns the sorted numbers of the data pages. It needs the
// write lock.
func (ino *inode) dataIndex() []int64 {
	if ino.dirty || ino.index == nil {
		idx := ino.index[:0]
		for i, pg := range ino.pages {
			if pg != nil {
				idx = append(idx, i)
			}
		}
		slices.Sort(idx)
		ino.index, ino.dirty = idx, false
	}
	return ino.index
}

type lockKind uint8

const (
	lockNone lockKind = iota
	lockShared
	lockExclusive
)

// file is an open memfs file. It implements driver.File, driver.HoleSeeker,
// driver.Allocator, driver.ZeroRanger and driver.AllocatedSizer.
type file struct {
	fs       *FS
	ino      *inode
	name     string
	writable bool
	lock     lockKind
	closed   atomic.Bool
}

var (
	_ driver.File           = (*file)(nil)
	_ driver.HoleSeeker     = (*file)(nil)
	_ driver.Allocator      = (*file)(nil)
	_ driver.ZeroRanger     = (*file)(nil)
	_ driver.AllocatedSizer = (*file)(nil)
)

func (f *file) Name() string { return f.name }

// checkRange validates a range of n bytes at off.
func (f *file) checkRange(op string, off, n int64) error {
	if f.closed.Load() {
		return closedErr(op, f.name)
	}
	if off < 0 || n < 0 || off > math.MaxInt64-n {
		return newErr(op, f.name, off, "invalid range", syscall.EINVAL)
	}
	return nil
}

// checkWrite validates a modification of n bytes at off.
func (f *file) checkWrite(op string, off, n int64) error {
	if err := f.checkRange(op, off, n); err != nil {
		return err
	}
	if !f.writable {
		return &driver.Error{Op: op, File: f.name, Offset: off, Reason: "file opened read-only",
			Err: &errno{sentinel: driver.ErrReadOnly, errno: syscall.EBADF}}
	}
	return nil
}

// ReadAt reads at off; a read reaching the end of the file returns io.EOF.
func (f *file) ReadAt(p []byte, off int64) (int, error) {
	if err := f.checkRange("read", off, int64(len(p))); err != nil {
		return 0, err
	}
	f.ino.mu.RLock()
	defer f.ino.mu.RUnlock()
	if off >= f.ino.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := min(int64(len(p)), f.ino.size-off)
	f.ino.readLocked(p[:n], off)
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

// WriteAt writes p at off, extending the file.
func (f *file) WriteAt(p []byte, off int64) (int, error) {
	if err := f.checkWrite("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	f.ino.mu.Lock()
	defer f.ino.mu.Unlock()
	f.ino.writeLocked(p, off)
	return len(p), nil
}

func (f *file) Size() (int64, error) {
	if f.closed.Load() {
		return 0, closedErr("stat", f.name)
	}
	f.ino.mu.RLock()
	defer f.ino.mu.RUnlock()
	return f.ino.size, nil
}

func (f *file) Truncate(size int64) error {
	if err := f.checkWrite("truncate", size, 0); err != nil {
		return err
	}
	f.ino.mu.Lock()
	defer f.ino.mu.Unlock()
	f.ino.truncateLocked(size)
	return nil
}

// Sync does nothing: memory is as durable as it gets (see the faultfs
// package for simulating crashes).
func (f *file) Sync() error {
	if f.closed.Load() {
		return closedErr("sync", f.name)
	}
	return nil
}

// PunchHole deallocates [off, off+n) within the file (the size is kept).
func (f *file) PunchHole(off, n int64) error {
	if err := f.checkWrite("punch hole", off, n); err != nil {
		return err
	}
	f.ino.mu.Lock()
	defer f.ino.mu.Unlock()
	end := min(off+n, f.ino.size)
	if off < end {
		f.ino.punchLocked(off, end)
	}
	return nil
}

// Allocate makes [off, off+n) allocated, extending the file if needed;
// existing data is kept and new space reads as zeros. Its cost (time and a
// map entry per page) is proportional to the pages in the range.
func (f *file) Allocate(off, n int64) error {
	if err := f.checkWrite("allocate", off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	f.ino.mu.Lock()
	defer f.ino.mu.Unlock()
	f.ino.fillLocked(off, off+n, false)
	return nil
}

// ZeroRange makes [off, off+n) read as zeros and stay allocated, extending
// the file if needed. Like Allocate, its cost is proportional to the pages
// in the range; use PunchHole to clear huge ranges cheaply.
func (f *file) ZeroRange(off, n int64) error {
	if err := f.checkWrite("zero range", off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	f.ino.mu.Lock()
	defer f.ino.mu.Unlock()
	f.ino.fillLocked(off, off+n, true)
	return nil
}

// AllocatedSize returns the number of present pages times PageSize.
func (f *file) AllocatedSize() (int64, error) {
	if f.closed.Load() {
		return 0, closedErr("stat", f.name)
	}
	f.ino.mu.RLock()
	defer f.ino.mu.RUnlock()
	return int64(len(f.ino.pages)) * PageSize, nil
}

// SeekData returns the first offset at or after off in a data page (or off
// itself if its page holds data), or io.EOF if there is none before the end
// of the file.
func (f *file) SeekData(off int64) (int64, error) {
	if err := f.checkRange("seek data", off, 0); err != nil {
		return 0, err
	}
	f.ino.mu.Lock()
	defer f.ino.mu.Unlock()
	if off >= f.ino.size {
		return 0, io.EOF
	}
	idx := f.ino.dataIndex()
	i, _ := slices.BinarySearch(idx, off/PageSize)
	if i == len(idx) {
		return 0, io.EOF
	}
	pos := max(off, idx[i]*PageSize)
	if pos >= f.ino.size {
		return 0, io.EOF
	}
	return pos, nil
}

// SeekHole returns the first offset at or after off that is not in a data
// page, the end of the file counting as a hole; an off at or past the end
// yields io.EOF (like lseek's ENXIO).
func (f *file) SeekHole(off int64) (int64, error) {
	if err := f.checkRange("seek hole", off, 0); err != nil {
		return 0, err
	}
	f.ino.mu.Lock()
	defer f.ino.mu.Unlock()
	if off >= f.ino.size {
		return 0, io.EOF
	}
	idx := f.ino.dataIndex()
	i, found := slices.BinarySearch(idx, off/PageSize)
	if !found {
		return off, nil
	}
	for i+1 < len(idx) && idx[i+1] == idx[i]+1 {
		i++
	}
	return min((idx[i]+1)*PageSize, f.ino.size), nil
}

// Close releases the file's lock. Closing twice fails with fs.ErrClosed.
func (f *file) Close() error {
	if f.closed.Swap(true) {
		return closedErr("close", f.name)
	}
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	switch f.lock {
	case lockExclusive:
		f.ino.exclusive = false
	case lockShared:
		f.ino.shared--
	}
	return nil
}
