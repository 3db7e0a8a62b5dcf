// Package osfs implements driver.Storage on the local file system (Linux).
//
// Names are OS paths, resolved against the process working directory. Files
// are accessed with pread/pwrite (concurrent ReadAt/WriteAt on distinct ranges
// are safe) and implement the optional driver interfaces HoleSeeker
// (SEEK_DATA/SEEK_HOLE), Allocator (fallocate), ZeroRanger
// (FALLOC_FL_ZERO_RANGE) and AllocatedSizer (st_blocks), and copy from one
// another inside the kernel (File.CopyFrom: FICLONERANGE, then
// copy_file_range).
//
// Open takes an advisory flock(2) lock unless driver.NoLock is given: an
// exclusive lock for driver.ReadWrite, a shared one for read-only opens. flock
// locks belong to the open file description, so two conflicting opens of the
// same image conflict even inside one process. A conflict is reported as an
// error wrapping driver.ErrBusy.
//
// Every error names the file it concerns and is a *driver.Error. OS errors
// stay reachable through errors.Is/As (fs.ErrNotExist, fs.ErrPermission,
// syscall.Errno, ...); a missing file additionally matches driver.ErrNotFound.
package osfs

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vdisk/vdisk/driver"
)

// FS is the local file system storage. The zero value is ready to use.
type FS struct{}

// New returns the local file system storage.
func New() driver.Storage { return FS{} }

var _ driver.Storage = FS{}

// Open opens the file name with flag.
//
//   - driver.ReadWrite opens for writing; otherwise the file is read-only.
//   - driver.Create creates a missing file (mode 0644 before umask);
//     driver.Excl with Create fails if it exists (Excl alone is ignored).
//   - driver.Truncate truncates the file to zero length, after the lock is
//     taken (so a locked image is never clobbered); it requires ReadWrite.
//     An empty file is not truncated (see driver.ClearForCreate).
//   - driver.Direct asks for O_DIRECT. It is enabled with fcntl(F_SETFL)
//     after the open; when the file system refuses it the file stays open
//     without it (see File.Direct), so callers keep working.
//   - driver.NoLock skips the advisory lock.
//
// Opening a directory fails with an "is a directory" error wrapping
// syscall.EISDIR.
func (FS) Open(name string, flag driver.OpenFlag) (driver.File, error) {
	writable := flag&driver.ReadWrite != 0
	if flag&driver.Truncate != 0 && !writable {
		return nil, driver.Errorf(driver.ErrInvalidOption, name, -1, "open: Truncate requires ReadWrite")
	}
	oflag := os.O_RDONLY
	if writable {
		oflag = os.O_RDWR
	}
	if flag&driver.Create != 0 {
		oflag |= os.O_CREATE
		if flag&driver.Excl != 0 {
			oflag |= os.O_EXCL
		}
	}
	osf, err := os.OpenFile(name, oflag, 0o644)
	if err != nil {
		if errors.Is(err, syscall.EISDIR) {
			return nil, isDirError(name, err)
		}
		return nil, wrap("open", name, -1, "", err)
	}
	f := &File{f: osf, name: name, writable: writable}
	if err := f.init(flag); err != nil {
		osf.Close()
		return nil, err
	}
	return f, nil
}

func isDirError(name string, err error) error {
	return wrap("open", name, -1, "is a directory, not an image file", err)
}

// init finishes Open: directory check, lock, O_DIRECT and truncation.
func (f *File) init(flag driver.OpenFlag) error {
	rc, err := f.f.SyscallConn()
	if err != nil {
		return wrap("open", f.name, -1, "", err)
	}
	f.rc = rc
	var st unix.Stat_t
	if err := f.control(func(fd int) error { return unix.Fstat(fd, &st) }); err != nil {
		return wrap("stat", f.name, -1, "", err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		return isDirError(f.name, syscall.EISDIR)
	case unix.S_IFBLK:
		f.blockDev = true
	}
	if flag&driver.NoLock == 0 {
		how := unix.LOCK_SH
		if f.writable {
			how = unix.LOCK_EX
		}
		lock := func() error {
			return f.control(func(fd int) error {
				return retryEINTR(func() error { return unix.Flock(fd, how|unix.LOCK_NB) })
			})
		}
		err := lock()
		// A lock just released may still be held for a moment by a child
		// process forked (by any goroutine) before the holder closed its
		// descriptor, until the child's exec closes its copy: wait a little
		// before calling the image busy.
		for i := 0; i < 20 && errors.Is(err, unix.EWOULDBLOCK); i++ {
			time.Sleep(5 * time.Millisecond)
			err = lock()
		}
		if errors.Is(err, unix.EWOULDBLOCK) {
			return &driver.Error{Op: "lock", File: f.name, Offset: -1,
				Reason: "image is in use by another process (advisory lock held)",
				Err:    &osError{err: err, sentinel: driver.ErrBusy}}
		}
		if err != nil && !errors.Is(err, unix.ENOLCK) && !errors.Is(err, unix.EOPNOTSUPP) {
			return wrap("lock", f.name, -1, "", err)
		}
		// ENOLCK/EOPNOTSUPP: the file system has no flock (some network
		// file systems); proceed unlocked like qemu does.
	}
	if flag&driver.Direct != 0 {
		err := f.control(func(fd int) error {
			fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
			if err != nil {
				return err
			}
			_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl|unix.O_DIRECT)
			return err
		})
		switch {
		case err == nil:
			f.direct = true
		case errors.Is(err, unix.EINVAL):
			// The file system does not do O_DIRECT: stay buffered.
		default:
			return wrap("open", f.name, -1, "cannot enable O_DIRECT", err)
		}
	}
	if flag&driver.Truncate != 0 && !f.blockDev {
		// An empty file is left alone: on ext4 a truncate to zero, even
		// of an empty file, makes close write the whole file back
		// (auto_da_alloc), so every convert into a new file would wait
		// for its output to reach the disk.
		size, err := f.Size()
		if err != nil {
			return err
		}
		if size > 0 {
			if err := f.Truncate(0); err != nil {
				return err
			}
		}
	}
	return nil
}

