package osfs

import (
	"errors"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/vdisk/vdisk/driver"
)

// copyChunk bounds one copy_file_range call so that a cancelled copy stops
// soon and progress moves in steps (the kernel copies at most about 2 GiB
// per call anyway).
const copyChunk = 64 << 20

// CopyFrom copies n bytes of src at srcOff to f at off inside the kernel
// and returns the bytes copied. It first asks for a reflink
// (FICLONERANGE: the two files then share the blocks, nothing is copied)
// where the range is block-aligned and the file system shares blocks
// (btrfs, XFS), then copy_file_range(2) where the file system copies on
// the server (NFS, SMB: the data does not cross the network), or
// everywhere under CopyRangeAlways (convert -C), where it still saves the
// copy through user space.
//
// src must be a *File of this package; the copy reads the source's holes
// as zeros and writes them allocated, so callers copy data runs only. A
// copy the kernel cannot do (another storage, EXDEV between file systems
// that refuse it, ENOSYS, EOPNOTSUPP, EINVAL for special files) fails
// with an error wrapping driver.ErrUnsupported before any byte is
// copied: the caller then copies with ReadAt/WriteAt.
func (f *File) CopyFrom(src driver.File, srcOff, off, n int64) (int64, error) {
	s, ok := src.(*File)
	if !ok {
		return 0, driver.Errorf(driver.ErrUnsupported, f.name, off, "copy offload: the source %s is not a local file", src.Name())
	}
	if err := checkRange("copy", f.name, off, n); err != nil {
		return 0, err
	}
	if err := checkRange("copy", s.name, srcOff, n); err != nil {
		return 0, err
	}
	if !f.writable {
		return 0, wrap("copy", f.name, off, "file opened read-only", unix.EBADF)
	}
	var done int64
	err := s.control(func(sfd int) error {
		return f.control(func(dfd int) error {
			if f.tryClone(sfd, dfd, srcOff, off, n) {
				done = n
				return nil
			}
			if !f.copiesInKernel(dfd) {
				return errSpliceOnly
			}
			var err error
			done, err = f.copyRange(sfd, dfd, srcOff, off, n)
			return err
		})
	})
	if err == errSpliceOnly {
		return 0, driver.Errorf(driver.ErrUnsupported, f.name, off,
			"copy offload: this file system would copy through the page cache (copy_file_range without reflinks or a server-side copy); reading and writing is faster")
	}
	if err != nil && done == 0 && offloadRefused(err) {
		return 0, &driver.Error{Op: "copy", File: f.name, Offset: off,
			Reason: "the kernel cannot copy from " + s.name + " here",
			Err:    &osError{err: err, sentinel: driver.ErrUnsupported}}
	}
	return done, wrap("copy", f.name, off+done, "from "+s.name, err)
}

// offloadRefused reports the copy_file_range errors that mean "not here"
// rather than an I/O failure.
func offloadRefused(err error) bool {
	return errors.Is(err, unix.EXDEV) || errors.Is(err, unix.ENOSYS) ||
		errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL) ||
		errors.Is(err, unix.EBADF) || errors.Is(err, unix.EPERM)
}

// noClone is set on a target file once FICLONERANGE failed: a file system
// that cannot share blocks refuses every range, so asking again would only
// cost a syscall per copy.
func (f *File) cloneRefused() bool { return f.noClone.Load() }

// cloneAlign is the alignment FICLONERANGE needs: the file system block
// size; 4 KiB covers ext4, XFS and btrfs on the usual page size.
const cloneAlign = 4096

// tryClone shares [srcOff, srcOff+n) of sfd into dfd at off; false when it
// did not (misaligned, or the file system cannot).
func (f *File) tryClone(sfd, dfd int, srcOff, off, n int64) bool {
	if f.cloneRefused() || f.direct || (srcOff|off|n)%cloneAlign != 0 {
		return false
	}
	err := retryEINTR(func() error {
		return unix.IoctlFileCloneRange(dfd, &unix.FileCloneRange{
			Src_fd: int64(sfd), Src_offset: uint64(srcOff), Src_length: uint64(n), Dest_offset: uint64(off),
		})
	})
	if err != nil {
		// EOPNOTSUPP/ENOTTY (no reflinks), EXDEV (another file system),
		// EINVAL (block size larger than assumed): never retried on this
		// file, except EINVAL which depends on the range.
		if !errors.Is(err, unix.EINVAL) {
			f.noClone.Store(true)
		}
		return false
	}
	f.cloned.Add(n)
	return true
}

