package faultfs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/memfs"
	"github.com/vdisk/vdisk/storage/osfs"
)

func mustOpen(t *testing.T, st driver.Storage, name string, flag driver.OpenFlag) driver.File {
	t.Helper()
	f, err := st.Open(name, flag)
	if err != nil {
		t.Fatalf("Open(%q): %v", name, err)
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

func mustSync(t *testing.T, f driver.File) {
	t.Helper()
	if err := f.Sync(); err != nil {
		t.Fatalf("Sync: %v", err)
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

// content returns the whole content of name in st, or nil and false if it
// does not exist.
func content(t *testing.T, st driver.Storage, name string) ([]byte, bool) {
	t.Helper()
	f, err := st.Open(name, driver.ReadOnly|driver.NoLock)
	if errors.Is(err, driver.ErrNotFound) {
		return nil, false
	}
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	defer f.Close()
	size, err := f.Size()
	if err != nil {
		t.Fatal(err)
	}
	return readAll(t, f, 0, size), true
}

type innerKind struct {
	name string
	make func(t *testing.T) (driver.Storage, string) // storage, directory for names
}

var inners = []innerKind{
	{"memfs", func(t *testing.T) (driver.Storage, string) { return memfs.New(), "/" }},
	{"osfs", func(t *testing.T) (driver.Storage, string) { return osfs.New(), t.TempDir() }},
}

// TestPassThrough checks that without rules the wrapper behaves like the
// wrapped storage, optional interfaces included.
func TestPassThrough(t *testing.T) {
	for _, in := range inners {
		t.Run(in.name, func(t *testing.T) {
			inner, dir := in.make(t)
			ffs := New(inner)
			name := filepath.Join(dir, "img")
			f := mustOpen(t, ffs, name, driver.ReadWrite|driver.Create)
			if f.Name() != name {
				t.Fatalf("Name = %q", f.Name())
			}
			const size = 4 << 20
			if err := f.Truncate(size); err != nil {
				t.Fatal(err)
			}
			data := bytes.Repeat([]byte("vdisk!"), 20000)
			mustWrite(t, f, data, 1<<20)
			mustSync(t, f)
			if got := readAll(t, f, 1<<20, int64(len(data))); !bytes.Equal(got, data) {
				t.Fatal("read back differs")
			}
			hs := f.(driver.HoleSeeker)
			if d, err := hs.SeekData(0); err != nil || d > 1<<20 {
				t.Fatalf("SeekData(0) = %d, %v", d, err)
			}
			if h, err := hs.SeekHole(1 << 20); err != nil || h < 1<<20+int64(len(data)) {
				t.Fatalf("SeekHole = %d, %v", h, err)
			}
			before, err := f.(driver.AllocatedSizer).AllocatedSize()
			if err != nil || before < int64(len(data)) {
				t.Fatalf("AllocatedSize = %d, %v", before, err)
			}
			if err := f.PunchHole(1<<20, 1<<20); err != nil {
				t.Fatal(err)
			}
			if got := readAll(t, f, 1<<20, 1<<20); !driver.IsZero(got) {
				t.Fatal("punched range not zero")
			}
			if err := f.(driver.ZeroRanger).ZeroRange(2<<20, 1000); err != nil {
				t.Fatal(err)
			}
			if got := readAll(t, f, 2<<20, 1000); !driver.IsZero(got) {
				t.Fatal("zeroed range not zero")
			}
			if err := f.(driver.Allocator).Allocate(size, 1<<20); err != nil {
				t.Fatal(err)
			}
			if s, _ := f.Size(); s != size+1<<20 {
				t.Fatalf("size after Allocate = %d", s)
			}
			if fi, err := ffs.Stat(name); err != nil || fi.Size != size+1<<20 {
				t.Fatalf("Stat = %+v, %v", fi, err)
			}
			if names, err := ffs.List(dir); err != nil || len(names) != 1 || names[0] != "img" {
				t.Fatalf("List = %q, %v", names, err)
			}
			if free, err := ffs.FreeSpace(name); err != nil || free <= 0 {
				t.Fatalf("FreeSpace = %d, %v", free, err)
			}
			// Locks are the wrapped storage's.
			if _, err := ffs.Open(name, driver.ReadOnly); !errors.Is(err, driver.ErrBusy) {
				t.Fatalf("conflicting open: %v", err)
			}
			f.Close()
			if err := ffs.Rename(name, name+"2"); err != nil {
				t.Fatal(err)
			}
			if err := ffs.Remove(name + "2"); err != nil {
				t.Fatal(err)
			}
			if _, err := ffs.Stat(name + "2"); !errors.Is(err, driver.ErrNotFound) {
				t.Fatalf("Stat after Remove: %v", err)
			}
			// truncate, write, punch, zero range, allocate
			if ffs.Writes() != 5 || ffs.Syncs() != 1 || ffs.Reads() != 3 {
				t.Fatalf("Writes, Syncs, Reads = %d, %d, %d; want 5, 1, 3", ffs.Writes(), ffs.Syncs(), ffs.Reads())
			}
		})
	}
}

func TestFailWriteAfter(t *testing.T) {
	custom := errors.New("custom failure")
	tests := []struct {
		name    string
		n       int
		err     error
		is      []error
		succeed int // writes that succeed before the failures
	}{
		{"next write", 1, nil, []error{syscall.EIO, ErrInjected}, 0},
		{"n below 1 is next", 0, nil, []error{syscall.EIO}, 0},
		{"third write", 3, nil, []error{syscall.EIO, ErrInjected}, 2},
		{"custom error", 2, custom, []error{custom}, 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ffs := New(memfs.New())
			f := mustOpen(t, ffs, "img", driver.ReadWrite|driver.Create)
			mustWrite(t, f, bytes.Repeat([]byte{1}, 50), 0) // before the rule
			ffs.FailWriteAfter(tc.n, tc.err)
			for i := range 5 {
				n, err := f.WriteAt([]byte{2, 2}, int64(10*i))
				if i < tc.succeed {
					if err != nil || n != 2 {
						t.Fatalf("write %d: %d, %v; want success", i+1, n, err)
					}
					continue
				}
				if n != 0 || err == nil {
					t.Fatalf("write %d: %d, %v; want failure", i+1, n, err)
				}
				for _, target := range tc.is {
					if !errors.Is(err, target) {
						t.Fatalf("write %d: error %q does not match %v", i+1, err, target)
					}
				}
				var de *driver.Error
				if !errors.As(err, &de) || de.File != "img" || de.Offset != int64(10*i) {
					t.Fatalf("error %q does not name the file and offset", err)
				}
			}
			// Failed writes changed nothing.
			want := bytes.Repeat([]byte{1}, 50)
			for i := range tc.succeed {
				copy(want[10*i:], []byte{2, 2})
			}
			if got := readAll(t, f, 0, 50); !bytes.Equal(got, want) {
				t.Fatalf("content %v, want %v", got, want)
			}
			// Other modifying operations are writes too.
			if err := f.Truncate(0); err == nil {
				t.Fatal("Truncate succeeded under FailWriteAfter")
			}
			if err := f.PunchHole(0, 10); err == nil {
				t.Fatal("PunchHole succeeded under FailWriteAfter")
			}
			if ffs.Writes() != 8 {
				t.Fatalf("Writes = %d, want 8", ffs.Writes())
			}
			ffs.Reset()
			mustWrite(t, f, []byte{3}, 0)
			if ffs.Writes() != 1 {
				t.Fatalf("Writes after Reset = %d", ffs.Writes())
			}
		})
	}
}

func TestFailReadAfter(t *testing.T) {
	for _, in := range inners {
		t.Run(in.name, func(t *testing.T) {
			inner, dir := in.make(t)
			ffs := New(inner)
			f := mustOpen(t, ffs, filepath.Join(dir, "img"), driver.ReadWrite|driver.Create)
			data := bytes.Repeat([]byte("0123456789"), 100)
			mustWrite(t, f, data, 0)
			ffs.FailReadAfter(2, nil)
			buf := make([]byte, len(data))
			if err := driver.ReadFullAt(f, buf, 0); err != nil || !bytes.Equal(buf, data) {
				t.Fatalf("first read: %v", err)
			}
			for i := range 3 {
				buf := make([]byte, len(data))
				n, err := f.ReadAt(buf, 0)
				if !errors.Is(err, syscall.EIO) || !errors.Is(err, ErrInjected) || n != 0 {
					t.Fatalf("read %d: %d, %v; want 0, EIO", i+2, n, err)
				}
				// The caller's buffer holds garbage, never plausible data,
				// and ReadFullAt reports the error.
				if bytes.Equal(buf, data) || driver.IsZero(buf) {
					t.Fatal("failed read left plausible data in the buffer")
				}
				if err := driver.ReadFullAt(f, buf, 0); !errors.Is(err, syscall.EIO) {
					t.Fatalf("ReadFullAt: %v", err)
				}
			}
			ffs.Reset()
			if err := driver.ReadFullAt(f, buf, 0); err != nil || !bytes.Equal(buf, data) {
				t.Fatalf("read after Reset: %v", err)
			}
		})
	}
}

func TestShortWrites(t *testing.T) {
	tests := []struct {
		size, written int
	}{
		{100, 50},
		{101, 50},
		{1, 0},
		{0, 0},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprint(tc.size), func(t *testing.T) {
			ffs := New(memfs.New())
			f := mustOpen(t, ffs, "img", driver.ReadWrite|driver.Create)
			ffs.ShortWrites(true)
			data := bytes.Repeat([]byte{7}, tc.size)
			n, err := f.WriteAt(data, 0)
			if n != tc.written {
				t.Fatalf("WriteAt = %d, want %d", n, tc.written)
			}
			if tc.size > 0 && !errors.Is(err, io.ErrShortWrite) {
				t.Fatalf("err = %v, want io.ErrShortWrite", err)
			}
			if tc.size == 0 && err != nil {
				t.Fatalf("empty write: %v", err)
			}
			if size, _ := f.Size(); size != int64(tc.written) {
				t.Fatalf("size = %d, want %d", size, tc.written)
			}
			ffs.ShortWrites(false)
			mustWrite(t, f, data, 0)
		})
	}
}

func TestNoSpace(t *testing.T) {
	for _, in := range inners {
		t.Run(in.name, func(t *testing.T) {
			inner, dir := in.make(t)
			ffs := New(inner)
			name := filepath.Join(dir, "img")
			f := mustOpen(t, ffs, name, driver.ReadWrite|driver.Create)
			ffs.NoSpaceAfter(100)
			if free, err := ffs.FreeSpace(name); err != nil || free != 100 {
				t.Fatalf("FreeSpace = %d, %v; want 100", free, err)
			}
			mustWrite(t, f, bytes.Repeat([]byte{1}, 60), 0)
			n, err := f.WriteAt(bytes.Repeat([]byte{2}, 60), 60)
			if n != 40 || !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("overflowing write = %d, %v; want 40, ENOSPC", n, err)
			}
			n, err = f.WriteAt([]byte{3}, 0)
			if n != 0 || !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("write when full = %d, %v; want 0, ENOSPC", n, err)
			}
			if size, _ := f.Size(); size != 100 {
				t.Fatalf("size = %d, want 100", size)
			}
			want := append(bytes.Repeat([]byte{1}, 60), bytes.Repeat([]byte{2}, 40)...)
			if got := readAll(t, f, 0, 100); !bytes.Equal(got, want) {
				t.Fatal("content differs")
			}
			// Allocate is all or nothing.
			ffs.NoSpaceAfter(1000)
			if err := f.(driver.Allocator).Allocate(100, 2000); !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("Allocate past budget: %v", err)
			}
			if size, _ := f.Size(); size != 100 {
				t.Fatalf("failed Allocate changed size to %d", size)
			}
			if err := f.(driver.Allocator).Allocate(100, 1000); err != nil {
				t.Fatalf("Allocate within budget: %v", err)
			}
			if free, _ := ffs.FreeSpace(name); free != 0 {
				t.Fatalf("FreeSpace = %d, want 0", free)
			}
			// Operations that free or zero space are unaffected.
			if err := f.PunchHole(0, 100); err != nil {
				t.Fatal(err)
			}
			ffs.NoSpaceAfter(-1)
			mustWrite(t, f, make([]byte, 5000), 0)
		})
	}
}

