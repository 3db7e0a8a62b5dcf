package memfs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/vdisk/vdisk/driver"
)

const ps = PageSize

func mustOpen(t *testing.T, fsys *FS, name string, flag driver.OpenFlag) driver.File {
	t.Helper()
	f, err := fsys.Open(name, flag)
	if err != nil {
		t.Fatalf("Open(%q, %#x): %v", name, flag, err)
	}
	t.Cleanup(func() { f.Close() })
	return f
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

func allocated(t *testing.T, f driver.File) int64 {
	t.Helper()
	n, err := f.(driver.AllocatedSizer).AllocatedSize()
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func fill(n int, b byte) []byte { return bytes.Repeat([]byte{b}, n) }

func TestReadWriteRoundTrip(t *testing.T) {
	tests := []struct {
		name string
		off  int64
		data []byte
	}{
		{"start", 0, []byte("hello")},
		{"within page", 1000, fill(3000, 0x11)},
		{"page aligned full page", ps, fill(ps, 0x22)},
		{"across page boundary", ps - 3, []byte("abcdef")},
		{"across several pages", 3*ps - 10, fill(3*ps+20, 0x33)},
		{"far sparse offset", 1 << 40, []byte("far away")},
		{"empty", 100, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fsys := New()
			f := mustOpen(t, fsys, "disk.img", driver.ReadWrite|driver.Create)
			if n, err := f.WriteAt(tc.data, tc.off); err != nil || n != len(tc.data) {
				t.Fatalf("WriteAt = %d, %v", n, err)
			}
			wantSize := tc.off + int64(len(tc.data))
			if len(tc.data) == 0 {
				wantSize = 0
			}
			if size, _ := f.Size(); size != wantSize {
				t.Fatalf("Size = %d, want %d", size, wantSize)
			}
			if got := readAll(t, f, tc.off, int64(len(tc.data))); !bytes.Equal(got, tc.data) {
				t.Fatalf("read back differs")
			}
			// The bytes before the write read as zeros.
			if tc.off > 0 && len(tc.data) > 0 {
				n := min(tc.off, 4096)
				if got := readAll(t, f, tc.off-n, n); !driver.IsZero(got) {
					t.Fatalf("bytes before the write are not zero")
				}
			}
			// Reading across the end returns the tail and io.EOF.
			if len(tc.data) > 0 {
				buf := make([]byte, len(tc.data)+10)
				n, err := f.ReadAt(buf, tc.off)
				if n != len(tc.data) || err != io.EOF || !bytes.Equal(buf[:n], tc.data) {
					t.Fatalf("ReadAt past end = %d, %v", n, err)
				}
			}
		})
	}
}

func TestReadAtEOF(t *testing.T) {
	fsys := New()
	f := mustOpen(t, fsys, "f", driver.ReadWrite|driver.Create)
	mustWrite(t, f, []byte("abc"), 0)
	for _, tc := range []struct {
		off   int64
		n     int
		wantN int
		err   error
	}{
		{0, 3, 3, nil},
		{0, 4, 3, io.EOF},
		{3, 1, 0, io.EOF},
		{10, 1, 0, io.EOF},
		{10, 0, 0, nil},
	} {
		n, err := f.ReadAt(make([]byte, tc.n), tc.off)
		if n != tc.wantN || err != tc.err {
			t.Errorf("ReadAt(%d bytes at %d) = %d, %v; want %d, %v", tc.n, tc.off, n, err, tc.wantN, tc.err)
		}
	}
	if _, err := f.ReadAt(make([]byte, 1), -1); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("negative offset: %v", err)
	}
}