// ClonedBytes is the number of bytes CopyFrom shared into f by reflink
// (FICLONERANGE) instead of copying them, since f was opened.
func (f *File) ClonedBytes() int64 { return f.cloned.Load() }

// copyRange runs copy_file_range(2) until n bytes are copied or the source
// ends.
func (f *File) copyRange(sfd, dfd int, srcOff, off, n int64) (int64, error) {
	var done int64
	for done < n {
		so, do := srcOff+done, off+done
		var c int
		err := retryEINTR(func() error {
			var err error
			c, err = unix.CopyFileRange(sfd, &so, dfd, &do, int(min(n-done, copyChunk)), 0)
			return err
		})
		if err != nil {
			return done, err
		}
		if c == 0 {
			break // the source ends: the caller sees the short count
		}
		done += int64(c)
	}
	return done, nil
}

// cloneState is embedded in File.
type cloneState struct {
	noClone atomic.Bool
	cloned  atomic.Int64
	fsKind  atomic.Int32 // 0 not asked yet, fsCopies, fsSplices
}

const (
	fsCopies  = 1 // copy_file_range copies on the server
	fsSplices = 2 // copy_file_range falls back to the kernel's splice copy
)

var errSpliceOnly = errors.New("copy_file_range would splice")

// CopyRangePolicy says when CopyFrom uses copy_file_range(2) after a
// reflink was refused or could not apply.
type CopyRangePolicy int32

const (
	// CopyRangeAuto (the default) uses copy_file_range only on file
	// systems that copy on the server (NFS 4.2, SMB, Ceph, FUSE): the data
	// then does not cross the network. Elsewhere the kernel's copy is its
	// generic page-cache copy (splice), which runs the read and the write
	// of each range in turn under the target's inode lock, and which a
	// read/write pipeline on two cores beats: on ext4 and tmpfs, and also
	// on the file systems that share blocks (XFS, btrfs, bcachefs,
	// OpenZFS, OCFS2) for a range FICLONERANGE could not share (not
	// block-aligned in both files, as a VHD's data area; copy_file_range
	// shares no more than FICLONERANGE does, and splices the rest).
	// CopyFrom then refuses with ErrUnsupported and the caller reads and
	// writes.
	CopyRangeAuto CopyRangePolicy = iota
	// CopyRangeAlways uses copy_file_range wherever the kernel accepts it
	// (qemu-img convert -C).
	CopyRangeAlways
)

var copyRangePolicy atomic.Int32

// SetCopyRangePolicy sets the policy of every File's CopyFrom in this
// process (convert -C sets CopyRangeAlways) and returns the previous one.
func SetCopyRangePolicy(p CopyRangePolicy) CopyRangePolicy {
	return CopyRangePolicy(copyRangePolicy.Swap(int32(p)))
}

// File system magics (statfs f_type) whose copy_file_range copies on the
// server. (Those that share blocks get FICLONERANGE, which shares all that
// their copy_file_range would.)
var copyingFileSystems = map[int64]bool{
	0x6969:     true, // NFS
	0xfe534d42: true, // SMB2
	0xff534d42: true, // CIFS
	0x00c36400: true, // Ceph
	0x65735546: true, // FUSE
}

// FileSystemCopies reports whether the file system holding path copies on
// its own under copy_file_range (on the server), which is where
// CopyRangeAuto uses it.
func FileSystemCopies(path string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false, wrap("statfs", path, -1, "", err)
	}
	return copyingFileSystems[int64(st.Type)], nil
}

// copiesInKernel reports whether copy_file_range on f (descriptor dfd)
// is worth it under the policy; the file system is asked once per file.
func (f *File) copiesInKernel(dfd int) bool {
	if CopyRangePolicy(copyRangePolicy.Load()) == CopyRangeAlways {
		return true
	}
	switch f.fsKind.Load() {
	case fsCopies:
		return true
	case fsSplices:
		return false
	}
	kind := int32(fsSplices)
	var st unix.Statfs_t
	if err := unix.Fstatfs(dfd, &st); err == nil && copyingFileSystems[int64(st.Type)] {
		kind = fsCopies
	}
	f.fsKind.Store(kind)
	return kind == fsCopies
}
