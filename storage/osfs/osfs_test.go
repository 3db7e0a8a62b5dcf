package osfs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vdisk/vdisk/driver"
)

const mib = 1 << 20

func mustOpen(t *testing.T, name string, flag driver.OpenFlag) *File {
	t.Helper()
	f, err := New().Open(name, flag)
	if err != nil {
		t.Fatalf("Open(%q, %#x): %v", name, flag, err)
	}
	t.Cleanup(func() { f.Close() })
	return f.(*File)
}

// randomFile writes n bytes of seed's random stream to name and opens it
// read-only; it returns the bytes and the file.
func randomFile(t *testing.T, name string, n int, seed byte) ([]byte, *File) {
	t.Helper()
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{seed}).Read(b)
	if err := os.WriteFile(name, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return b, mustOpen(t, name, driver.ReadOnly)
}

func mustWrite(t *testing.T, f driver.File, p []byte, off int64) {
	t.Helper()
	if n, err := f.WriteAt(p, off); err != nil || n != len(p) {
		t.Fatalf("WriteAt(%d bytes, %d) = %d, %v", len(p), off, n, err)
	}
}

func readAll(t *testing.T, f driver.File, off, n int64) []byte {
	t.Helper()
	b := make([]byte, n)
	if err := driver.ReadFullAt(f, b, off); err != nil {
		t.Fatalf("ReadAt(%d, %d): %v", n, off, err)
	}
	return b
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i%253) + seed | 1
	}
	return b
}

func allocated(t *testing.T, f driver.File) int64 {
	t.Helper()
	n, err := f.(driver.AllocatedSizer).AllocatedSize()
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestReadWriteRoundTrip(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name string
		off  int64
		data []byte
	}{
		{"start", 0, []byte("hello")},
		{"unaligned", 12345, pattern(10000, 1)},
		{"large", 3 * mib, pattern(2*mib+17, 2)},
		{"far (sparse)", 1 << 40, []byte("far away")},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			name := filepath.Join(dir, fmt.Sprint(i))
			f := mustOpen(t, name, driver.ReadWrite|driver.Create)
			if f.Name() != name {
				t.Fatalf("Name = %q", f.Name())
			}
			mustWrite(t, f, tc.data, tc.off)
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
			end := tc.off + int64(len(tc.data))
			if size, err := f.Size(); err != nil || size != end {
				t.Fatalf("Size = %d, %v; want %d", size, err, end)
			}
			if got := readAll(t, f, tc.off, int64(len(tc.data))); !bytes.Equal(got, tc.data) {
				t.Fatal("read back differs")
			}
			if tc.off > 0 {
				if got := readAll(t, f, tc.off-1, 1); got[0] != 0 {
					t.Fatal("byte before the write is not zero")
				}
			}
			buf := make([]byte, 20)
			n, err := f.ReadAt(buf, end-5)
			if n != 5 || err != io.EOF {
				t.Fatalf("ReadAt across EOF = %d, %v; want 5, io.EOF", n, err)
			}
			// Reopen read-only and compare.
			f.Close()
			g := mustOpen(t, name, driver.ReadOnly)
			if got := readAll(t, g, tc.off, int64(len(tc.data))); !bytes.Equal(got, tc.data) {
				t.Fatal("read back after reopen differs")
			}
		})
	}
}