func TestHugeSparseFile(t *testing.T) {
	fsys := New()
	f := mustOpen(t, fsys, "/big.img", driver.ReadWrite|driver.Create)
	const size = 1 << 40
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, f, []byte{0xff}, size-1)
	if got := allocated(t, f); got != ps {
		t.Fatalf("AllocatedSize = %d, want one page", got)
	}
	hs := f.(driver.HoleSeeker)
	if off, err := hs.SeekData(0); err != nil || off != size-ps {
		t.Fatalf("SeekData(0) = %d, %v; want %d", off, err, int64(size-ps))
	}
	if off, err := hs.SeekHole(0); err != nil || off != 0 {
		t.Fatalf("SeekHole(0) = %d, %v", off, err)
	}
	if off, err := hs.SeekHole(size - 10); err != nil || off != size {
		t.Fatalf("SeekHole(end-10) = %d, %v; want size", off, err)
	}
	if b := readAll(t, f, size-2, 2); !bytes.Equal(b, []byte{0, 0xff}) {
		t.Fatalf("tail = %x", b)
	}
	// Punching the whole file is cheap and frees everything.
	if err := f.PunchHole(0, size); err != nil {
		t.Fatal(err)
	}
	if got := allocated(t, f); got != 0 {
		t.Fatalf("AllocatedSize after punch = %d", got)
	}
	if _, err := hs.SeekData(0); err != io.EOF {
		t.Fatalf("SeekData after punch: %v, want io.EOF", err)
	}
	// Truncating down a huge file is cheap too.
	if err := f.Truncate(ps); err != nil {
		t.Fatal(err)
	}
}

func TestSeekDataHole(t *testing.T) {
	// Layout (pages): 0 hole, 1 data, 2 data, 3 hole (allocated zeros),
	// 4 hole, 5 data (partial, the file ends inside it).
	fsys := New()
	f := mustOpen(t, fsys, "f", driver.ReadWrite|driver.Create)
	mustWrite(t, f, []byte{1}, 1*ps+5)
	mustWrite(t, f, []byte{2}, 2*ps+ps-1)
	if err := f.(driver.Allocator).Allocate(3*ps, ps); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, f, []byte("tail"), 5*ps+100)
	size := int64(5*ps + 104)
	hs := f.(driver.HoleSeeker)
	tests := []struct {
		off      int64
		data     int64
		dataErr  error
		hole     int64
		holeErr  error
		whatData string
	}{
		{off: 0, data: ps, hole: 0},
		{off: 10, data: ps, hole: 10},
		{off: ps, data: ps, hole: 3 * ps},
		{off: ps + 7, data: ps + 7, hole: 3 * ps},
		{off: 3*ps - 1, data: 3*ps - 1, hole: 3 * ps},
		{off: 3 * ps, data: 5 * ps, hole: 3 * ps},
		{off: 4*ps + 1, data: 5 * ps, hole: 4*ps + 1},
		{off: 5 * ps, data: 5 * ps, hole: size},
		{off: size - 1, data: size - 1, hole: size},
		{off: size, dataErr: io.EOF, holeErr: io.EOF},
		{off: size + ps, dataErr: io.EOF, holeErr: io.EOF},
	}
	for _, tc := range tests {
		d, err := hs.SeekData(tc.off)
		if err != tc.dataErr || (err == nil && d != tc.data) {
			t.Errorf("SeekData(%d) = %d, %v; want %d, %v", tc.off, d, err, tc.data, tc.dataErr)
		}
		h, err := hs.SeekHole(tc.off)
		if err != tc.holeErr || (err == nil && h != tc.hole) {
			t.Errorf("SeekHole(%d) = %d, %v; want %d, %v", tc.off, h, err, tc.hole, tc.holeErr)
		}
	}
	if _, err := hs.SeekData(-1); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("SeekData(-1): %v", err)
	}
}