func TestFailSync(t *testing.T) {
	mem := memfs.New()
	ffs := New(mem)
	f := mustOpen(t, ffs, "img", driver.ReadWrite|driver.Create)
	mustWrite(t, f, []byte("one"), 0)
	mustSync(t, f)
	mustWrite(t, f, []byte("two"), 0)
	ffs.FailSync(nil)
	if err := f.Sync(); !errors.Is(err, syscall.EIO) || !errors.Is(err, ErrInjected) {
		t.Fatalf("Sync = %v, want EIO", err)
	}
	if got, _ := content(t, ffs.Durable(), "img"); string(got) != "one" {
		t.Fatalf("durable after failed sync = %q, want %q", got, "one")
	}
	custom := errors.New("boom")
	ffs.FailSync(custom)
	if err := f.Sync(); !errors.Is(err, custom) {
		t.Fatalf("Sync = %v", err)
	}
	if ffs.Syncs() != 3 {
		t.Fatalf("Syncs = %d, want 3", ffs.Syncs())
	}
	ffs.Reset()
	mustSync(t, f) // the pending write survived the failed syncs
	if got, _ := content(t, ffs.Durable(), "img"); string(got) != "two" {
		t.Fatalf("durable = %q, want %q", got, "two")
	}
}

func TestCrash(t *testing.T) {
	ffs := New(memfs.New())
	a := mustOpen(t, ffs, "a", driver.ReadWrite|driver.Create)
	b := mustOpen(t, ffs, "dir/b", driver.ReadWrite|driver.Create)
	mustWrite(t, a, []byte("synced-a"), 0)
	mustWrite(t, b, []byte("synced-b"), 0)
	mustSync(t, a)
	mustSync(t, b)
	mustWrite(t, a, []byte("SYNCED"), 0)
	mustSync(t, a)

	mustWrite(t, a, []byte("lost"), 100)
	mustWrite(t, b, []byte("LOST"), 0)
	ffs.CrashAfterWrites(2)
	mustWrite(t, a, []byte("x"), 0) // write 1 after the rule
	if ffs.Crashed() {
		t.Fatal("crashed too early")
	}
	mustWrite(t, b, []byte("y"), 0) // write 2: the last one
	if !ffs.Crashed() {
		t.Fatal("not crashed after the chosen write")
	}
	checks := map[string]error{}
	_, checks["write"] = a.WriteAt([]byte("z"), 0)
	checks["sync"] = a.Sync()
	checks["truncate"] = a.Truncate(0)
	checks["punch"] = b.PunchHole(0, 1)
	checks["zero"] = b.(driver.ZeroRanger).ZeroRange(0, 1)
	checks["allocate"] = b.(driver.Allocator).Allocate(0, 10)
	checks["remove"] = ffs.Remove("a")
	checks["rename"] = ffs.Rename("a", "c")
	_, checks["create"] = ffs.Open("new", driver.ReadWrite|driver.Create)
	for op, err := range checks {
		if !errors.Is(err, ErrCrashed) {
			t.Errorf("%s after crash: %v, want ErrCrashed", op, err)
		}
	}
	// Reads still work and see the un-synced state.
	if got := readAll(t, a, 0, 8); string(got) != "xYNCED-a" {
		t.Fatalf("live content %q", got)
	}

	d := ffs.Durable()
	for name, want := range map[string]string{"a": "SYNCED-a", "dir/b": "synced-b"} {
		if got, ok := content(t, d, name); !ok || string(got) != want {
			t.Errorf("durable %s = %q, %v; want %q", name, got, ok, want)
		}
	}
	if names, _ := d.List("/"); len(names) != 2 {
		t.Errorf("durable root = %q", names)
	}
	// Durable returns independent copies.
	g := mustOpen(t, d, "a", driver.ReadWrite)
	mustWrite(t, g, []byte("scribble"), 0)
	if got, _ := content(t, ffs.Durable(), "a"); string(got) != "SYNCED-a" {
		t.Fatalf("Durable copies share state: %q", got)
	}
	// Reset "reboots": writes work again.
	ffs.Reset()
	mustWrite(t, a, []byte("again"), 0)
	mustSync(t, a)
}