func TestOpenFlagsAndErrors(t *testing.T) {
	dir := t.TempDir()
	existing := filepath.Join(dir, "existing")
	if err := os.WriteFile(existing, []byte("content"), 0o644); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.img")
	tests := []struct {
		name string
		file string
		flag driver.OpenFlag
		is   []error
		msg  []string
	}{
		{"missing", missing, driver.ReadOnly,
			[]error{driver.ErrNotFound, fs.ErrNotExist, syscall.ENOENT}, []string{missing, "no such file"}},
		{"missing rw", missing, driver.ReadWrite,
			[]error{driver.ErrNotFound, fs.ErrNotExist}, []string{missing}},
		{"missing dir", filepath.Join(dir, "nodir", "x"), driver.ReadWrite | driver.Create,
			[]error{driver.ErrNotFound, fs.ErrNotExist}, []string{"nodir"}},
		{"directory ro", dir, driver.ReadOnly,
			[]error{syscall.EISDIR}, []string{dir, "is a directory"}},
		{"directory rw", dir, driver.ReadWrite,
			[]error{syscall.EISDIR}, []string{dir, "is a directory"}},
		{"excl exists", existing, driver.ReadWrite | driver.Create | driver.Excl,
			[]error{fs.ErrExist}, []string{existing}},
		{"truncate needs rw", existing, driver.Truncate,
			[]error{driver.ErrInvalidOption}, []string{existing, "Truncate"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f, err := New().Open(tc.file, tc.flag)
			if err == nil {
				f.Close()
				t.Fatal("Open succeeded")
			}
			for _, target := range tc.is {
				if !errors.Is(err, target) {
					t.Errorf("error %q does not match %v", err, target)
				}
			}
			var de *driver.Error
			if !errors.As(err, &de) {
				t.Errorf("error %T is not a *driver.Error", err)
			}
			for _, m := range tc.msg {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("error %q does not contain %q", err, m)
				}
			}
			// The file name appears once, not repeated by the OS error.
			if strings.Count(err.Error(), tc.file) != 1 {
				t.Errorf("error %q should name %q exactly once", err, tc.file)
			}
		})
	}
	t.Run("create and truncate", func(t *testing.T) {
		name := filepath.Join(dir, "new")
		f := mustOpen(t, name, driver.ReadWrite|driver.Create|driver.Excl)
		mustWrite(t, f, []byte("abc"), 0)
		f.Close()
		f = mustOpen(t, name, driver.ReadWrite|driver.Create)
		if size, _ := f.Size(); size != 3 {
			t.Fatalf("Create without Truncate changed size to %d", size)
		}
		f.Close()
		f = mustOpen(t, name, driver.ReadWrite|driver.Truncate)
		if size, _ := f.Size(); size != 0 {
			t.Fatalf("Truncate left size %d", size)
		}
		f.Close()
		// An empty file is not truncated again (on ext4 that would make
		// close write the file back): ftruncate would set its mtime.
		old := time.Now().Add(-time.Hour).Truncate(time.Second)
		if err := os.Chtimes(name, old, old); err != nil {
			t.Fatal(err)
		}
		f = mustOpen(t, name, driver.ReadWrite|driver.Create|driver.Truncate)
		f.Close()
		fi, err := os.Stat(name)
		if err != nil {
			t.Fatal(err)
		}
		if !fi.ModTime().Equal(old) {
			t.Fatalf("Truncate of an empty file set its mtime to %v; want it untouched (%v)", fi.ModTime(), old)
		}
	})
	t.Run("read-only handle", func(t *testing.T) {
		f := mustOpen(t, existing, driver.ReadOnly)
		if _, err := f.WriteAt([]byte("x"), 0); err == nil || !strings.Contains(err.Error(), existing) {
			t.Fatalf("write to read-only handle: %v", err)
		}
	})
	t.Run("closed file", func(t *testing.T) {
		f, err := New().Open(existing, driver.ReadOnly)
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
		if _, err := f.Size(); !errors.Is(err, fs.ErrClosed) {
			t.Errorf("Size after Close: %v", err)
		}
		if _, err := f.ReadAt(make([]byte, 1), 0); !errors.Is(err, fs.ErrClosed) {
			t.Errorf("ReadAt after Close: %v", err)
		}
		if err := f.Close(); !errors.Is(err, fs.ErrClosed) {
			t.Errorf("second Close: %v", err)
		}
	})
}

