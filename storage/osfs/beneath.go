package osfs

import (
	"errors"
	"os"
	"path"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/vdisk/vdisk/driver"
)

var _ driver.BeneathOpener = FS{}

// OpenBeneath opens rel inside directory dir (driver.BeneathOpener) for the
// strict path policy. Every component of rel is resolved inside dir on the
// real file system: with openat2(RESOLVE_BENEATH|RESOLVE_NO_MAGICLINKS)
// where the kernel has it (Linux 5.6), which lets a symbolic link pass only
// while it stays inside dir; elsewhere by opening one component at a time
// with O_NOFOLLOW, which refuses every symbolic link. The file is opened
// with O_NONBLOCK (a FIFO cannot make the open wait for a writer) and
// O_NOCTTY, then fstat must show a regular file: devices, FIFOs, sockets
// and directories are refused. Flags are those of Open.
func (fs FS) OpenBeneath(dir, rel string, flag driver.OpenFlag) (driver.File, error) {
	if dir == "" {
		dir = "."
	}
	name := filepath.Join(dir, filepath.FromSlash(rel))
	refuse := func(reason string, err error) error {
		return &driver.PathError{Name: rel, Reason: reason, Err: err}
	}
	clean := path.Clean(rel)
	if rel == "" || path.IsAbs(rel) || clean == ".." || strings.HasPrefix(clean, "../") || strings.Contains(rel, "\x00") {
		return nil, refuse("is not a name inside "+dir, nil)
	}
	writable := flag&driver.ReadWrite != 0
	if flag&driver.Truncate != 0 && !writable {
		return nil, driver.Errorf(driver.ErrInvalidOption, name, -1, "open: Truncate requires ReadWrite")
	}
	oflag := unix.O_RDONLY
	if writable {
		oflag = unix.O_RDWR
	}
	var mode uint64
	if flag&driver.Create != 0 {
		oflag |= unix.O_CREAT
		mode = 0o644
		if flag&driver.Excl != 0 {
			oflag |= unix.O_EXCL
		}
	}
	oflag |= unix.O_CLOEXEC | unix.O_NONBLOCK | unix.O_NOCTTY
	dfd, err := openDir(dir)
	if err != nil {
		return nil, wrap("open", dir, -1, "", err)
	}
	defer unix.Close(dfd)
	open := func(oflag int, mode uint64) (int, error) {
		fd, err := -1, error(unix.ENOSYS)
		if !forceWalk {
			fd, err = openat2Beneath(dfd, clean, oflag, mode)
		}
		if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) {
			// No openat2 (an old kernel, or a seccomp filter that
			// denies it).
			fd, err = walkBeneath(dfd, clean, oflag, uint32(mode))
		}
		return fd, err
	}
	// Look before opening: opening some devices has effects of its own
	// (a tape rewinds), so what is not a regular file is refused from an
	// O_PATH descriptor, which opens nothing. The check after the real
	// open below is the one that counts.
	fd, err := open(unix.O_PATH|unix.O_CLOEXEC, 0)
	if err == nil {
		var st unix.Stat_t
		err = unix.Fstat(fd, &st)
		unix.Close(fd)
		if err == nil && st.Mode&unix.S_IFMT != unix.S_IFREG {
			return nil, refuse("is "+fileKind(st.Mode)+", not a regular file", nil)
		}
	}
	if err == nil || flag&driver.Create != 0 && errors.Is(err, unix.ENOENT) {
		fd, err = open(oflag, mode)
	}
	switch {
	case err == nil:
	case errors.Is(err, unix.EXDEV):
		return nil, refuse("leads outside "+dir+" (through a symbolic link)", err)
	case errors.Is(err, unix.ELOOP):
		return nil, refuse("is or passes through a symbolic link that is not allowed here", err)
	case errors.Is(err, unix.ENXIO), errors.Is(err, unix.ENODEV), errors.Is(err, unix.EISDIR):
		// ENXIO: a FIFO without a writer opened for writing; ENODEV: a
		// device without a driver; EISDIR: a directory opened for writing.
		return nil, refuse("is not a regular file", err)
	default:
		return nil, wrap("open", name, -1, "", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, wrap("stat", name, -1, "", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		unix.Close(fd)
		return nil, refuse("is "+fileKind(st.Mode)+", not a regular file", nil)
	}
	// A regular file: back to blocking I/O (O_NONBLOCK only mattered for
	// the open).
	if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0); err == nil {
		_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl&^unix.O_NONBLOCK)
		if err != nil {
			unix.Close(fd)
			return nil, wrap("open", name, -1, "", err)
		}
	}
	osf := os.NewFile(uintptr(fd), name)
	f := &File{f: osf, name: name, writable: writable}
	if err := f.init(flag); err != nil {
		osf.Close()
		return nil, err
	}
	return f, nil
}

// forceWalk makes OpenBeneath walk as on a kernel without openat2 (tests).
var forceWalk bool

func openDir(dir string) (int, error) {
	for {
		fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != unix.EINTR {
			return fd, err
		}
	}
}

// openat2Beneath opens rel under dfd with RESOLVE_BENEATH and
// RESOLVE_NO_MAGICLINKS.
func openat2Beneath(dfd int, rel string, oflag int, mode uint64) (int, error) {
	how := &unix.OpenHow{Flags: uint64(oflag), Mode: mode, Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_MAGICLINKS}
	for {
		fd, err := unix.Openat2(dfd, rel, how)
		if err != unix.EINTR && err != unix.EAGAIN {
			return fd, err
		}
	}
}

// walkBeneath opens rel (clean, relative, without "..") under dfd one
// component at a time, refusing symbolic links anywhere (ELOOP or ENOTDIR
// from O_NOFOLLOW).
func walkBeneath(dfd int, rel string, oflag int, mode uint32) (int, error) {
	parts := strings.Split(rel, "/")
	cur := dfd
	closeCur := func() {
		if cur != dfd {
			unix.Close(cur)
		}
	}
	for _, p := range parts[:len(parts)-1] {
		if p == "." || p == "" {
			continue
		}
		next, err := unix.Openat(cur, p, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			if errors.Is(err, unix.ENOTDIR) {
				// A symbolic link (O_PATH|O_NOFOLLOW opens the link
				// itself, which is no directory) or a file.
				var st unix.Stat_t
				if unix.Fstatat(cur, p, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && st.Mode&unix.S_IFMT == unix.S_IFLNK {
					err = unix.ELOOP
				}
			}
			closeCur()
			return -1, err
		}
		closeCur()
		cur = next
	}
	fd, err := unix.Openat(cur, parts[len(parts)-1], oflag|unix.O_NOFOLLOW, mode)
	closeCur()
	return fd, err
}

func fileKind(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFDIR:
		return "a directory"
	case unix.S_IFCHR:
		return "a character device"
	case unix.S_IFBLK:
		return "a block device"
	case unix.S_IFIFO:
		return "a FIFO"
	case unix.S_IFSOCK:
		return "a socket"
	case unix.S_IFLNK:
		return "a symbolic link"
	}
	return "not a regular file"
}
