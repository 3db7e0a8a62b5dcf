package vmdk

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/storage/faultfs"
	"github.com/vdisk/vdisk/storage/memfs"
)

// checkCrashed opens the image that survived a crash: it opens, reads what
// was flushed, checks clean, and takes writes again. When a flush failed
// in the crash, every byte may also hold its newer value (alt): part of
// that flush may have reached the disk.
func checkCrashed(t *testing.T, st driver.Storage, top string, want, alt []byte, what string) {
	t.Helper()
	d, err := vdisk.Open(ctx, top, &vdisk.OpenOptions{Storage: st})
	if err != nil {
		t.Fatalf("%s: the image does not open after the crash: %v", what, err)
	}
	got := disktest.ReadAll(t, d)
	for i := range got {
		if got[i] != want[i] && (alt == nil || got[i] != alt[i]) {
			t.Fatalf("%s: content after the crash differs from what was flushed at byte %d (%#x, want %#x)", what, i, got[i], want[i])
		}
	}
	res, err := d.Check(ctx, driver.RepairNone)
	if err != nil || res.Corruptions != 0 {
		t.Fatalf("%s: check after the crash: %+v %v %q", what, res, err, res.Messages)
	}
	disktest.MustWrite(t, d, nil, disktest.Fill(70000, 0xee), 1000)
	disktest.MustClose(t, d)
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
					disktest.MustWrite(t, b, m, disktest.Fill(70000, byte(i>>16)), i)
				}
				disktest.MustClose(t, b)
				if c.delta {
					top = "/top.vmdk"
					d := createDisk(t, mem, top, 0, "base.vmdk", c.opts...)
					disktest.MustWrite(t, d, m, disktest.Fill(100000, 0xab), 50000)
					disktest.MustClose(t, d)
				}
				return mem, m
			}
			phase := func(st driver.Storage, m *model.Model, crash func()) (flushed, alt []byte) {
				d, err := vdisk.Open(ctx, top, &vdisk.OpenOptions{Storage: st})
				if err != nil {
					t.Fatal(err)
				}
				crash()
				flushed = bytes.Clone(m.Data)
				rng := rand.New(rand.NewPCG(7, 7))
				for i := 0; i < 30; i++ {
					if i%7 == 6 {
						if d.Flush() != nil {
							alt = bytes.Clone(m.Data)
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
					p := disktest.Fill(int(n), byte(i+1))
					if _, err := d.WriteAt(p, off); err != nil {
						break
					}
					m.Write(p, off)
				}
				d.Close()
				return flushed, alt
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
				flushed, alt := phase(ffs, m, func() { ffs.CrashAfterWrites(k) })
				checkCrashed(t, ffs.Durable(), top, flushed, alt, fmt.Sprintf("crash after write %d of %d", k, total))
			}
			t.Logf("%d crash points of %d write operations", points, total)
		})
	}
}

// TestTablesWaitForFlush: a grain written into an unallocated place is not
// yet referenced by the tables in the file (a crash now, even one that
// keeps every write, shows the old content and a clean image); Flush
// syncs the grain and then writes the tables, and Close writes them too.
func TestTablesWaitForFlush(t *testing.T) {
	for _, sub := range []string{"monolithicSparse", "twoGbMaxExtentSparse"} {
		t.Run(sub, func(t *testing.T) {
			mem := memfs.New()
			d := createDisk(t, mem, "/t.vmdk", 4<<20, "", "subformat="+sub)
			disktest.MustWrite(t, d, nil, disktest.Fill(4096, 0x11), 0)
			if err := d.Flush(); err != nil {
				t.Fatal(err)
			}
			flushed := disktest.ReadAll(t, d)
			disktest.MustWrite(t, d, nil, disktest.Fill(70000, 0x22), 1<<20)
			disktest.MustWrite(t, d, nil, disktest.Fill(100, 0x33), 2)
			now := disktest.ReadAll(t, d)
			// Every write so far reached the file, in order: the new grain
			// is there, unreferenced; the write into the allocated grain 0
			// went to its place.
			want := bytes.Clone(flushed)
			copy(want[2:], disktest.Fill(100, 0x33))
			checkCrashed(t, mem.Clone(), "/t.vmdk", want, nil, "before the flush")
			if err := d.Flush(); err != nil {
				t.Fatal(err)
			}
			checkCrashed(t, mem.Clone(), "/t.vmdk", now, nil, "after the flush")
			// Close without a flush writes the tables as well.
			disktest.MustWrite(t, d, nil, disktest.Fill(5000, 0x44), 3<<20)
			now = disktest.ReadAll(t, d)
			if err := d.CloseUnsynced(); err != nil {
				t.Fatal(err)
			}
			checkCrashed(t, mem.Clone(), "/t.vmdk", now, nil, "after close")
		})
	}
}