// TestReadOnlyFile opens a file the process may not write. As root,
// permission bits do not stop writes: the open then runs on a thread that
// has dropped CAP_DAC_OVERRIDE (capabilities are per thread), or, where
// capset is denied, on a file made immutable (chattr +i). Neither being
// possible fails the test: it must run in CI, which runs as root.
func TestReadOnlyFile(t *testing.T) {
	name := filepath.Join(t.TempDir(), "ro.img")
	if err := os.WriteFile(name, []byte("data"), 0o444); err != nil {
		t.Fatal(err)
	}
	open := func() error { _, err := New().Open(name, driver.ReadWrite); return err }
	var err error
	if os.Geteuid() == 0 {
		var capErr error
		err, capErr = withoutDACOverride(open)
		if capErr != nil {
			if ierr := setImmutable(name, true); ierr != nil {
				t.Fatalf("running as root and can neither drop CAP_DAC_OVERRIDE (%v) nor make the file immutable (%v)", capErr, ierr)
			}
			t.Cleanup(func() { setImmutable(name, false) })
			err = open()
		}
	} else {
		err = open()
	}
	if !errors.Is(err, fs.ErrPermission) {
		t.Fatalf("ReadWrite open of a read-only file: %v, want a permission error", err)
	}
	if !strings.Contains(err.Error(), name) {
		t.Fatalf("error %q does not name the file", err)
	}
	f := mustOpen(t, name, driver.ReadOnly)
	if got := readAll(t, f, 0, 4); string(got) != "data" {
		t.Fatalf("content %q", got)
	}
}

// withoutDACOverride runs fn on a thread of its own whose effective
// capabilities lack CAP_DAC_OVERRIDE and CAP_FOWNER, so permission bits
// bind root there. The thread is never unlocked, so it exits with the
// goroutine and no other goroutine runs on it. capErr reports that the
// capabilities could not be dropped (fn did not run).
func withoutDACOverride(fn func() error) (err, capErr error) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var data [2]unix.CapUserData
		if capErr = unix.Capget(&hdr, &data[0]); capErr != nil {
			return
		}
		drop := uint32(1<<unix.CAP_DAC_OVERRIDE | 1<<unix.CAP_DAC_READ_SEARCH | 1<<unix.CAP_FOWNER)
		data[0].Effective &^= drop
		if capErr = unix.Capset(&hdr, &data[0]); capErr != nil {
			return
		}
		err = fn()
	}()
	<-done
	return err, capErr
}

func setImmutable(name string, on bool) error {
	f, err := os.Open(name)
	if err != nil {
		return err
	}
	defer f.Close()
	flags, err := unix.IoctlGetInt(int(f.Fd()), unix.FS_IOC_GETFLAGS)
	if err != nil {
		return err
	}
	if on {
		flags |= fsImmutableFL
	} else {
		flags &^= fsImmutableFL
	}
	return unix.IoctlSetPointerInt(int(f.Fd()), unix.FS_IOC_SETFLAGS, flags)
}

func TestLocks(t *testing.T) {
	rw, ro := driver.ReadWrite, driver.ReadOnly
	tests := []struct {
		name          string
		first, second driver.OpenFlag
		busy          bool
	}{
		{"rw+rw", rw, rw, true},
		{"rw+ro", rw, ro, true},
		{"ro+rw", ro, rw, true},
		{"ro+ro", ro, ro, false},
		{"nolock rw + rw", rw | driver.NoLock, rw, false},
		{"rw + nolock rw", rw, rw | driver.NoLock, false},
		{"rw + nolock ro", rw, ro | driver.NoLock, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			name := filepath.Join(t.TempDir(), "img")
			if err := os.WriteFile(name, []byte("keep"), 0o644); err != nil {
				t.Fatal(err)
			}
			f1 := mustOpen(t, name, tc.first)
			f2, err := New().Open(name, tc.second)
			if !tc.busy {
				if err != nil {
					t.Fatalf("second open: %v", err)
				}
				f2.Close()
				return
			}
			if !errors.Is(err, driver.ErrBusy) {
				t.Fatalf("second open: %v, want ErrBusy", err)
			}
			if msg := err.Error(); !strings.Contains(msg, name) || !strings.Contains(msg, "in use by another process") {
				t.Fatalf("error %q should name the file and say it is in use", msg)
			}
			// A refused Truncate open must not truncate.
			if tc.second&driver.ReadWrite != 0 {
				if _, err := New().Open(name, tc.second|driver.Truncate); !errors.Is(err, driver.ErrBusy) {
					t.Fatalf("truncating open: %v", err)
				}
				if b, _ := os.ReadFile(name); string(b) != "keep" {
					t.Fatalf("locked file was truncated: %q", b)
				}
			}
			// Closing the holder releases the lock.
			f1.Close()
			f2, err = New().Open(name, tc.second)
			if err != nil {
				t.Fatalf("open after release: %v", err)
			}
			f2.Close()
		})
	}
}