func TestPunchHole(t *testing.T) {
	tests := []struct {
		name      string
		off, n    int64
		wantAlloc int64 // after punching, from 4 written pages
	}{
		{"whole pages", ps, 2 * ps, 2 * ps},
		{"partial page keeps it", 10, 100, 4 * ps},
		{"everything", 0, 4 * ps, 0},
		{"past the end", 3 * ps, 10 * ps, 3 * ps},
		{"unaligned covering two pages", ps / 2, 2 * ps, 3 * ps},
		{"empty", 0, 0, 4 * ps},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fsys := New()
			f := mustOpen(t, fsys, "f", driver.ReadWrite|driver.Create)
			data := make([]byte, 4*ps)
			for i := range data {
				data[i] = byte(i%251 + 1)
			}
			mustWrite(t, f, data, 0)
			if err := f.PunchHole(tc.off, tc.n); err != nil {
				t.Fatal(err)
			}
			if size, _ := f.Size(); size != 4*ps {
				t.Fatalf("size changed to %d", size)
			}
			want := slices.Clone(data)
			clear(want[min(tc.off, 4*ps):min(tc.off+tc.n, 4*ps)])
			if got := readAll(t, f, 0, 4*ps); !bytes.Equal(got, want) {
				t.Fatal("content after punch differs")
			}
			if got := allocated(t, f); got != tc.wantAlloc {
				t.Fatalf("AllocatedSize = %d, want %d", got, tc.wantAlloc)
			}
		})
	}
	t.Run("page becoming all zero is dropped", func(t *testing.T) {
		fsys := New()
		f := mustOpen(t, fsys, "f", driver.ReadWrite|driver.Create)
		mustWrite(t, f, []byte("xy"), 100)
		if err := f.PunchHole(50, 100); err != nil {
			t.Fatal(err)
		}
		if got := allocated(t, f); got != 0 {
			t.Fatalf("AllocatedSize = %d, want 0", got)
		}
	})
}

func TestZeroRangeAllocate(t *testing.T) {
	fsys := New()
	f := mustOpen(t, fsys, "f", driver.ReadWrite|driver.Create)
	mustWrite(t, f, fill(2*ps, 0x77), 0)
	z, a := f.(driver.ZeroRanger), f.(driver.Allocator)

	if err := z.ZeroRange(100, ps); err != nil {
		t.Fatal(err)
	}
	got := readAll(t, f, 0, 2*ps)
	want := fill(2*ps, 0x77)
	clear(want[100 : 100+ps])
	if !bytes.Equal(got, want) {
		t.Fatal("ZeroRange content differs")
	}
	if n := allocated(t, f); n != 2*ps {
		t.Fatalf("ZeroRange changed allocation to %d", n)
	}
	// ZeroRange past the end extends the file and allocates.
	if err := z.ZeroRange(2*ps, 2*ps); err != nil {
		t.Fatal(err)
	}
	if size, _ := f.Size(); size != 4*ps {
		t.Fatalf("size = %d", size)
	}
	if n := allocated(t, f); n != 4*ps {
		t.Fatalf("allocated = %d", n)
	}
	// Allocate keeps data, extends and allocates.
	if err := a.Allocate(ps, 5*ps); err != nil {
		t.Fatal(err)
	}
	if size, _ := f.Size(); size != 6*ps {
		t.Fatalf("size after Allocate = %d", size)
	}
	if n := allocated(t, f); n != 6*ps {
		t.Fatalf("allocated after Allocate = %d", n)
	}
	if got := readAll(t, f, 0, 2*ps); !bytes.Equal(got, want) {
		t.Fatal("Allocate changed data")
	}
	if got := readAll(t, f, 2*ps, 4*ps); !driver.IsZero(got) {
		t.Fatal("allocated space is not zero")
	}
}

func TestTruncate(t *testing.T) {
	fsys := New()
	f := mustOpen(t, fsys, "f", driver.ReadWrite|driver.Create)
	mustWrite(t, f, fill(3*ps, 0x55), 0)
	if err := f.Truncate(ps + 10); err != nil {
		t.Fatal(err)
	}
	if n := allocated(t, f); n != 2*ps {
		t.Fatalf("allocated = %d", n)
	}
	// Growing again exposes zeros, not the old bytes.
	if err := f.Truncate(3 * ps); err != nil {
		t.Fatal(err)
	}
	got := readAll(t, f, 0, 3*ps)
	want := fill(3*ps, 0x55)
	clear(want[ps+10:])
	if !bytes.Equal(got, want) {
		t.Fatal("content after shrink+grow differs")
	}
	if err := f.Truncate(-1); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("Truncate(-1): %v", err)
	}
}

