package parallels

import (
	"fmt"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/storage/memfs"
)

// TestModel runs the reference model (writes, discards, write-zeroes,
// parallel batches, reopens) over images of several cluster sizes and both
// prealloc modes, then grows the disk and checks that the image is clean
// and its file holds nothing past the data.
func TestModel(t *testing.T) {
	for _, c := range []struct {
		seed int64
		cs   string
		size int64
		ops  int
		pre  []driver.KV
	}{
		{1, "64k", 4 << 20, 10000, small},
		{2, "1M", 6<<20 + 512, 1000, []driver.KV{{Key: "prealloc-size", Value: "2M"}}},
		{3, "1536", 3<<20 + 4096, 4000, []driver.KV{{Key: "prealloc-mode", Value: "truncate"}, {Key: "prealloc-size", Value: "100k"}}},
	} {
		t.Run(fmt.Sprintf("seed%d-%s", c.seed, c.cs), func(t *testing.T) {
			st := memfs.New()
			name := "/m.hds"
			d := createPrl(t, st, name, c.size, append([]driver.KV{{Key: "cluster_size", Value: c.cs}}, c.pre...)...)
			m := model.New(c.size)
			reopen := func(d *vdisk.Disk) (*vdisk.Disk, error) {
				if err := d.Close(); err != nil {
					return nil, err
				}
				return vdisk.Open(ctx, name, &vdisk.OpenOptions{Storage: st, Options: c.pre})
			}
			h := &model.Harness{Seed: c.seed, Ops: c.ops, MaxIO: 64 << 10, Reopen: reopen}
			d = h.Run(t, d, m)
			res, err := d.Check(ctx, driver.RepairNone)
			if err != nil || res.Corruptions != 0 || res.Leaks != 0 {
				t.Fatalf("check after the run: %+v %v %q", res, err, res.Messages)
			}
			// Grow past the room the BAT had: clusters move out of its way.
			newSize := c.size * 40
			if err := d.Resize(ctx, newSize, ""); err != nil {
				t.Fatal(err)
			}
			m.Data = append(m.Data, make([]byte, newSize-c.size)...)
			disktest.MustWrite(t, d, m, disktest.Fill(70000, 0xE1), newSize-70000)
			(&model.Harness{Seed: c.seed}).Verify(t, d, m)
			disktest.MustClose(t, d)
			d = openPrl(t, st, name, true)
			(&model.Harness{Seed: c.seed}).Verify(t, d, m)
			res, err = d.Check(ctx, driver.RepairNone)
			if err != nil || res.Corruptions != 0 || res.Leaks != 0 {
				t.Fatalf("check after grow: %+v %v %q", res, err, res.Messages)
			}
			im := topImage(d)
			fi, _ := st.Stat(name)
			if fi.Size != im.usedEndLocked() {
				t.Fatalf("file of %d bytes, data ends at %d", fi.Size, im.usedEndLocked())
			}
			disktest.MustClose(t, d)
		})
	}
}
