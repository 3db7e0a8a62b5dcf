package osfs

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/xfstest"
)

// TestCopyFrom: the kernel copy moves the bytes at any (also unaligned)
// offsets, extends the target, stops short at the source's end, and
// refuses a source that is not a local file or is read-only as
// driver.ErrUnsupported / an error without copying.
func TestCopyFrom(t *testing.T) {
	defer SetCopyRangePolicy(SetCopyRangePolicy(CopyRangeAlways))
	dir := t.TempDir()
	want, src := randomFile(t, filepath.Join(dir, "src"), 3*mib+777, 1)
	defer src.Close()
	dst := mustOpen(t, filepath.Join(dir, "dst"), driver.ReadWrite|driver.Create)
	defer dst.Close()
	for _, c := range []struct{ srcOff, off, n int64 }{
		{0, 0, mib},                     // aligned: a reflink where the file system shares blocks
		{mib, mib + 512, 4096},          // unaligned target
		{2*mib + 3, 5 * mib, mib + 774}, // unaligned source, past the target's end
	} {
		n, err := dst.CopyFrom(src, c.srcOff, c.off, c.n)
		if err != nil || n != c.n {
			t.Fatalf("CopyFrom(%d, %d, %d) = %d, %v", c.srcOff, c.off, c.n, n, err)
		}
		got := make([]byte, c.n)
		if _, err := dst.ReadAt(got, c.off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want[c.srcOff:c.srcOff+c.n]) {
			t.Fatalf("CopyFrom(%d, %d, %d): content differs", c.srcOff, c.off, c.n)
		}
	}
	// Past the source's end: a short count, no error.
	if n, err := dst.CopyFrom(src, int64(len(want))-100, 0, 4096); err != nil || n != 100 {
		t.Fatalf("copy over the source's end: %d, %v; want 100, nil", n, err)
	}
	// A source of another kind is refused as unsupported.
	other := &struct{ driver.File }{src}
	if n, err := dst.CopyFrom(other, 0, 0, 4096); n != 0 || !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("copy from a foreign file: %d, %v; want ErrUnsupported", n, err)
	}
	// A read-only target fails.
	if n, err := src.CopyFrom(dst, 0, 0, 4096); n != 0 || err == nil {
		t.Fatalf("copy into a read-only file: %d, %v", n, err)
	}
}

// TestCopyFromOtherFileSystem: between file systems that do not copy to
// each other (tmpfs to the test directory's, where that is another file
// system) copy_file_range fails with EXDEV, reported as
// driver.ErrUnsupported with nothing copied, so callers fall back.
func TestCopyFromOtherFileSystem(t *testing.T) {
	defer SetCopyRangePolicy(SetCopyRangePolicy(CopyRangeAlways))
	dir := t.TempDir()
	var a, b unix.Statfs_t
	if unix.Statfs(dir, &a) != nil || unix.Statfs("/dev/shm", &b) != nil || a.Type == b.Type {
		t.Skip("needs /dev/shm on a file system of another type than the test directory's")
	}
	shm, err := os.MkdirTemp("/dev/shm", "osfs-copy")
	if err != nil {
		t.Skip("cannot write /dev/shm")
	}
	defer os.RemoveAll(shm)
	srcName := filepath.Join(shm, "src")
	if err := os.WriteFile(srcName, bytes.Repeat([]byte{7}, 8192), 0o644); err != nil {
		t.Fatal(err)
	}
	src := mustOpen(t, srcName, driver.ReadOnly)
	defer src.Close()
	dst := mustOpen(t, filepath.Join(dir, "dst"), driver.ReadWrite|driver.Create)
	defer dst.Close()
	n, err := dst.CopyFrom(src, 0, 0, 8192)
	if n != 0 || !errors.Is(err, driver.ErrUnsupported) || !errors.Is(err, unix.EXDEV) {
		t.Fatalf("cross-file-system copy: %d, %v; want 0 and ErrUnsupported wrapping EXDEV", n, err)
	}
	if sz, _ := dst.Size(); sz != 0 {
		t.Fatalf("refused copy left %d bytes", sz)
	}
}