// TestRandomOpsAgainstModel runs random operations and compares content,
// size and hole reports with a flat byte-slice model.
func TestRandomOpsAgainstModel(t *testing.T) {
	const maxSize = 4 * ps
	src := rand.NewChaCha8([32]byte{1, 2, 3})
	rng := rand.New(src)
	fsys := New()
	f := mustOpen(t, fsys, "m", driver.ReadWrite|driver.Create)
	var model []byte
	grow := func(end int64) {
		if end > int64(len(model)) {
			model = append(model, make([]byte, end-int64(len(model)))...)
		}
	}
	for step := range 400 {
		off := rng.Int64N(maxSize)
		n := rng.Int64N(2*ps) + 1
		if rng.IntN(3) == 0 { // favour page-aligned ranges
			off, n = off&^(ps-1), (n+ps-1)&^(ps-1)
		}
		n = min(n, maxSize-off)
		var desc string
		switch rng.IntN(6) {
		case 0, 1:
			b := make([]byte, n)
			if rng.IntN(4) != 0 {
				src.Read(b)
			}
			mustWrite(t, f, b, off)
			grow(off + n)
			copy(model[off:], b)
			desc = "write"
		case 2:
			if err := f.PunchHole(off, n); err != nil {
				t.Fatal(err)
			}
			if off < int64(len(model)) {
				clear(model[off:min(off+n, int64(len(model)))])
			}
			desc = "punch"
		case 3:
			if err := f.(driver.ZeroRanger).ZeroRange(off, n); err != nil {
				t.Fatal(err)
			}
			grow(off + n)
			clear(model[off : off+n])
			desc = "zero"
		case 4:
			if err := f.(driver.Allocator).Allocate(off, n); err != nil {
				t.Fatal(err)
			}
			grow(off + n)
			desc = "allocate"
		case 5:
			if err := f.Truncate(off); err != nil {
				t.Fatal(err)
			}
			if off < int64(len(model)) {
				model = model[:off]
			} else {
				grow(off)
			}
			desc = "truncate"
		}
		ctx := fmt.Sprintf("step %d (%s %d+%d)", step, desc, off, n)
		size, _ := f.Size()
		if size != int64(len(model)) {
			t.Fatalf("%s: size %d, model %d", ctx, size, len(model))
		}
		if got := readAll(t, f, 0, size); !bytes.Equal(got, model) {
			t.Fatalf("%s: content differs from model", ctx)
		}
		checkHoles(t, ctx, f, model)
	}
}