func TestCrashNow(t *testing.T) {
	ffs := New(memfs.New())
	f := mustOpen(t, ffs, "a", driver.ReadWrite|driver.Create)
	ffs.CrashAfterWrites(0)
	if _, err := f.WriteAt([]byte("x"), 0); !errors.Is(err, ErrCrashed) {
		t.Fatalf("write: %v", err)
	}
}

// TestDurabilityModel checks what survives a crash for each kind of
// operation, synced or not.
func TestDurabilityModel(t *testing.T) {
	type step func(t *testing.T, ffs *FS)
	write := func(name, s string, off int64, sync bool) step {
		return func(t *testing.T, ffs *FS) {
			f := mustOpen(t, ffs, name, driver.ReadWrite|driver.Create|driver.NoLock)
			mustWrite(t, f, []byte(s), off)
			if sync {
				mustSync(t, f)
			}
			f.Close()
		}
	}
	do := func(name string, sync bool, fn func(driver.File) error) step {
		return func(t *testing.T, ffs *FS) {
			f := mustOpen(t, ffs, name, driver.ReadWrite|driver.NoLock)
			if err := fn(f); err != nil {
				t.Fatal(err)
			}
			if sync {
				mustSync(t, f)
			}
			f.Close()
		}
	}
	meta := func(fn func(*FS) error) step {
		return func(t *testing.T, ffs *FS) {
			if err := fn(ffs); err != nil {
				t.Fatal(err)
			}
		}
	}
	absent := "<absent>"
	tests := []struct {
		name  string
		steps []step
		want  map[string]string // durable content by name
	}{
		{"synced write", []step{write("f", "abc", 0, true)}, map[string]string{"f": "abc"}},
		{"unsynced write of new file: exists empty", []step{write("f", "abc", 0, false)}, map[string]string{"f": ""}},
		{"unsynced overwrite dropped", []step{write("f", "abc", 0, true), write("f", "XY", 1, false)},
			map[string]string{"f": "abc"}},
		{"later sync covers earlier writes", []step{write("f", "abc", 0, false), write("f", "d", 3, true)},
			map[string]string{"f": "abcd"}},
		{"unsynced truncate dropped", []step{write("f", "abcdef", 0, true),
			do("f", false, func(f driver.File) error { return f.Truncate(2) })},
			map[string]string{"f": "abcdef"}},
		{"synced truncate kept", []step{write("f", "abcdef", 0, true),
			do("f", true, func(f driver.File) error { return f.Truncate(2) })},
			map[string]string{"f": "ab"}},
		{"unsynced punch dropped", []step{write("f", "abcdef", 0, true),
			do("f", false, func(f driver.File) error { return f.PunchHole(1, 2) })},
			map[string]string{"f": "abcdef"}},
		{"synced punch kept", []step{write("f", "abcdef", 0, true),
			do("f", true, func(f driver.File) error { return f.PunchHole(1, 2) })},
			map[string]string{"f": "a\x00\x00def"}},
		{"synced zero range and allocate", []step{write("f", "abcdef", 0, true),
			do("f", true, func(f driver.File) error {
				if err := f.(driver.ZeroRanger).ZeroRange(4, 4); err != nil {
					return err
				}
				return f.(driver.Allocator).Allocate(8, 2)
			})},
			map[string]string{"f": "abcd\x00\x00\x00\x00\x00\x00"}},
		{"sync of one file only", []step{write("f", "abc", 0, true), write("g", "xyz", 0, true),
			write("f", "F", 0, false), write("g", "G", 0, true)},
			map[string]string{"f": "abc", "g": "Gyz"}},
		{"remove durable at once", []step{write("f", "abc", 0, true), meta(func(f *FS) error { return f.Remove("f") })},
			map[string]string{"f": absent}},
		{"rename durable at once, pending follows", []step{write("f", "abc", 0, true), write("f", "X", 0, false),
			meta(func(f *FS) error { return f.Rename("f", "d/g") }),
			do("d/g", true, func(driver.File) error { return nil })},
			map[string]string{"f": absent, "d/g": "Xbc"}},
		{"rename replaces target", []step{write("f", "new", 0, true), write("g", "old", 0, true),
			meta(func(f *FS) error { return f.Rename("f", "g") })},
			map[string]string{"f": absent, "g": "new"}},
		{"directory rename", []step{write("d/f", "abc", 0, false),
			meta(func(f *FS) error { return f.Rename("d", "e") }),
			do("e/f", true, func(driver.File) error { return nil })},
			map[string]string{"d/f": absent, "e/f": "abc"}},
		{"open with truncate is pending", []step{write("f", "abc", 0, true),
			func(t *testing.T, ffs *FS) {
				mustOpen(t, ffs, "f", driver.ReadWrite|driver.Truncate).Close()
			}},
			map[string]string{"f": "abc"}},
		{"open with truncate then sync", []step{write("f", "abc", 0, true),
			func(t *testing.T, ffs *FS) {
				f := mustOpen(t, ffs, "f", driver.ReadWrite|driver.Truncate)
				mustSync(t, f)
				f.Close()
			}},
			map[string]string{"f": ""}},
		{"handle of removed file syncs nowhere", []step{write("f", "abc", 0, true),
			func(t *testing.T, ffs *FS) {
				f := mustOpen(t, ffs, "f", driver.ReadWrite)
				if err := ffs.Remove("f"); err != nil {
					t.Fatal(err)
				}
				mustWrite(t, f, []byte("zzz"), 0)
				mustSync(t, f)
			}},
			map[string]string{"f": absent}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ffs := New(memfs.New())
			for _, s := range tc.steps {
				s(t, ffs)
			}
			d := ffs.Durable()
			for name, want := range tc.want {
				got, ok := content(t, d, name)
				if want == absent {
					if ok {
						t.Errorf("%s exists in the durable image (%q)", name, got)
					}
					continue
				}
				if !ok || string(got) != want {
					t.Errorf("durable %s = %q (exists %v), want %q", name, got, ok, want)
				}
			}
		})
	}
}

