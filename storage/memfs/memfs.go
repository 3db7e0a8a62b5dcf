// Package memfs implements driver.Storage in memory, for tests.
//
// Names are slash-separated paths cleaned with path.Clean; relative names
// resolve against "/". Directories are implicit: every proper prefix of a
// file's path is a directory (Stat reports IsDir, List lists it), and "/"
// always exists. A file cannot be created where a directory is, or below
// another file.
//
// Files are sparse: their content lives in 64 KiB pages kept in a map, so a
// huge, mostly empty file costs next to nothing. A page is either data, or
// "allocated zeros" (what Allocate and ZeroRange leave behind), or absent (a
// hole). Pages that PunchHole turns all-zero are dropped. AllocatedSize is
// the number of present pages times PageSize. SeekData/SeekHole work at page
// granularity and treat allocated-zero pages as holes (as ext4 and XFS do
// for unwritten extents); they never report a hole where non-zero data is.
//
// Locking mirrors the osfs package: a ReadWrite open takes an exclusive
// lock, a read-only open a shared one, driver.NoLock takes none; a conflict
// fails with an error wrapping driver.ErrBusy. Locks belong to the file (so
// they follow it across Rename) and are released on Close.
//
// Errors are *driver.Error values naming the file and wrapping a
// syscall.Errno, so errors.Is works with fs.ErrNotExist, fs.ErrExist,
// fs.ErrPermission and the errno itself; a missing file also matches
// driver.ErrNotFound and a lock conflict driver.ErrBusy.
//
// An FS is safe for concurrent use.
package memfs

import (
	"io/fs"
	"path"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vdisk/vdisk/driver"
)

// PageSize is the allocation unit of memfs files.
const PageSize = 64 << 10

// DefaultFreeSpace is what FreeSpace reports: memfs has no capacity limit.
const DefaultFreeSpace int64 = 1 << 50

// FS is an in-memory storage. Create it with New.
type FS struct {
	mu    sync.Mutex
	files map[string]*inode // cleaned absolute path → file
}

var _ driver.Storage = (*FS)(nil)

// New returns an empty in-memory storage.
func New() *FS {
	return &FS{files: make(map[string]*inode)}
}

// CleanName returns the canonical form memfs uses for name: path.Clean of
// the name, made absolute against "/".
func CleanName(name string) string {
	if !strings.HasPrefix(name, "/") {
		name = "/" + name
	}
	return path.Clean(name)
}

// errno is an error that matches a driver sentinel (optional) and a
// syscall.Errno, printing as the errno.
type errno struct {
	sentinel error
	errno    syscall.Errno
}

func (e *errno) Error() string { return e.errno.Error() }

func (e *errno) Unwrap() []error {
	if e.sentinel == nil {
		return []error{e.errno}
	}
	return []error{e.sentinel, e.errno}
}

// newErr builds a *driver.Error naming file.
func newErr(op, file string, off int64, reason string, en syscall.Errno) error {
	var sentinel error
	switch en {
	case syscall.ENOENT:
		sentinel = driver.ErrNotFound
	case syscall.EWOULDBLOCK:
		sentinel = driver.ErrBusy
	}
	return &driver.Error{Op: op, File: file, Offset: off, Reason: reason,
		Err: &errno{sentinel: sentinel, errno: en}}
}

// isDirLocked reports whether name (cleaned) is a directory.
func (fsys *FS) isDirLocked(name string) bool {
	if name == "/" {
		return true
	}
	prefix := name + "/"
	for n := range fsys.files {
		if strings.HasPrefix(n, prefix) {
			return true
		}
	}
	return false
}

// parentFileLocked returns the first ancestor of name that is a file, or "".
func (fsys *FS) parentFileLocked(name string) string {
	for dir := path.Dir(name); dir != "/"; dir = path.Dir(dir) {
		if _, ok := fsys.files[dir]; ok {
			return dir
		}
	}
	return ""
}