// checkHoles walks the extents SeekData/SeekHole report and checks that no
// non-zero byte is in a hole and that the walk covers the file.
func checkHoles(t *testing.T, ctx string, f driver.File, model []byte) {
	t.Helper()
	hs := f.(driver.HoleSeeker)
	size := int64(len(model))
	for pos := int64(0); pos < size; {
		d, err := hs.SeekData(pos)
		if err == io.EOF {
			d = size
		} else if err != nil {
			t.Fatalf("%s: SeekData(%d): %v", ctx, pos, err)
		} else if d < pos {
			t.Fatalf("%s: SeekData(%d) = %d went backwards", ctx, pos, d)
		}
		if !driver.IsZero(model[pos:d]) {
			t.Fatalf("%s: hole [%d,%d) holds data", ctx, pos, d)
		}
		if d == size {
			break
		}
		h, err := hs.SeekHole(d)
		if err != nil || h <= d || h > size {
			t.Fatalf("%s: SeekHole(%d) = %d, %v", ctx, d, h, err)
		}
		pos = h
	}
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
			fsys := New()
			if err := fsys.WriteFile("img", []byte("x")); err != nil {
				t.Fatal(err)
			}
			f1 := mustOpen(t, fsys, "img", tc.first)
			f2, err := fsys.Open("/img", tc.second)
			if tc.busy {
				if !errors.Is(err, driver.ErrBusy) {
					t.Fatalf("second open: %v, want ErrBusy", err)
				}
				if !strings.Contains(err.Error(), "img") || !strings.Contains(err.Error(), "in use") {
					t.Fatalf("error %q should name the file and say it is in use", err)
				}
				// Closing the first releases the lock.
				if err := f1.Close(); err != nil {
					t.Fatal(err)
				}
				f2, err = fsys.Open("img", tc.second)
			}
			if err != nil {
				t.Fatalf("open: %v", err)
			}
			f2.Close()
		})
	}
	t.Run("lock follows rename", func(t *testing.T) {
		fsys := New()
		mustOpen(t, fsys, "a", driver.ReadWrite|driver.Create)
		if err := fsys.Rename("a", "b"); err != nil {
			t.Fatal(err)
		}
		if _, err := fsys.Open("b", driver.ReadOnly); !errors.Is(err, driver.ErrBusy) {
			t.Fatalf("open renamed locked file: %v", err)
		}
	})
	t.Run("double close", func(t *testing.T) {
		fsys := New()
		f, err := fsys.Open("a", driver.ReadWrite|driver.Create)
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
		if err := f.Close(); !errors.Is(err, fs.ErrClosed) {
			t.Fatalf("second Close: %v", err)
		}
		// The lock was released once, not twice: a RW and a RO open conflict.
		g := mustOpen(t, fsys, "a", driver.ReadWrite)
		_ = g
		if _, err := fsys.Open("a", driver.ReadOnly); !errors.Is(err, driver.ErrBusy) {
			t.Fatalf("lock state broken by double close: %v", err)
		}
	})
}

func TestOpenErrors(t *testing.T) {
	fsys := New()
	if err := fsys.WriteFile("/dir/file", []byte("data")); err != nil {
		t.Fatal(err)
	}
	fsys.SetReadOnly("/dir/file", true)
	tests := []struct {
		name string
		file string
		flag driver.OpenFlag
		is   []error
		msg  string
	}{
		{"missing", "nope", driver.ReadOnly, []error{driver.ErrNotFound, fs.ErrNotExist}, "nope"},
		{"directory", "dir", driver.ReadOnly, []error{syscall.EISDIR}, "is a directory"},
		{"root", "/", driver.ReadWrite, []error{syscall.EISDIR}, "is a directory"},
		{"excl exists", "dir/file", driver.Create | driver.Excl, []error{fs.ErrExist}, "dir/file"},
		{"read-only file", "dir/file", driver.ReadWrite, []error{fs.ErrPermission}, "dir/file"},
		{"read-only file truncate", "dir/file", driver.ReadWrite | driver.Truncate, []error{fs.ErrPermission}, "permission"},
		{"under a file", "dir/file/x", driver.ReadWrite | driver.Create, []error{syscall.ENOTDIR}, "not a directory"},
		{"truncate needs rw", "dir/file", driver.Truncate, []error{driver.ErrInvalidOption}, "Truncate"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f, err := fsys.Open(tc.file, tc.flag)
			if err == nil {
				f.Close()
				t.Fatal("Open succeeded")
			}
			for _, target := range tc.is {
				if !errors.Is(err, target) {
					t.Errorf("error %q does not match %v", err, target)
				}
			}
			if !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("error %q does not contain %q", err, tc.msg)
			}
		})
	}
	// The read-only file still opens read-only, and its content is intact.
	f := mustOpen(t, fsys, "dir/file", driver.ReadOnly)
	if got := readAll(t, f, 0, 4); string(got) != "data" {
		t.Fatalf("content %q", got)
	}
	// Writes through a read-only handle fail.
	if _, err := f.WriteAt([]byte("x"), 0); !errors.Is(err, driver.ErrReadOnly) {
		t.Fatalf("write to read-only handle: %v", err)
	}
	for name, err := range map[string]error{
		"truncate": f.Truncate(0),
		"punch":    f.PunchHole(0, 1),
		"zero":     f.(driver.ZeroRanger).ZeroRange(0, 1),
		"allocate": f.(driver.Allocator).Allocate(0, 1),
	} {
		if !errors.Is(err, driver.ErrReadOnly) {
			t.Errorf("%s on read-only handle: %v", name, err)
		}
	}
	fsys.SetReadOnly("dir/file", false)
	f.Close()
	mustOpen(t, fsys, "dir/file", driver.ReadWrite).Close()
}