// TestInitialStateDurable checks that the wrapped memfs's content at New
// counts as durable.
func TestInitialStateDurable(t *testing.T) {
	mem := memfs.New()
	if err := mem.WriteFile("pre", []byte("existing")); err != nil {
		t.Fatal(err)
	}
	ffs := New(mem)
	f := mustOpen(t, ffs, "pre", driver.ReadWrite)
	mustWrite(t, f, []byte("E"), 0)
	if got, _ := content(t, ffs.Durable(), "pre"); string(got) != "existing" {
		t.Fatalf("durable = %q", got)
	}
}

func TestDurableNeedsMemfs(t *testing.T) {
	ffs := New(osfs.New())
	d := ffs.Durable()
	if _, err := d.Open("x", driver.ReadOnly); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("Open: %v", err)
	}
	if _, err := d.List("/"); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("List: %v", err)
	}
}

// TestCrashPoints replays a workload crashing after every possible write
// and checks that the durable image is exactly the state of the last sync
// before the crash.
func TestCrashPoints(t *testing.T) {
	type op struct {
		off  int64
		data string
		sync bool
	}
	workload := []op{
		{0, "aaaa", false}, {4, "bbbb", true}, {2, "CC", false},
		{8, "dd", false}, {0, "E", true}, {100, "far", false}, {1, "ff", true},
	}
	// Expected durable content after each possible crash point.
	var model, synced []byte
	var durableAfter []string // index: number of writes done before crash
	durableAfter = append(durableAfter, "")
	for _, o := range workload {
		if end := o.off + int64(len(o.data)); end > int64(len(model)) {
			model = append(model, make([]byte, end-int64(len(model)))...)
		}
		copy(model[o.off:], o.data)
		if o.sync {
			synced = bytes.Clone(model)
		}
		durableAfter = append(durableAfter, string(synced))
	}
	for crashAt := 0; crashAt <= len(workload); crashAt++ {
		t.Run(fmt.Sprint(crashAt), func(t *testing.T) {
			ffs := New(memfs.New())
			f := mustOpen(t, ffs, "img", driver.ReadWrite|driver.Create)
			ffs.CrashAfterWrites(crashAt)
			done := 0
			for _, o := range workload {
				if _, err := f.WriteAt([]byte(o.data), o.off); err != nil {
					if !errors.Is(err, ErrCrashed) {
						t.Fatal(err)
					}
					break
				}
				done++
				if o.sync {
					if err := f.Sync(); err != nil {
						if !errors.Is(err, ErrCrashed) {
							t.Fatal(err)
						}
						break
					}
				}
			}
			if done != crashAt {
				t.Fatalf("%d writes succeeded, want %d", done, crashAt)
			}
			// The write that triggers the crash succeeds but its sync
			// fails, so the durable state is the last sync before it.
			want := durableAfter[max(crashAt-1, 0)]
			if got, _ := content(t, ffs.Durable(), "img"); string(got) != want {
				t.Fatalf("durable = %q, want %q", got, want)
			}
		})
	}
}