// Remove removes the file (or empty directory) name.
func (FS) Remove(name string) error {
	if err := os.Remove(name); err != nil {
		return wrap("remove", name, -1, "", err)
	}
	return nil
}

// Rename renames oldName to newName, replacing newName if it exists.
func (FS) Rename(oldName, newName string) error {
	if err := os.Rename(oldName, newName); err != nil {
		var le *os.LinkError
		if errors.As(err, &le) {
			err = le.Err
		}
		return wrap("rename", oldName, -1, "to "+newName, err)
	}
	return nil
}

// Stat describes name (following symbolic links). Name in the result is the
// base name; Allocated is st_blocks*512.
func (FS) Stat(name string) (driver.FileInfo, error) {
	fi, err := os.Stat(name)
	if err != nil {
		return driver.FileInfo{}, wrap("stat", name, -1, "", err)
	}
	info := driver.FileInfo{
		Name:      fi.Name(),
		Size:      fi.Size(),
		Allocated: -1,
		ModTime:   fi.ModTime(),
		IsDir:     fi.IsDir(),
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		info.Allocated = st.Blocks * 512
	}
	return info, nil
}

// FreeSpace reports the bytes available to an unprivileged user (statfs
// f_bavail*f_bsize) on the file system holding name: name itself if it is a
// directory, else its parent directory (name need not exist yet).
func (FS) FreeSpace(name string) (int64, error) {
	dir := name
	if fi, err := os.Stat(name); err != nil || !fi.IsDir() {
		dir = filepath.Dir(name)
	}
	var st unix.Statfs_t
	err := retryEINTR(func() error { return unix.Statfs(dir, &st) })
	if err != nil {
		return 0, wrap("statfs", dir, -1, "", err)
	}
	return int64(st.Bavail) * int64(st.Bsize), nil
}

// List returns the base names of the entries of directory dir, sorted.
func (FS) List(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, wrap("list", dir, -1, "", err)
	}
	names := make([]string, len(ents))
	for i, e := range ents {
		names[i] = e.Name()
	}
	return names, nil
}

// osError presents the bare OS error text (without the path, which the
// enclosing *driver.Error already shows) while errors.Is/As still reach the
// original error (*fs.PathError, syscall.Errno) and an optional driver
// sentinel.
type osError struct {
	err      error
	sentinel error // may be nil
}

func (e *osError) Error() string {
	err := e.err
	for {
		switch x := err.(type) {
		case *fs.PathError:
			err = x.Err
			continue
		case *os.LinkError:
			err = x.Err
			continue
		case *os.SyscallError:
			err = x.Err
			continue
		}
		return err.Error()
	}
}

func (e *osError) Unwrap() []error {
	if e.sentinel == nil {
		return []error{e.err}
	}
	return []error{e.sentinel, e.err}
}

// wrap turns an OS error into a *driver.Error naming file. io.EOF passes
// through unchanged; errors that already name the file are kept.
func wrap(op, file string, off int64, reason string, err error) error {
	if err == nil || err == io.EOF {
		return err
	}
	var de *driver.Error
	if errors.As(err, &de) && de.File != "" {
		return err
	}
	oe := &osError{err: err}
	if errors.Is(err, fs.ErrNotExist) {
		oe.sentinel = driver.ErrNotFound
	}
	return &driver.Error{Op: op, File: file, Offset: off, Reason: reason, Err: oe}
}

func retryEINTR(fn func() error) error {
	for {
		err := fn()
		if err != unix.EINTR {
			return err
		}
	}
}
