package disktest

import (
	"sync/atomic"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

// Lend checks the driver.CompressedLender contract of d's top image, a new
// image at least len(data) bytes long: it writes data unit by unit through
// WriteCompressedLent (all-zero units skipped, as Convert skips them) and
// closes d. Each unit goes in a buffer of its own that is overwritten with
// garbage the moment the image releases it, so an image that lets go of a
// buffer it still reads stores the garbage: the caller then checks that
// the file holds data. Lend fails the test unless every buffer was
// released exactly once by the time Close returned, and unless a refused
// call (an offset inside a unit) leaves its buffer unreleased.
func Lend(t testing.TB, d *vdisk.Disk, data []byte) {
	t.Helper()
	cl, ok := vdisk.As[driver.CompressedLender](d.Top())
	if !ok {
		t.Fatalf("%s does not lend: no driver.CompressedLender", d.Top().Format.Name)
	}
	u := cl.CompressedUnit()
	if u < 2 {
		t.Fatalf("compressed unit %d", u)
	}
	var refused atomic.Int32
	bad := make([]byte, u)
	if err := cl.WriteCompressedLent(bad, 1, func() { refused.Add(1) }); err == nil {
		t.Fatal("WriteCompressedLent at offset 1 succeeded")
	}
	type lent struct {
		buf      []byte
		releases atomic.Int32
	}
	var all []*lent
	for off := int64(0); off < int64(len(data)); off += u {
		p := data[off:min(off+u, int64(len(data)))]
		if driver.IsZero(p) {
			continue
		}
		l := &lent{buf: append([]byte(nil), p...)}
		all = append(all, l)
		release := func() {
			// Garbage that compresses well and differs from any input.
			for i := range l.buf {
				l.buf[i] = byte(i) ^ 0xa5
			}
			l.releases.Add(1)
		}
		if err := cl.WriteCompressedLent(l.buf, off, release); err != nil {
			t.Fatalf("WriteCompressedLent at %d: %v", off, err)
		}
	}
	if len(all) == 0 {
		t.Fatal("no data to lend")
	}
	MustClose(t, d)
	for i, l := range all {
		if n := l.releases.Load(); n != 1 {
			t.Errorf("buffer %d of %d released %d times", i, len(all), n)
		}
	}
	if n := refused.Load(); n != 0 {
		t.Errorf("a refused call released its buffer %d times", n)
	}
}