func TestConcurrent(t *testing.T) {
	ffs := New(memfs.New())
	const workers, chunk, rounds = 8, 5000, 30
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f, err := ffs.Open(fmt.Sprintf("f%d", w%3), driver.ReadWrite|driver.Create|driver.NoLock)
			if err != nil {
				t.Error(err)
				return
			}
			defer f.Close()
			data := bytes.Repeat([]byte{byte(w + 1)}, chunk)
			buf := make([]byte, chunk)
			for i := range rounds {
				off := int64((i*workers + w) * chunk)
				if _, err := f.WriteAt(data, off); err != nil {
					t.Error(err)
					return
				}
				if _, err := f.ReadAt(buf, off); err != nil || !bytes.Equal(buf, data) {
					t.Errorf("read back differs: %v", err)
					return
				}
				if i%5 == 0 {
					if err := f.Sync(); err != nil {
						t.Error(err)
						return
					}
					ffs.Durable()
				}
				ffs.Writes()
				ffs.NoSpaceAfter(-1)
				ffs.ShortWrites(false)
			}
			if err := f.Sync(); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if ffs.Writes() != workers*rounds {
		t.Fatalf("Writes = %d", ffs.Writes())
	}
	// Everything was synced at the end: durable equals live.
	d := ffs.Durable()
	for i := range 3 {
		name := fmt.Sprintf("f%d", i)
		live, _ := content(t, ffs, name)
		dur, _ := content(t, d, name)
		if !bytes.Equal(live, dur) || len(live) == 0 {
			t.Fatalf("%s: durable (%d bytes) differs from live (%d bytes)", name, len(dur), len(live))
		}
	}
}