// holesSupported reports whether the file system under dir records holes.
func holesSupported(t *testing.T, dir string) bool {
	f := mustOpen(t, filepath.Join(dir, "probe"), driver.ReadWrite|driver.Create)
	if err := f.Truncate(mib); err != nil {
		t.Fatal(err)
	}
	off, err := f.SeekHole(0)
	return err == nil && off == 0
}

func TestSeekDataHole(t *testing.T) {
	dir := t.TempDir()
	if !holesSupported(t, dir) {
		t.Skip("the file system under TempDir does not report holes")
	}
	f := mustOpen(t, filepath.Join(dir, "sparse"), driver.ReadWrite|driver.Create)
	const size = 16 * mib
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	// Data at [4M, 4M+64K) and [10M, 11M).
	mustWrite(t, f, pattern(64<<10, 3), 4*mib)
	mustWrite(t, f, pattern(mib, 4), 10*mib)
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		off              int64
		data, hole       int64
		dataErr, holeErr error
	}{
		{off: 0, data: 4 * mib, hole: 0},
		{off: 4 * mib, data: 4 * mib, hole: 4*mib + 64<<10},
		{off: 4*mib + 100, data: 4*mib + 100, hole: 4*mib + 64<<10},
		{off: 5 * mib, data: 10 * mib, hole: 5 * mib},
		{off: 10*mib + 1, data: 10*mib + 1, hole: 11 * mib},
		{off: 11 * mib, dataErr: io.EOF, hole: 11 * mib},
		{off: size - 1, dataErr: io.EOF, hole: size - 1},
		{off: size, dataErr: io.EOF, holeErr: io.EOF},
	}
	for _, tc := range tests {
		d, err := f.SeekData(tc.off)
		if err != tc.dataErr || (err == nil && d != tc.data) {
			t.Errorf("SeekData(%d) = %d, %v; want %d, %v", tc.off, d, err, tc.data, tc.dataErr)
		}
		h, err := f.SeekHole(tc.off)
		if err != tc.holeErr || (err == nil && h != tc.hole) {
			t.Errorf("SeekHole(%d) = %d, %v; want %d, %v", tc.off, h, err, tc.hole, tc.holeErr)
		}
	}
	if _, err := f.SeekData(-1); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("SeekData(-1): %v", err)
	}
	// The allocation reflects the two data runs only.
	if a := allocated(t, f); a < mib+64<<10 || a > 2*mib {
		t.Errorf("AllocatedSize = %d for 1.06 MiB of data in a 16 MiB file", a)
	}
}

func TestPunchHole(t *testing.T) {
	dir := t.TempDir()
	f := mustOpen(t, filepath.Join(dir, "punch"), driver.ReadWrite|driver.Create)
	data := pattern(4*mib, 5)
	mustWrite(t, f, data, 0)
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	before := allocated(t, f)
	if err := f.PunchHole(mib, 2*mib); err != nil {
		t.Fatal(err)
	}
	if size, _ := f.Size(); size != 4*mib {
		t.Fatalf("PunchHole changed the size to %d", size)
	}
	want := slices.Clone(data)
	clear(want[mib : 3*mib])
	if got := readAll(t, f, 0, 4*mib); !bytes.Equal(got, want) {
		t.Fatal("content after punch differs")
	}
	// Punching past the end keeps the size.
	if err := f.PunchHole(4*mib-10, mib); err != nil {
		t.Fatal(err)
	}
	if size, _ := f.Size(); size != 4*mib {
		t.Fatalf("PunchHole past EOF changed the size to %d", size)
	}
	if err := f.PunchHole(0, 0); err != nil {
		t.Fatalf("empty punch: %v", err)
	}
	if err := f.PunchHole(-1, 10); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("negative punch: %v", err)
	}
	if !holesSupported(t, dir) {
		t.Skip("no hole support: allocation not checked")
	}
	if after := allocated(t, f); after > before-2*mib+64<<10 {
		t.Fatalf("AllocatedSize %d -> %d: punching 2 MiB did not free it", before, after)
	}
}

