package osfs

import (
	"errors"
	"io"
	"os"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vdisk/vdisk/driver"
)

// File is an open local file. It implements driver.File, driver.HoleSeeker,
// driver.Allocator, driver.ZeroRanger and driver.AllocatedSizer, and is safe
// for concurrent use.
type File struct {
	f        *os.File
	rc       syscall.RawConn
	name     string
	writable bool
	direct   bool
	blockDev bool
	cloneState
	// calls: fdCalls to reuse (see fdCall).
	callMu sync.Mutex
	calls  []*fdCall
}

// fdCall is an fdatasync or fallocate run through RawConn.Control without
// allocating: control's closure escapes (two allocations per call), while
// an fdCall's func is made once and the fdCalls are reused, so an NBD
// server's flushes, trims and zeroes cost no garbage.
type fdCall struct {
	fallocate bool
	mode      uint32
	off, n    int64
	err       error
	fn        func(fd uintptr)
}

func (c *fdCall) run(fd uintptr) {
	for {
		if c.fallocate {
			c.err = unix.Fallocate(int(fd), c.mode, c.off, c.n)
		} else {
			c.err = unix.Fdatasync(int(fd))
		}
		if c.err != unix.EINTR {
			return
		}
	}
}

// fdCalls kept per file for reuse (more run at once only under heavy
// concurrency; those allocate).
const maxFdCalls = 8

// do runs an fdCall with the descriptor, as control does.
func (f *File) do(fallocate bool, mode uint32, off, n int64) error {
	f.callMu.Lock()
	var c *fdCall
	if k := len(f.calls); k > 0 {
		c = f.calls[k-1]
		f.calls = f.calls[:k-1]
	}
	f.callMu.Unlock()
	if c == nil {
		c = &fdCall{}
		c.fn = c.run
	}
	c.fallocate, c.mode, c.off, c.n, c.err = fallocate, mode, off, n, nil
	err := f.rc.Control(c.fn)
	if err == nil {
		err = c.err
	} else {
		err = os.ErrClosed // as control
	}
	c.err = nil
	f.callMu.Lock()
	if len(f.calls) < maxFdCalls {
		f.calls = append(f.calls, c)
	}
	f.callMu.Unlock()
	return err
}

var (
	_ driver.File           = (*File)(nil)
	_ driver.HoleSeeker     = (*File)(nil)
	_ driver.Allocator      = (*File)(nil)
	_ driver.ZeroRanger     = (*File)(nil)
	_ driver.AllocatedSizer = (*File)(nil)
)

// control runs fn with the file descriptor, keeping it valid meanwhile.
func (f *File) control(fn func(fd int) error) error {
	var ferr error
	if err := f.rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		// The only failure is a closed (or closing) file; report it as
		// os.ErrClosed like the other methods do.
		return os.ErrClosed
	}
	return ferr
}

// Name returns the name the file was opened with.
func (f *File) Name() string { return f.name }

// Direct reports whether the file is open with O_DIRECT. It is false when
// driver.Direct was not asked for or the file system refused it.
func (f *File) Direct() bool { return f.direct }

// ReadAt reads len(p) bytes at off (pread). A read reaching the end of the
// file returns the bytes read and io.EOF, unwrapped.
func (f *File) ReadAt(p []byte, off int64) (int, error) {
	n, err := f.f.ReadAt(p, off)
	return n, wrap("read", f.name, off, "", err)
}

// WriteAt writes p at off (pwrite), extending the file if needed.
func (f *File) WriteAt(p []byte, off int64) (int, error) {
	n, err := f.f.WriteAt(p, off)
	return n, wrap("write", f.name, off, "", err)
}

// Size returns the file size (the device size for block devices).
func (f *File) Size() (int64, error) {
	var size int64
	err := f.control(func(fd int) error {
		if f.blockDev {
			var err error
			size, err = unix.Seek(fd, 0, io.SeekEnd)
			return err
		}
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return err
		}
		size = st.Size
		return nil
	})
	if err != nil {
		return 0, wrap("stat", f.name, -1, "", err)
	}
	return size, nil
}

// Truncate changes the file size.
func (f *File) Truncate(size int64) error {
	if size < 0 {
		return wrap("truncate", f.name, size, "negative size", syscall.EINVAL)
	}
	err := f.control(func(fd int) error {
		return retryEINTR(func() error { return unix.Ftruncate(fd, size) })
	})
	return wrap("truncate", f.name, size, "", err)
}

// Sync flushes the file's data (and the metadata needed to read it) to
// stable storage with fdatasync(2).
func (f *File) Sync() error {
	return wrap("sync", f.name, -1, "", f.do(false, 0, 0, 0))
}

// Close closes the file, releasing its lock.
func (f *File) Close() error {
	return wrap("close", f.name, -1, "", f.f.Close())
}

// fallocate calls fallocate(2) on the file, retrying on EINTR.
func (f *File) fallocate(mode uint32, off, n int64) error {
	return f.do(true, mode, off, n)
}

func checkRange(op, name string, off, n int64) error {
	if off < 0 || n < 0 || off > (1<<63-1)-n {
		return driver.Errorf(syscall.EINVAL, name, off, "%s: invalid range of %d bytes", op, n)
	}
	return nil
}

func unsupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS)
}

// PunchHole deallocates [off, off+n) keeping the file size
// (FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE); the range then reads as zeros.
// Where the file system cannot punch holes it writes zeros over the part of
// the range inside the file instead.
func (f *File) PunchHole(off, n int64) error {
	if err := checkRange("punch hole", f.name, off, n); err != nil || n == 0 {
		return err
	}
	err := f.fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if unsupported(err) {
		size, serr := f.Size()
		if serr != nil {
			return serr
		}
		if off >= size {
			return nil
		}
		return f.writeZeros(off, min(n, size-off))
	}
	return wrap("punch hole", f.name, off, "", err)
}

// Allocate preallocates [off, off+n) (fallocate mode 0), extending the file
// if the range ends past it; the new space reads as zeros. A file system
// without fallocate support yields an error wrapping driver.ErrUnsupported.
func (f *File) Allocate(off, n int64) error {
	if err := checkRange("allocate", f.name, off, n); err != nil || n == 0 {
		return err
	}
	err := f.fallocate(0, off, n)
	if unsupported(err) {
		return &driver.Error{Op: "allocate", File: f.name, Offset: off,
			Reason: "the file system cannot preallocate",
			Err:    &osError{err: err, sentinel: driver.ErrUnsupported}}
	}
	return wrap("allocate", f.name, off, "", err)
}

// ZeroRange makes [off, off+n) read as zeros and stay allocated
// (FALLOC_FL_ZERO_RANGE), extending the file if the range ends past it.
// Where unsupported it writes zeros in 1 MiB chunks.
func (f *File) ZeroRange(off, n int64) error {
	if err := checkRange("zero range", f.name, off, n); err != nil || n == 0 {
		return err
	}
	err := f.fallocate(unix.FALLOC_FL_ZERO_RANGE, off, n)
	if unsupported(err) || (err != nil && f.blockDev && errors.Is(err, unix.ENODEV)) {
		return f.writeZeros(off, n)
	}
	return wrap("zero range", f.name, off, "", err)
}

// AllocatedSize returns the bytes allocated to the file (st_blocks*512).
func (f *File) AllocatedSize() (int64, error) {
	var st unix.Stat_t
	if err := f.control(func(fd int) error { return unix.Fstat(fd, &st) }); err != nil {
		return 0, wrap("stat", f.name, -1, "", err)
	}
	return st.Blocks * 512, nil
}

// SeekData returns the first offset at or after off that holds data
// (lseek SEEK_DATA), or io.EOF when there is none before the end of the
// file. File systems without hole support report the whole file as data.
func (f *File) SeekData(off int64) (int64, error) {
	return f.seek(off, unix.SEEK_DATA)
}

// SeekHole returns the first hole at or after off (lseek SEEK_HOLE); the end
// of the file counts as a hole. An off at or past the end of the file yields
// io.EOF (lseek's ENXIO). File systems without hole support report the
// whole file as data.
func (f *File) SeekHole(off int64) (int64, error) {
	return f.seek(off, unix.SEEK_HOLE)
}

func (f *File) seek(off int64, whence int) (int64, error) {
	op := "seek data"
	if whence == unix.SEEK_HOLE {
		op = "seek hole"
	}
	if off < 0 {
		return 0, wrap(op, f.name, off, "negative offset", syscall.EINVAL)
	}
	var pos int64
	// lseek moves the shared file offset, which nothing else uses: all I/O
	// is positional.
	err := f.control(func(fd int) error {
		var err error
		pos, err = unix.Seek(fd, off, whence)
		return err
	})
	switch {
	case err == nil:
		return pos, nil
	case errors.Is(err, unix.ENXIO):
		return 0, io.EOF
	case errors.Is(err, unix.EINVAL) || unsupported(err):
		size, serr := f.Size()
		if serr != nil {
			return 0, serr
		}
		if off >= size {
			return 0, io.EOF
		}
		if whence == unix.SEEK_DATA {
			return off, nil
		}
		return size, nil
	}
	return 0, wrap(op, f.name, off, "", err)
}

const zeroChunk = 1 << 20

// zeroBuf is a shared, never written, 1 MiB zero buffer aligned to 4 KiB so
// that it can be written to O_DIRECT files.
var zeroBuf = sync.OnceValue(func() []byte {
	const align = 4096
	b := make([]byte, zeroChunk+align)
	shift := (align - int(uintptr(unsafe.Pointer(&b[0]))%align)) % align
	return b[shift : shift+zeroChunk : shift+zeroChunk]
})

// writeZeros writes zeros over [off, off+n) in 1 MiB chunks. On an
// O_DIRECT file off and n must be suitably aligned.
func (f *File) writeZeros(off, n int64) error {
	z := zeroBuf()
	for n > 0 {
		c := min(n, int64(len(z)))
		if _, err := f.f.WriteAt(z[:c], off); err != nil {
			return wrap("write", f.name, off, "writing zeros", err)
		}
		off += c
		n -= c
	}
	return nil
}