// plainFS hides the optional interfaces of the files of the storage it
// wraps.
type plainFS struct{ driver.Storage }

type plainFile struct{ driver.File }

func (p plainFS) Open(name string, flag driver.OpenFlag) (driver.File, error) {
	f, err := p.Storage.Open(name, flag)
	if err != nil {
		return nil, err
	}
	return plainFile{f}, nil
}

func TestOptionalInterfaceFallbacks(t *testing.T) {
	ffs := New(plainFS{memfs.New()})
	f := mustOpen(t, ffs, "img", driver.ReadWrite|driver.Create)
	mustWrite(t, f, bytes.Repeat([]byte{9}, 3<<20), 0)
	hs := f.(driver.HoleSeeker)
	if d, err := hs.SeekData(5); err != nil || d != 5 {
		t.Errorf("SeekData = %d, %v; want 5 (all data)", d, err)
	}
	if h, err := hs.SeekHole(5); err != nil || h != 3<<20 {
		t.Errorf("SeekHole = %d, %v; want the size", h, err)
	}
	if _, err := hs.SeekData(3 << 20); err != io.EOF {
		t.Errorf("SeekData at EOF: %v", err)
	}
	if err := f.(driver.ZeroRanger).ZeroRange(10, 2<<20); err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte{9}, 3<<20)
	clear(want[10 : 10+2<<20])
	if got := readAll(t, f, 0, 3<<20); !bytes.Equal(got, want) {
		t.Error("emulated ZeroRange content differs")
	}
	if err := f.(driver.Allocator).Allocate(0, 10); !errors.Is(err, driver.ErrUnsupported) {
		t.Errorf("Allocate: %v", err)
	}
	if _, err := f.(driver.AllocatedSizer).AllocatedSize(); !errors.Is(err, driver.ErrUnsupported) {
		t.Errorf("AllocatedSize: %v", err)
	}
	// The wrapped storage is not a *memfs.FS: nothing is tracked.
	if _, err := ffs.Durable().Stat("img"); !errors.Is(err, driver.ErrUnsupported) {
		t.Errorf("Durable: %v", err)
	}
}