func TestZeroRangeAllocate(t *testing.T) {
	dir := t.TempDir()
	f := mustOpen(t, filepath.Join(dir, "z"), driver.ReadWrite|driver.Create)
	data := pattern(2*mib, 6)
	mustWrite(t, f, data, 0)
	if err := f.ZeroRange(100, mib); err != nil {
		t.Fatal(err)
	}
	want := slices.Clone(data)
	clear(want[100 : 100+mib])
	if got := readAll(t, f, 0, 2*mib); !bytes.Equal(got, want) {
		t.Fatal("ZeroRange content differs")
	}
	// Past the end, ZeroRange extends the file.
	if err := f.ZeroRange(2*mib, mib); err != nil {
		t.Fatal(err)
	}
	if size, _ := f.Size(); size != 3*mib {
		t.Fatalf("size after ZeroRange = %d", size)
	}
	err := f.Allocate(3*mib, 5*mib)
	if errors.Is(err, driver.ErrUnsupported) {
		t.Skip("fallocate unsupported here")
	}
	if err != nil {
		t.Fatal(err)
	}
	if size, _ := f.Size(); size != 8*mib {
		t.Fatalf("size after Allocate = %d", size)
	}
	if a := allocated(t, f); a < 8*mib {
		t.Fatalf("AllocatedSize after Allocate = %d", a)
	}
	if got := readAll(t, f, 3*mib, 5*mib); !driver.IsZero(got) {
		t.Fatal("allocated range is not zero")
	}
	if got := readAll(t, f, 0, 2*mib); !bytes.Equal(got, want) {
		t.Fatal("Allocate changed data")
	}
}

func TestWriteZerosFallback(t *testing.T) {
	f := mustOpen(t, filepath.Join(t.TempDir(), "w"), driver.ReadWrite|driver.Create)
	mustWrite(t, f, pattern(3*mib, 7), 0)
	if err := f.writeZeros(10, 2*mib+5); err != nil {
		t.Fatal(err)
	}
	want := pattern(3*mib, 7)
	clear(want[10 : 10+2*mib+5])
	if got := readAll(t, f, 0, 3*mib); !bytes.Equal(got, want) {
		t.Fatal("writeZeros content differs")
	}
	if z := zeroBuf(); uintptr(unsafe.Pointer(&z[0]))%4096 != 0 || !driver.IsZero(z) {
		t.Fatal("zero buffer misaligned or dirty")
	}
}

func alignedBuf(n int) []byte {
	b := make([]byte, n+4096)
	shift := (4096 - int(uintptr(unsafe.Pointer(&b[0]))%4096)) % 4096
	return b[shift : shift+n]
}

