package hugebuf

import (
	"testing"
	"unsafe"
)

// TestAlloc: buffers have the length asked for, are zeroed and writable
// end to end; large ones start on a huge page boundary; free may be
// called twice.
func TestAlloc(t *testing.T) {
	for _, n := range []int{0, 1, 4096, Size - 1, Size, Size + 1, 3*Size + 4096} {
		buf, free := Alloc(n)
		if len(buf) != n || cap(buf) != n && n >= Size {
			t.Fatalf("Alloc(%d): len %d cap %d", n, len(buf), cap(buf))
		}
		for i, c := range buf {
			if c != 0 {
				t.Fatalf("Alloc(%d): byte %d is %#x", n, i, c)
			}
		}
		for i := range buf {
			buf[i] = byte(i)
		}
		for i := 0; i < n; i += 4093 {
			if buf[i] != byte(i) {
				t.Fatalf("Alloc(%d): byte %d reads %#x", n, i, buf[i])
			}
		}
		if n >= Size {
			if p := uintptr(unsafe.Pointer(unsafe.SliceData(buf))); p%Size != 0 {
				t.Fatalf("Alloc(%d) at %#x: not on a huge page boundary", n, p)
			}
		}
		free()
		free()
	}
}

// TestArena: pieces are disjoint, of the size asked for, and run out; the
// memory stays usable while a piece is in use after Close and is freed at
// the last Release (or at Close when none is in use), exactly once.
func TestArena(t *testing.T) {
	const size, n = 256 << 10, 9
	for _, inUse := range []int{0, 1, 3} {
		a := NewArena(size, n)
		freed := 0
		free := a.free
		a.free = func() { freed++; free() }
		var pieces [][]byte
		for {
			p := a.Piece()
			if p == nil {
				break
			}
			if len(p) != size || cap(p) != size {
				t.Fatalf("piece %d: len %d cap %d", len(pieces), len(p), cap(p))
			}
			for i := range p {
				p[i] = byte(len(pieces))
			}
			pieces = append(pieces, p)
		}
		if len(pieces) != n {
			t.Fatalf("%d pieces, want %d", len(pieces), n)
		}
		for k, p := range pieces {
			for i := 0; i < size; i += 4093 {
				if p[i] != byte(k) {
					t.Fatalf("piece %d byte %d reads %d: pieces overlap", k, i, p[i])
				}
			}
		}
		for range inUse {
			a.Acquire()
		}
		a.Acquire() // a use that ends before Close
		a.Release()
		a.Close()
		a.Close()
		if a.Piece() != nil {
			t.Fatal("Piece after Close returned a piece")
		}
		for k := range inUse {
			if freed != 0 {
				t.Fatalf("in use %d: freed while a piece is in use", inUse)
			}
			pieces[k][0] = 1 // still mapped
			a.Release()
		}
		if freed != 1 {
			t.Fatalf("in use %d: freed %d times, want 1", inUse, freed)
		}
	}
}

// TestArenaBounds: an arena holds at most MaxArena bytes of pieces, and
// none where they would not fill a huge page (the heap serves those).
func TestArenaBounds(t *testing.T) {
	for _, c := range []struct{ size, n, want int }{
		{256 << 10, 24, 24},
		{64 << 20, 24, 1},
		{100 << 20, 2, 0},
		{64 << 10, 8, 0}, // 512 KiB: less than a huge page
		{0, 8, 0},
		{4096, 0, 0},
	} {
		a := NewArena(c.size, c.n)
		got := 0
		for a.Piece() != nil {
			got++
		}
		if got != c.want {
			t.Errorf("NewArena(%d, %d): %d pieces, want %d", c.size, c.n, got, c.want)
		}
		a.Close()
		if !a.Freed() {
			t.Errorf("NewArena(%d, %d): not freed after Close", c.size, c.n)
		}
	}
}
