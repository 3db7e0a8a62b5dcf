package faultfs

import (
	"bytes"
	"io"

	"github.com/vdisk/vdisk/driver"
)

// errShortWrite is what ShortWrites reports.
var errShortWrite = io.ErrShortWrite

// poison is what a failed read leaves in the caller's buffer.
const poison = 0xA5

// file wraps an open file of the wrapped storage.
type file struct {
	fs    *FS
	inner driver.File
	node  *node // nil when durability is not tracked
}

var (
	_ driver.File           = (*file)(nil)
	_ driver.HoleSeeker     = (*file)(nil)
	_ driver.Allocator      = (*file)(nil)
	_ driver.ZeroRanger     = (*file)(nil)
	_ driver.AllocatedSizer = (*file)(nil)
)

func (f *file) Name() string { return f.inner.Name() }

// fail wraps an injected error with the file name and offset.
func (f *file) fail(op string, off int64, err error) error {
	return &driver.Error{Op: op, File: f.inner.Name(), Offset: off, Err: err}
}

// lockNode serializes the file's modifications with its log.
func (f *file) lockNode() func() {
	if f.node == nil {
		return func() {}
	}
	f.node.mu.Lock()
	return f.node.mu.Unlock
}

// record logs a successful data operation; the caller holds the node lock.
func (f *file) record(o op) {
	if f.node != nil {
		f.node.pending = append(f.node.pending, o)
	}
}

// ReadAt reads from the wrapped file unless a read fault is due; then it
// returns 0 and the fault, with p overwritten by garbage.
func (f *file) ReadAt(p []byte, off int64) (int, error) {
	if err := f.fs.beginRead(); err != nil {
		for i := range p {
			p[i] = poison
		}
		return 0, f.fail("read", off, err)
	}
	return f.inner.ReadAt(p, off)
}

// WriteAt writes to the wrapped file, subject to the write rules.
func (f *file) WriteAt(p []byte, off int64) (int, error) {
	allowed, ferr := f.fs.beginWrite(int64(len(p)), true, true, true)
	if allowed == 0 && ferr != nil {
		return 0, f.fail("write", off, ferr)
	}
	unlock := f.lockNode()
	n, err := f.inner.WriteAt(p[:allowed], off)
	if n > 0 {
		f.record(op{kind: opWrite, off: off, data: bytes.Clone(p[:n])})
	}
	unlock()
	if err != nil {
		return n, err
	}
	if ferr != nil {
		return n, f.fail("write", off, ferr)
	}
	return n, nil
}

// mutate runs a whole-or-nothing write operation under the write rules.
func (f *file) mutate(name string, o op, consumes bool, fn func() error) error {
	if _, ferr := f.fs.beginWrite(o.n, false, consumes, false); ferr != nil {
		return f.fail(name, o.off, ferr)
	}
	unlock := f.lockNode()
	defer unlock()
	if err := fn(); err != nil {
		return err
	}
	f.record(o)
	return nil
}

func (f *file) Size() (int64, error) { return f.inner.Size() }

// Truncate is a write operation.
func (f *file) Truncate(size int64) error {
	return f.mutate("truncate", op{kind: opTruncate, off: size}, false, func() error {
		return f.inner.Truncate(size)
	})
}

// PunchHole is a write operation.
func (f *file) PunchHole(off, n int64) error {
	return f.mutate("punch hole", op{kind: opPunch, off: off, n: n}, false, func() error {
		return f.inner.PunchHole(off, n)
	})
}

// ZeroRange is a write operation; it writes zeros when the wrapped file
// has no ZeroRange.
func (f *file) ZeroRange(off, n int64) error {
	return f.mutate("zero range", op{kind: opZero, off: off, n: n}, false, func() error {
		if z, ok := f.inner.(driver.ZeroRanger); ok {
			return z.ZeroRange(off, n)
		}
		if off < 0 || n < 0 {
			return driver.Errorf(driver.ErrInvalidOption, f.inner.Name(), off, "zero range: invalid range of %d bytes", n)
		}
		return driver.WriteZeros(f.inner, off, n)
	})
}

// Allocate is a write operation that consumes the space budget.
func (f *file) Allocate(off, n int64) error {
	a, ok := f.inner.(driver.Allocator)
	if !ok {
		return driver.Unsupportedf(f.inner.Name(), "the storage cannot preallocate")
	}
	return f.mutate("allocate", op{kind: opAlloc, off: off, n: n}, true, func() error {
		return a.Allocate(off, n)
	})
}

// Sync syncs the wrapped file and, when tracking durability, makes the
// file's pending operations durable. It fails after a crash or under
// FailSync.
func (f *file) Sync() error {
	if err := f.fs.beginSync(); err != nil {
		return f.fail("sync", -1, err)
	}
	unlock := f.lockNode()
	defer unlock()
	if err := f.inner.Sync(); err != nil {
		return err
	}
	if f.node == nil {
		return nil
	}
	return f.fs.syncNode(f.node)
}

// SeekData forwards to the wrapped file, or reports the whole file as data.
func (f *file) SeekData(off int64) (int64, error) {
	if h, ok := f.inner.(driver.HoleSeeker); ok {
		return h.SeekData(off)
	}
	size, err := f.inner.Size()
	if err != nil {
		return 0, err
	}
	if off >= size {
		return 0, io.EOF
	}
	return off, nil
}

// SeekHole forwards to the wrapped file, or reports the whole file as data.
func (f *file) SeekHole(off int64) (int64, error) {
	if h, ok := f.inner.(driver.HoleSeeker); ok {
		return h.SeekHole(off)
	}
	size, err := f.inner.Size()
	if err != nil {
		return 0, err
	}
	if off >= size {
		return 0, io.EOF
	}
	return size, nil
}

// AllocatedSize forwards to the wrapped file.
func (f *file) AllocatedSize() (int64, error) {
	if a, ok := f.inner.(driver.AllocatedSizer); ok {
		return a.AllocatedSize()
	}
	return 0, driver.Unsupportedf(f.inner.Name(), "the storage cannot report allocation")
}

// Close closes the wrapped file (also after a crash).
func (f *file) Close() error { return f.inner.Close() }