// Open opens the file name. See the package comment for the semantics of
// locks; driver.Create creates a missing file (Excl: fail if it exists),
// driver.Truncate (which requires ReadWrite) empties it after the lock is
// taken, and driver.Direct is ignored. A ReadWrite open of a file marked
// with SetReadOnly fails with an error wrapping fs.ErrPermission.
func (fsys *FS) Open(name string, flag driver.OpenFlag) (driver.File, error) {
	writable := flag&driver.ReadWrite != 0
	if flag&driver.Truncate != 0 && !writable {
		return nil, driver.Errorf(driver.ErrInvalidOption, name, -1, "open: Truncate requires ReadWrite")
	}
	cname := CleanName(name)
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	ino := fsys.files[cname]
	if ino == nil {
		if fsys.isDirLocked(cname) {
			return nil, newErr("open", name, -1, "is a directory, not an image file", syscall.EISDIR)
		}
		if flag&driver.Create == 0 {
			return nil, newErr("open", name, -1, "", syscall.ENOENT)
		}
		if p := fsys.parentFileLocked(cname); p != "" {
			return nil, newErr("open", name, -1, p+" is not a directory", syscall.ENOTDIR)
		}
		ino = newInode()
		fsys.files[cname] = ino
	} else if flag&driver.Create != 0 && flag&driver.Excl != 0 {
		return nil, newErr("open", name, -1, "", syscall.EEXIST)
	}
	if writable && ino.readOnly {
		return nil, newErr("open", name, -1, "", syscall.EACCES)
	}
	lock := lockNone
	if flag&driver.NoLock == 0 {
		if writable {
			if ino.exclusive || ino.shared > 0 {
				return nil, newErr("lock", name, -1, "image is in use by another process (advisory lock held)", syscall.EWOULDBLOCK)
			}
			ino.exclusive = true
			lock = lockExclusive
		} else {
			if ino.exclusive {
				return nil, newErr("lock", name, -1, "image is in use by another process (advisory lock held)", syscall.EWOULDBLOCK)
			}
			ino.shared++
			lock = lockShared
		}
	}
	if flag&driver.Truncate != 0 {
		ino.mu.Lock()
		ino.truncateLocked(0)
		ino.mu.Unlock()
	}
	return &file{fs: fsys, ino: ino, name: name, writable: writable, lock: lock}, nil
}

// Remove removes the file name. Directories are implicit and never empty,
// so removing one fails with ENOTEMPTY. Open handles of a removed file keep
// working on its content.
func (fsys *FS) Remove(name string) error {
	cname := CleanName(name)
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	if _, ok := fsys.files[cname]; ok {
		delete(fsys.files, cname)
		return nil
	}
	if fsys.isDirLocked(cname) {
		return newErr("remove", name, -1, "", syscall.ENOTEMPTY)
	}
	return newErr("remove", name, -1, "", syscall.ENOENT)
}

// Rename renames the file or directory oldName to newName. A file replaces
// an existing file newName; a directory moves with everything below it and
// newName must not exist. Open handles and locks follow the file.
func (fsys *FS) Rename(oldName, newName string) error {
	cold, cnew := CleanName(oldName), CleanName(newName)
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	fail := func(reason string, en syscall.Errno) error {
		return newErr("rename", oldName, -1, strings.TrimSpace("to "+newName+" "+reason), en)
	}
	if cold == cnew {
		if _, ok := fsys.files[cold]; ok || fsys.isDirLocked(cold) {
			return nil
		}
		return fail("", syscall.ENOENT)
	}
	if p := fsys.parentFileLocked(cnew); p != "" {
		return fail(p+" is not a directory", syscall.ENOTDIR)
	}
	if ino, ok := fsys.files[cold]; ok {
		if fsys.isDirLocked(cnew) {
			return fail("", syscall.EISDIR)
		}
		delete(fsys.files, cold)
		fsys.files[cnew] = ino
		return nil
	}
	if !fsys.isDirLocked(cold) || cold == "/" {
		return fail("", syscall.ENOENT)
	}
	if strings.HasPrefix(cnew, cold+"/") {
		return fail("(into itself)", syscall.EINVAL)
	}
	if _, ok := fsys.files[cnew]; ok {
		return fail("", syscall.ENOTDIR)
	}
	if fsys.isDirLocked(cnew) {
		return fail("", syscall.ENOTEMPTY)
	}
	prefix := cold + "/"
	moved := make(map[string]*inode)
	for n, ino := range fsys.files {
		if strings.HasPrefix(n, prefix) {
			moved[cnew+"/"+n[len(prefix):]] = ino
			delete(fsys.files, n)
		}
	}
	for n, ino := range moved {
		fsys.files[n] = ino
	}
	return nil
}

