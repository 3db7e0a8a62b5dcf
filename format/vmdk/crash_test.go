package vmdk

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/storage/faultfs"
	"github.com/vdisk/vdisk/storage/memfs"
)

// checkCrashed opens the image that survived a crash: it opens, reads what
// was flushed, checks clean, and takes writes again.
func checkCrashed(t *testing.T, st driver.Storage, top string, want []byte, what string) {
	t.Helper()
	d, err := vdisk.Open(ctx, top, &vdisk.OpenOptions{Storage: st})
	if err != nil {
		t.Fatalf("%s: the image does not open after the crash: %v", what, err)
	}
	if got := readAll(t, d); !bytes.Equal(got, want) {
		t.Fatalf("%s: content after the crash differs from what was flushed", what)
	}
	res, err := d.Check(ctx, driver.RepairNone)
	if err != nil || res.Corruptions != 0 {
		t.Fatalf("%s: check after the crash: %+v %v %q", what, res, err, res.Messages)
	}
	mustWrite(t, d, nil, fill(70000, 0xee), 1000)
	mustClose(t, d)
}

// TestCrashWrites: random writes that allocate grains (and grain tables in
// a delta disk, with copy-on-write from the parent), write zeroes and
// flushes, cut by a crash after each write operation in turn: what was
// flushed survives and the image opens clean.
func TestCrashWrites(t *testing.T) {
	const size = 2 << 20
	for _, c := range []struct {
		name  string
		opts  []string
		delta bool
	}{
		{"delta", nil, true},
		{"zeroed-delta", []string{"zeroed_grain=on"}, true},
		{"split", []string{"subformat=twoGbMaxExtentSparse"}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			top := "/base.vmdk"
			setup := func() (*memfs.FS, *model.Model) {
				mem := memfs.New()
				m := model.New(size)
				b := createDisk(t, mem, "/base.vmdk", size, "", c.opts...)
				for i := int64(0); i < size; i += 192 << 10 {
					mustWrite(t, b, m, fill(70000, byte(i>>16)), i)
				}
				mustClose(t, b)
				if c.delta {
					top = "/top.vmdk"
					d := createDisk(t, mem, top, 0, "base.vmdk", c.opts...)
					mustWrite(t, d, m, fill(100000, 0xab), 50000)
					mustClose(t, d)
				}
				return mem, m
			}
			phase := func(st driver.Storage, m *model.Model, crash func()) []byte {
				d, err := vdisk.Open(ctx, top, &vdisk.OpenOptions{Storage: st})
				if err != nil {
					t.Fatal(err)
				}
				crash()
				flushed := bytes.Clone(m.Data)
				rng := rand.New(rand.NewPCG(7, 7))
				for i := 0; i < 30; i++ {
					if i%7 == 6 {
						if d.Flush() != nil {
							break
						}
						flushed = bytes.Clone(m.Data)
						continue
					}
					n := rng.Int64N(100000) + 1
					off := rng.Int64N(size - n)
					if i%5 == 4 {
						if d.WriteZeroes(off, n, i%2 == 0) != nil {
							break
						}
						m.Zero(off, n)
						continue
					}
					p := fill(int(n), byte(i+1))
					if _, err := d.WriteAt(p, off); err != nil {
						break
					}
					m.Write(p, off)
				}
				d.Close()
				return flushed
			}
			mem, m := setup()
			ffs := faultfs.New(mem)
			phase(ffs, m, func() { ffs.Reset() })
			total := ffs.Writes()
			if total < 20 {
				t.Fatalf("only %d write operations", total)
			}
			step := max(1, total/30)
			points := 0
			for k := 1; k <= total; k += step {
				points++
				mem, m := setup()
				ffs := faultfs.New(mem)
				flushed := phase(ffs, m, func() { ffs.CrashAfterWrites(k) })
				checkCrashed(t, ffs.Durable(), top, flushed, fmt.Sprintf("crash after write %d of %d", k, total))
			}
			t.Logf("%d crash points of %d write operations", points, total)
		})
	}
}