func TestDirect(t *testing.T) {
	name := filepath.Join(t.TempDir(), "direct")
	f := mustOpen(t, name, driver.ReadWrite|driver.Create|driver.Direct)
	buf := alignedBuf(64 << 10)
	copy(buf, pattern(len(buf), 8))
	mustWrite(t, f, buf, 1<<20)
	got := alignedBuf(len(buf))
	if err := driver.ReadFullAt(f, got, 1<<20); err != nil || !bytes.Equal(got, buf) {
		t.Fatalf("direct read back differs (%v)", err)
	}
	var fl int
	if err := f.control(func(fd int) (err error) {
		fl, err = unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if got := fl&unix.O_DIRECT != 0; got != f.Direct() {
		t.Fatalf("O_DIRECT set = %v, Direct() = %v", got, f.Direct())
	}
	if f.Direct() {
		// Aligned fallback zeroing works with O_DIRECT.
		if err := f.writeZeros(1<<20, 8192); err != nil {
			t.Fatalf("zero write on O_DIRECT file: %v", err)
		}
	} else {
		t.Log("file system refused O_DIRECT; file opened buffered")
	}
	g := mustOpen(t, name, driver.ReadOnly|driver.NoLock)
	if g.Direct() {
		t.Fatal("Direct() true without driver.Direct")
	}
}

func TestStorageOps(t *testing.T) {
	dir := t.TempDir()
	st := New()
	for _, n := range []string{"b.img", "a.img", "c"} {
		if err := os.WriteFile(filepath.Join(dir, n), pattern(8192, 9), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Run("list", func(t *testing.T) {
		got, err := st.List(dir)
		if want := []string{"a.img", "b.img", "c", "sub"}; err != nil || !slices.Equal(got, want) {
			t.Fatalf("List = %q, %v; want %q", got, err, want)
		}
		if _, err := st.List(filepath.Join(dir, "nope")); !errors.Is(err, driver.ErrNotFound) {
			t.Fatalf("List missing: %v", err)
		}
	})
	t.Run("stat", func(t *testing.T) {
		fi, err := st.Stat(filepath.Join(dir, "a.img"))
		if err != nil || fi.Name != "a.img" || fi.Size != 8192 || fi.IsDir || fi.Allocated < 8192 || fi.ModTime.IsZero() {
			t.Fatalf("Stat file = %+v, %v", fi, err)
		}
		fi, err = st.Stat(filepath.Join(dir, "sub"))
		if err != nil || !fi.IsDir {
			t.Fatalf("Stat dir = %+v, %v", fi, err)
		}
		missing := filepath.Join(dir, "zz")
		_, err = st.Stat(missing)
		if !errors.Is(err, driver.ErrNotFound) || !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), missing) {
			t.Fatalf("Stat missing: %v", err)
		}
	})
	t.Run("free space", func(t *testing.T) {
		var want unix.Statfs_t
		if err := unix.Statfs(dir, &want); err != nil {
			t.Fatal(err)
		}
		for _, n := range []string{dir, filepath.Join(dir, "a.img"), filepath.Join(dir, "not-yet.img")} {
			free, err := st.FreeSpace(n)
			if err != nil || free <= 0 {
				t.Errorf("FreeSpace(%q) = %d, %v", n, free, err)
			}
			// Allow for other activity on the file system.
			if exp := int64(want.Bavail) * int64(want.Bsize); free > exp+64*mib || free < exp-64*mib {
				t.Errorf("FreeSpace(%q) = %d, statfs says %d", n, free, exp)
			}
		}
		if _, err := st.FreeSpace(filepath.Join(dir, "no", "such", "dir")); !errors.Is(err, driver.ErrNotFound) {
			t.Errorf("FreeSpace in missing dir: %v", err)
		}
	})
	t.Run("rename", func(t *testing.T) {
		if err := st.Rename(filepath.Join(dir, "c"), filepath.Join(dir, "d")); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(filepath.Join(dir, "d")); err != nil {
			t.Fatal(err)
		}
		err := st.Rename(filepath.Join(dir, "c"), filepath.Join(dir, "e"))
		if !errors.Is(err, driver.ErrNotFound) || !strings.Contains(err.Error(), filepath.Join(dir, "c")) {
			t.Fatalf("rename missing: %v", err)
		}
	})
	t.Run("remove", func(t *testing.T) {
		name := filepath.Join(dir, "b.img")
		if err := st.Remove(name); err != nil {
			t.Fatal(err)
		}
		err := st.Remove(name)
		if !errors.Is(err, driver.ErrNotFound) || !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), name) {
			t.Fatalf("second remove: %v", err)
		}
	})
}

func TestConcurrentIO(t *testing.T) {
	f := mustOpen(t, filepath.Join(t.TempDir(), "c"), driver.ReadWrite|driver.Create)
	const workers, chunk, rounds = 8, 10000, 20
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			data := pattern(chunk, byte(w))
			buf := make([]byte, chunk)
			for i := range rounds {
				off := int64((i*workers + w) * chunk)
				if _, err := f.WriteAt(data, off); err != nil {
					t.Error(err)
					return
				}
				if err := driver.ReadFullAt(f, buf, off); err != nil || !bytes.Equal(buf, data) {
					t.Errorf("worker %d: read back differs (%v)", w, err)
					return
				}
				f.SeekData(0)
				f.SeekHole(off)
				f.Size()
				f.AllocatedSize()
			}
		}()
	}
	wg.Wait()
	for w := range workers {
		for i := range rounds {
			if got := readAll(t, f, int64((i*workers+w)*chunk), chunk); !bytes.Equal(got, pattern(chunk, byte(w))) {
				t.Fatalf("worker %d round %d: final content differs", w, i)
			}
		}
	}
}

// fsImmutableFL is FS_IMMUTABLE_FL from linux/fs.h (not in x/sys/unix).
const fsImmutableFL = 0x00000010