func TestClosedFile(t *testing.T) {
	fsys := New()
	f, err := fsys.Open("f", driver.ReadWrite|driver.Create)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := f.ReadAt(make([]byte, 1), 0); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("ReadAt: %v", err)
	}
	if _, err := f.WriteAt([]byte{1}, 0); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("WriteAt: %v", err)
	}
	if err := f.Sync(); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("Sync: %v", err)
	}
}

func TestCreateTruncate(t *testing.T) {
	fsys := New()
	if err := fsys.WriteFile("f", fill(3*ps, 1)); err != nil {
		t.Fatal(err)
	}
	f := mustOpen(t, fsys, "f", driver.ReadWrite|driver.Create|driver.Truncate)
	if size, _ := f.Size(); size != 0 {
		t.Fatalf("size after Truncate open = %d", size)
	}
	if n := allocated(t, f); n != 0 {
		t.Fatalf("allocated = %d", n)
	}
	f.Close()
	// Truncate does not happen when the lock is refused.
	if err := fsys.WriteFile("g", []byte("keep")); err != nil {
		t.Fatal(err)
	}
	mustOpen(t, fsys, "g", driver.ReadOnly)
	if _, err := fsys.Open("g", driver.ReadWrite|driver.Truncate); !errors.Is(err, driver.ErrBusy) {
		t.Fatalf("open: %v", err)
	}
	if b, _ := fsys.ReadFile("g"); string(b) != "keep" {
		t.Fatalf("locked file was truncated: %q", b)
	}
}

func TestNamespace(t *testing.T) {
	fsys := New()
	for _, n := range []string{"a/b/c.img", "/a/d.img", "top.img", "a/b/e/f.img"} {
		if err := fsys.WriteFile(n, []byte(n)); err != nil {
			t.Fatal(err)
		}
	}
	t.Run("clean names", func(t *testing.T) {
		for _, n := range []string{"/a/b/c.img", "a/b/c.img", "a//b/./c.img", "/x/../a/b/c.img", "a/b/c.img/"} {
			f, err := fsys.Open(n, driver.ReadOnly|driver.NoLock)
			if err != nil {
				t.Errorf("Open(%q): %v", n, err)
				continue
			}
			f.Close()
		}
	})
	t.Run("list", func(t *testing.T) {
		for _, tc := range []struct {
			dir  string
			want []string
		}{
			{"/", []string{"a", "top.img"}},
			{"", []string{"a", "top.img"}},
			{"a", []string{"b", "d.img"}},
			{"/a/b/", []string{"c.img", "e"}},
		} {
			got, err := fsys.List(tc.dir)
			if err != nil || !slices.Equal(got, tc.want) {
				t.Errorf("List(%q) = %q, %v; want %q", tc.dir, got, err, tc.want)
			}
		}
		if _, err := fsys.List("nope"); !errors.Is(err, driver.ErrNotFound) {
			t.Errorf("List(nope): %v", err)
		}
		if _, err := fsys.List("top.img"); !errors.Is(err, syscall.ENOTDIR) {
			t.Errorf("List(file): %v", err)
		}
		if got, err := New().List("/"); err != nil || len(got) != 0 {
			t.Errorf("List of empty root = %q, %v", got, err)
		}
	})
	t.Run("stat", func(t *testing.T) {
		for _, tc := range []struct {
			name  string
			want  driver.FileInfo
			isErr error
		}{
			{"a", driver.FileInfo{Name: "a", IsDir: true}, nil},
			{"/", driver.FileInfo{Name: "/", IsDir: true}, nil},
			{"a/b/e", driver.FileInfo{Name: "e", IsDir: true}, nil},
			{"top.img", driver.FileInfo{Name: "top.img", Size: 7, Allocated: ps}, nil},
			{"a/zz", driver.FileInfo{}, driver.ErrNotFound},
		} {
			got, err := fsys.Stat(tc.name)
			got.ModTime = got.ModTime.UTC().Truncate(1 << 62) // ignore
			if tc.isErr != nil {
				if !errors.Is(err, tc.isErr) || !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("Stat(%q): %v", tc.name, err)
				}
				continue
			}
			tc.want.ModTime = got.ModTime
			if err != nil || got != tc.want {
				t.Errorf("Stat(%q) = %+v, %v; want %+v", tc.name, got, err, tc.want)
			}
		}
	})
	t.Run("names", func(t *testing.T) {
		want := []string{"/a/b/c.img", "/a/b/e/f.img", "/a/d.img", "/top.img"}
		if got := fsys.Names(); !slices.Equal(got, want) {
			t.Errorf("Names = %q", got)
		}
	})
}

