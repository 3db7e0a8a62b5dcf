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