// TestCopyRangePolicy: under CopyRangeAuto, on a file system whose
// copy_file_range is the kernel's page-cache copy (ext4, tmpfs: the test
// directory's and /dev/shm are tried), an unaligned copy (no reflink can
// apply) is refused as driver.ErrUnsupported with nothing copied and the
// target unchanged; the same copy goes through under CopyRangeAlways. On
// a file system that copies on its own the copy goes through either way.
func TestCopyRangePolicy(t *testing.T) {
	dirs := []string{t.TempDir()}
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		shm, err := os.MkdirTemp("/dev/shm", "vdisk-osfs-")
		if err != nil {
			t.Fatal(err)
		}
		defer os.RemoveAll(shm)
		dirs = append(dirs, shm)
	}
	var splicing int
	for _, dir := range dirs {
		copies, err := FileSystemCopies(dir)
		if err != nil {
			t.Fatal(err)
		}
		if !copies {
			splicing++
		}
		want, src := randomFile(t, filepath.Join(dir, "src"), 3*4096, 2)
		dst := mustOpen(t, filepath.Join(dir, "dst"), driver.ReadWrite|driver.Create)
		for _, p := range []CopyRangePolicy{CopyRangeAuto, CopyRangeAlways} {
			old := SetCopyRangePolicy(p)
			n, err := dst.CopyFrom(src, 100, 0, 5000)
			SetCopyRangePolicy(old)
			if p == CopyRangeAuto && !copies {
				if n != 0 || !errors.Is(err, driver.ErrUnsupported) {
					t.Fatalf("%s, auto: CopyFrom = %d, %v; want ErrUnsupported", dir, n, err)
				}
				if size, _ := dst.Size(); size != 0 {
					t.Fatalf("%s, auto: a refused copy left %d bytes", dir, size)
				}
				continue
			}
			if err != nil || n != 5000 {
				t.Fatalf("%s, policy %d: CopyFrom = %d, %v", dir, p, n, err)
			}
			got := make([]byte, 5000)
			if _, err := dst.ReadAt(got, 0); err != nil || !bytes.Equal(got, want[100:5100]) {
				t.Fatalf("%s, policy %d: content differs (%v)", dir, p, err)
			}
		}
		src.Close()
		dst.Close()
	}
	if splicing == 0 {
		t.Fatalf("no splicing file system among %v (/dev/shm is tmpfs): the refusal was not exercised", dirs)
	}
}

// TestCopyFromXFS: on a file system that shares blocks (XFS with
// reflinks), an aligned copy is a clone: ClonedBytes counts it and the
// file system's free space does not shrink; a copy nothing can share
// (source and target offsets off the block grid from each other) is
// refused under CopyRangeAuto, as on ext4 (XFS's copy_file_range would
// splice it through the page cache), and copied under CopyRangeAlways.
func TestCopyFromXFS(t *testing.T) {
	dir := xfstest.Dir(t)
	if copies, err := FileSystemCopies(dir); err != nil || copies {
		t.Fatalf("FileSystemCopies(XFS) = %v, %v; want false (it shares blocks, it does not copy on a server)", copies, err)
	}
	want, src := randomFile(t, filepath.Join(dir, "src"), 4*mib, 3)
	defer src.Close()
	dst := mustOpen(t, filepath.Join(dir, "dst"), driver.ReadWrite|driver.Create)
	defer dst.Close()
	before := xfstest.Used(t, dir)
	n, err := dst.CopyFrom(src, mib, 2*mib, 2*mib)
	if err != nil || n != 2*mib {
		t.Fatalf("aligned CopyFrom = %d, %v", n, err)
	}
	if c := dst.ClonedBytes(); c != 2*mib {
		t.Fatalf("ClonedBytes = %d after an aligned copy of %d", c, 2*mib)
	}
	if used := xfstest.Used(t, dir) - before; used > mib/2 {
		t.Fatalf("the clone of 2 MiB took %d bytes of free space", used)
	}
	got := make([]byte, 2*mib)
	if _, err := dst.ReadAt(got, 2*mib); err != nil || !bytes.Equal(got, want[mib:3*mib]) {
		t.Fatalf("cloned content differs (%v)", err)
	}
	for _, p := range []CopyRangePolicy{CopyRangeAuto, CopyRangeAlways} {
		old := SetCopyRangePolicy(p)
		n, err := dst.CopyFrom(src, 512, 5*mib, 64<<10)
		SetCopyRangePolicy(old)
		if p == CopyRangeAuto {
			if n != 0 || !errors.Is(err, driver.ErrUnsupported) {
				t.Fatalf("auto, unaligned: CopyFrom = %d, %v; want ErrUnsupported", n, err)
			}
			continue
		}
		if err != nil || n != 64<<10 {
			t.Fatalf("always, unaligned: CopyFrom = %d, %v", n, err)
		}
		got := make([]byte, 64<<10)
		if _, err := dst.ReadAt(got, 5*mib); err != nil || !bytes.Equal(got, want[512:512+64<<10]) {
			t.Fatalf("always, unaligned: content differs (%v)", err)
		}
	}
	if c := dst.ClonedBytes(); c != 2*mib {
		t.Fatalf("ClonedBytes = %d; the unaligned copy is not a clone", c)
	}
}