func TestRenameRemove(t *testing.T) {
	setup := func(t *testing.T) *FS {
		fsys := New()
		for _, n := range []string{"a/1", "a/2", "b", "c/x"} {
			if err := fsys.WriteFile(n, []byte(n)); err != nil {
				t.Fatal(err)
			}
		}
		return fsys
	}
	tests := []struct {
		name      string
		op        func(*FS) error
		is        error
		wantNames []string
	}{
		{"rename file", func(f *FS) error { return f.Rename("b", "d") }, nil,
			[]string{"/a/1", "/a/2", "/c/x", "/d"}},
		{"rename replaces file", func(f *FS) error { return f.Rename("b", "a/1") }, nil,
			[]string{"/a/1", "/a/2", "/c/x"}},
		{"rename into new dir", func(f *FS) error { return f.Rename("b", "n/m/b") }, nil,
			[]string{"/a/1", "/a/2", "/c/x", "/n/m/b"}},
		{"rename dir", func(f *FS) error { return f.Rename("a", "z") }, nil,
			[]string{"/b", "/c/x", "/z/1", "/z/2"}},
		{"rename same", func(f *FS) error { return f.Rename("b", "/b") }, nil,
			[]string{"/a/1", "/a/2", "/b", "/c/x"}},
		{"rename missing", func(f *FS) error { return f.Rename("q", "r") }, driver.ErrNotFound, nil},
		{"rename file over dir", func(f *FS) error { return f.Rename("b", "a") }, syscall.EISDIR, nil},
		{"rename dir over non-empty dir", func(f *FS) error { return f.Rename("a", "c") }, syscall.ENOTEMPTY, nil},
		{"rename dir over file", func(f *FS) error { return f.Rename("a", "b") }, syscall.ENOTDIR, nil},
		{"rename dir into itself", func(f *FS) error { return f.Rename("a", "a/q") }, syscall.EINVAL, nil},
		{"rename below a file", func(f *FS) error { return f.Rename("a/1", "b/1") }, syscall.ENOTDIR, nil},
		{"remove file", func(f *FS) error { return f.Remove("/a/1") }, nil,
			[]string{"/a/2", "/b", "/c/x"}},
		{"remove missing", func(f *FS) error { return f.Remove("zz") }, fs.ErrNotExist, nil},
		{"remove dir", func(f *FS) error { return f.Remove("a") }, syscall.ENOTEMPTY, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fsys := setup(t)
			before := fsys.Names()
			err := tc.op(fsys)
			if tc.is != nil {
				if !errors.Is(err, tc.is) {
					t.Fatalf("err = %v, want %v", err, tc.is)
				}
				if got := fsys.Names(); !slices.Equal(got, before) {
					t.Fatalf("failed op changed names: %q", got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := fsys.Names(); !slices.Equal(got, tc.wantNames) {
				t.Fatalf("names = %q, want %q", got, tc.wantNames)
			}
		})
	}
	t.Run("content follows rename", func(t *testing.T) {
		fsys := setup(t)
		if err := fsys.Rename("a", "z"); err != nil {
			t.Fatal(err)
		}
		if b, err := fsys.ReadFile("z/2"); err != nil || string(b) != "a/2" {
			t.Fatalf("z/2 = %q, %v", b, err)
		}
	})
	t.Run("open handle survives remove", func(t *testing.T) {
		fsys := setup(t)
		f := mustOpen(t, fsys, "b", driver.ReadWrite)
		if err := fsys.Remove("b"); err != nil {
			t.Fatal(err)
		}
		mustWrite(t, f, []byte("B"), 0)
		if got := readAll(t, f, 0, 1); string(got) != "B" {
			t.Fatal("removed file unreadable")
		}
		if _, err := fsys.Stat("b"); !errors.Is(err, driver.ErrNotFound) {
			t.Fatalf("Stat removed: %v", err)
		}
		// A new file of that name is independent and not locked.
		g := mustOpen(t, fsys, "b", driver.ReadWrite|driver.Create)
		if size, _ := g.Size(); size != 0 {
			t.Fatalf("new file size %d", size)
		}
	})
}

func TestClone(t *testing.T) {
	fsys := New()
	f := mustOpen(t, fsys, "f", driver.ReadWrite|driver.Create)
	mustWrite(t, f, fill(ps+1, 9), 0)
	fsys.SetReadOnly("f", true)
	c := fsys.Clone()
	// Mutating the original does not affect the clone.
	mustWrite(t, f, []byte("changed"), 0)
	if err := f.Truncate(10); err != nil {
		t.Fatal(err)
	}
	if err := fsys.WriteFile("g", nil); err != nil {
		t.Fatal(err)
	}
	b, err := c.ReadFile("f")
	if err != nil || !bytes.Equal(b, fill(ps+1, 9)) {
		t.Fatalf("clone content changed (%d bytes, %v)", len(b), err)
	}
	if _, err := c.Stat("g"); !errors.Is(err, driver.ErrNotFound) {
		t.Fatalf("clone sees new file: %v", err)
	}
	// The clone has no locks but keeps the read-only mark.
	if _, err := c.Open("f", driver.ReadWrite); !errors.Is(err, fs.ErrPermission) {
		t.Fatalf("clone lost read-only mark: %v", err)
	}
	c.SetReadOnly("f", false)
	g := mustOpen(t, c, "f", driver.ReadWrite)
	mustWrite(t, g, []byte("clone"), 0)
	if got := readAll(t, f, 0, 7); string(got) != "changed" {
		t.Fatalf("original changed by clone write: %q", got)
	}
}

func TestConcurrent(t *testing.T) {
	fsys := New()
	f := mustOpen(t, fsys, "f", driver.ReadWrite|driver.Create)
	const workers, chunk = 8, ps/2 + 100 // chunks straddle pages
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			data := fill(chunk, byte(w+1))
			buf := make([]byte, chunk)
			for i := range 20 {
				off := int64((i*workers + w) * chunk)
				if _, err := f.WriteAt(data, off); err != nil {
					t.Error(err)
					return
				}
				if err := driver.ReadFullAt(f, buf, off); err != nil || !bytes.Equal(buf, data) {
					t.Errorf("worker %d: read back differs (%v)", w, err)
					return
				}
				f.(driver.HoleSeeker).SeekData(off)
				f.(driver.HoleSeeker).SeekHole(0)
				f.(driver.AllocatedSizer).AllocatedSize()
				fsys.Stat("f")
				fsys.List("/")
				g, err := fsys.Open(fmt.Sprintf("other%d", w), driver.ReadWrite|driver.Create)
				if err != nil {
					t.Error(err)
					return
				}
				g.WriteAt(data[:10], int64(i))
				g.Close()
				if i%10 == 0 {
					fsys.Clone()
				}
			}
		}()
	}
	wg.Wait()
	for w := range workers {
		for i := range 20 {
			off := int64((i*workers + w) * chunk)
			if got := readAll(t, f, off, chunk); !bytes.Equal(got, fill(chunk, byte(w+1))) {
				t.Fatalf("final content of worker %d chunk %d differs", w, i)
			}
		}
	}
}