// Stat describes name. Name in the result is the base name. Directories
// have size 0, Allocated 0 and a zero ModTime.
func (fsys *FS) Stat(name string) (driver.FileInfo, error) {
	cname := CleanName(name)
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	if ino, ok := fsys.files[cname]; ok {
		ino.mu.RLock()
		defer ino.mu.RUnlock()
		return driver.FileInfo{
			Name:      path.Base(cname),
			Size:      ino.size,
			Allocated: int64(len(ino.pages)) * PageSize,
			ModTime:   ino.modTime,
		}, nil
	}
	if fsys.isDirLocked(cname) {
		return driver.FileInfo{Name: path.Base(cname), IsDir: true}, nil
	}
	return driver.FileInfo{}, newErr("stat", name, -1, "", syscall.ENOENT)
}

// FreeSpace reports DefaultFreeSpace for any name: memfs has no limit.
func (fsys *FS) FreeSpace(name string) (int64, error) { return DefaultFreeSpace, nil }

// List returns the sorted base names of the entries directly in dir.
func (fsys *FS) List(dir string) ([]string, error) {
	cdir := CleanName(dir)
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	if _, ok := fsys.files[cdir]; ok {
		return nil, newErr("list", dir, -1, "", syscall.ENOTDIR)
	}
	prefix := cdir + "/"
	if cdir == "/" {
		prefix = "/"
	}
	seen := make(map[string]bool)
	for n := range fsys.files {
		if rest, ok := strings.CutPrefix(n, prefix); ok {
			if i := strings.IndexByte(rest, '/'); i >= 0 {
				rest = rest[:i]
			}
			seen[rest] = true
		}
	}
	if len(seen) == 0 && cdir != "/" {
		return nil, newErr("list", dir, -1, "", syscall.ENOENT)
	}
	names := make([]string, 0, len(seen))
	for n := range seen {
		names = append(names, n)
	}
	slices.Sort(names)
	return names, nil
}

// SetReadOnly marks the file name read-only (like chmod a-w): later
// ReadWrite opens fail with a permission error. Handles already open are
// not affected. It does nothing if name is not a file.
func (fsys *FS) SetReadOnly(name string, ro bool) {
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	if ino, ok := fsys.files[CleanName(name)]; ok {
		ino.readOnly = ro
	}
}

// Clone returns a deep copy of the storage: every file's content, size,
// modification time and read-only mark. Locks are not copied (the clone has
// no open files).
func (fsys *FS) Clone() *FS {
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	c := New()
	for n, ino := range fsys.files {
		c.files[n] = ino.clone()
	}
	return c
}

// Names returns the cleaned names of all files, sorted (useful in tests).
func (fsys *FS) Names() []string {
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	names := make([]string, 0, len(fsys.files))
	for n := range fsys.files {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// ReadFile returns the whole content of the file name (useful in tests).
func (fsys *FS) ReadFile(name string) ([]byte, error) {
	fsys.mu.Lock()
	ino, ok := fsys.files[CleanName(name)]
	fsys.mu.Unlock()
	if !ok {
		return nil, newErr("read", name, -1, "", syscall.ENOENT)
	}
	ino.mu.RLock()
	defer ino.mu.RUnlock()
	if ino.size > 1<<32 {
		return nil, newErr("read", name, -1, "file too large to read whole", syscall.EFBIG)
	}
	b := make([]byte, ino.size)
	ino.readLocked(b, 0)
	return b, nil
}

// WriteFile creates or replaces the file name with data (useful in tests).
// It ignores locks and the read-only mark.
func (fsys *FS) WriteFile(name string, data []byte) error {
	cname := CleanName(name)
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	ino := fsys.files[cname]
	if ino == nil {
		if fsys.isDirLocked(cname) {
			return newErr("write", name, -1, "is a directory", syscall.EISDIR)
		}
		if p := fsys.parentFileLocked(cname); p != "" {
			return newErr("write", name, -1, p+" is not a directory", syscall.ENOTDIR)
		}
		ino = newInode()
		fsys.files[cname] = ino
	}
	ino.mu.Lock()
	defer ino.mu.Unlock()
	ino.truncateLocked(0)
	ino.writeLocked(data, 0)
	return nil
}

// closedErr reports use of a closed file; it matches fs.ErrClosed.
func closedErr(op, name string) error {
	return &driver.Error{Op: op, File: name, Offset: -1, Err: fs.ErrClosed}
}

// modNow is the clock for modification times.
var modNow = time.Now
