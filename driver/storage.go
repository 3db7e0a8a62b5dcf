package driver

import (
	"io"
	"syscall"
	"time"
)

// OpenFlag selects how Storage.Open opens a file.
type OpenFlag int

const (
	// ReadOnly opens for reading only; writes fail.
	ReadOnly OpenFlag = 0
	// ReadWrite opens for reading and writing.
	ReadWrite OpenFlag = 1 << iota
	// Create creates the file if missing (with ReadWrite).
	Create
	// Excl with Create fails if the file exists.
	Excl
	// Truncate truncates an existing file to zero length.
	Truncate
	// Direct asks for uncached I/O (O_DIRECT) where the storage supports it;
	// callers must then use aligned buffers. Ignored where unsupported.
	Direct
	// NoLock skips advisory locking. Without it a ReadWrite open takes an
	// exclusive lock and a ReadOnly open a shared one; a conflict is ErrBusy.
	NoLock
)

// FileInfo describes a stored file.
type FileInfo struct {
	Name      string
	Size      int64
	Allocated int64 // bytes actually allocated on the medium; -1 if unknown
	ModTime   time.Time
	IsDir     bool
}

// Storage is the I/O interface every byte of an image goes through (VD's IO
// interface). Names are interpreted by the storage (paths for osfs).
type Storage interface {
	Open(name string, flag OpenFlag) (File, error)
	Remove(name string) error
	Rename(oldName, newName string) error
	Stat(name string) (FileInfo, error)
	// FreeSpace reports the bytes available for the file or directory name.
	FreeSpace(name string) (int64, error)
	// List returns the names of the entries of directory dir (base names).
	List(dir string) ([]string, error)
}

// Names are slash-separated paths; relative names resolve against the
// storage's working directory (osfs) or its root (memfs).

// File is an open stored file. It must be safe for concurrent ReadAt/WriteAt
// calls on distinct ranges.
type File interface {
	io.ReaderAt
	io.WriterAt
	Name() string
	Size() (int64, error)
	Truncate(size int64) error
	Sync() error
	// PunchHole deallocates [off, off+n): afterwards it reads as zeros and the
	// file size is unchanged. Storages without holes write zeros instead.
	PunchHole(off, n int64) error
	Close() error
}

// HoleSeeker is implemented by files that know their holes (SEEK_DATA and
// SEEK_HOLE). Both follow lseek(2): SeekData returns the first data offset
// at or after off (io.EOF if none), SeekHole the first hole at or after off
// (the file size counts as a hole).
type HoleSeeker interface {
	SeekData(off int64) (int64, error)
	SeekHole(off int64) (int64, error)
}

// AllocationReporter is implemented by files whose storage knows, beyond
// holes, which ranges it holds at all: an NBD export served with
// qemu:allocation-depth, where a range no layer of the server's backing
// chain holds is unallocated (it reads as zeros). Allocation reports the
// run starting at off (0 <= off < size): whether it is held and where it
// ends. Raw images report the zero runs that are not held as Unallocated.
type AllocationReporter interface {
	Allocation(off int64) (held bool, end int64, err error)
}

// RangeCopier is implemented by files that copy a range from another file
// inside the kernel (osfs.File: FICLONERANGE, then copy_file_range). It
// fails with an error wrapping ErrUnsupported, having copied nothing, where
// it cannot (src on another storage, no kernel or file-system support).
type RangeCopier interface {
	CopyFrom(src File, srcOff, off, n int64) (int64, error)
}

// FileSender is implemented by files the kernel can send to a socket
// itself (osfs.File: sendfile(2)). SendTo writes n bytes of the file from
// off to the socket behind rc (a net.Conn's SyscallConn) and returns the
// bytes sent; fewer than n, without an error, when the file ends first. It
// fails with an error wrapping ErrUnsupported, having sent nothing, where
// it cannot (the file or the kernel does not allow it).
type FileSender interface {
	SendTo(rc syscall.RawConn, off, n int64) (int64, error)
}

// Allocator is implemented by files that can preallocate space without
// writing it (fallocate mode 0); the range reads as zeros.
type Allocator interface {
	Allocate(off, n int64) error
}

// ZeroRanger is implemented by files that can zero a range efficiently and
// keep it allocated (FALLOC_FL_ZERO_RANGE).
type ZeroRanger interface {
	ZeroRange(off, n int64) error
}

// AllocatedSizer reports the bytes allocated to the open file.
type AllocatedSizer interface {
	AllocatedSize() (int64, error)
}

// StorageCloser is implemented by storages that hold resources of their
// own beyond their open files (a network client's idle connections). The
// container calls CloseStorage on a storage it built itself for a name
// with a scheme (RegisterScheme) once every image it opened on it is
// closed. Files opened from it are closed before; the call must be safe
// to repeat, and a storage used again afterwards may take new resources.
type StorageCloser interface {
	CloseStorage() error
}

// CloseStorage calls st's CloseStorage when it has one.
func CloseStorage(st Storage) error {
	if c, ok := st.(StorageCloser); ok {
		return c.CloseStorage()
	}
	return nil
}
