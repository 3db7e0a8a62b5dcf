package disktest

import (
	"testing"

	"github.com/vdisk/vdisk/driver"
)

// FillWant is what the fill tests expect an image to read after a write
// of p at off: own (the image's own content), where each free unit (of
// unit bytes, numbered in free) that lies wholly inside [fillOff,
// fillEnd) now holds view's content (the chain's, copied in by a filled
// write; view nil: no fill), and p over all of it.
func FillWant(own []byte, unit int64, free []int64, p []byte, off int64, view []byte, fillOff, fillEnd int64) []byte {
	want := append([]byte(nil), own...)
	size := int64(len(own))
	for _, u := range free {
		lo, hi := u*unit, min((u+1)*unit, size)
		if view != nil && lo >= fillOff && hi <= fillEnd {
			copy(want[lo:hi], view[lo:hi])
		}
	}
	copy(want[off:], p)
	return want
}

// CheckImage reads the image as the driver alone shows it (its data runs;
// every other run reads as zeros, since no parent is attached) and fails
// the test at the first byte that differs from want, naming the unit of
// unit bytes it lies in.
func CheckImage(t testing.TB, im driver.Image, want []byte, unit int64) {
	t.Helper()
	size := int64(len(want))
	got := make([]byte, size)
	for pos := int64(0); pos < size; {
		e, err := im.Status(pos, size-pos)
		if err != nil {
			t.Fatal(err)
		}
		if e.Length <= 0 {
			t.Fatalf("Status(%d) returned an empty run", pos)
		}
		if e.State == driver.Data {
			if _, err := im.ReadAt(got[pos:pos+e.Length], pos); err != nil {
				t.Fatal(err)
			}
		}
		pos += e.Length
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("content differs first at byte %d (unit %d of %d bytes): %#x, want %#x", i, int64(i)/unit, unit, got[i], want[i])
		}
	}
}
