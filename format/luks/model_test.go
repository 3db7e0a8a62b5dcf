package luks

import (
	"fmt"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/storage/memfs"
)

// TestModel runs the reference model through the encryption layer: random
// reads, writes at any byte offset (read-modify-write of partial sectors),
// zero writes, parallel batches, reopen steps (unlocking again), then a
// resize both ways.
func TestModel(t *testing.T) {
	for _, c := range []struct {
		seed int64
		opts []string
		size int64
		ops  int
	}{
		{1, nil, 4<<20 + 512, 10000},
		{2, []string{"cipher-mode=cbc", "ivgen-alg=essiv", "cipher-alg=aes-128"}, 3 << 20, 4000},
		{3, []string{"luks-version=2", "sector-size=4096"}, 3<<20 + 4096, 4000},
	} {
		t.Run(fmt.Sprintf("seed%d", c.seed), func(t *testing.T) {
			maxIO := int64(300 << 10)
			if raceEnabled {
				// Same op count, less data per op.
				c.size, maxIO = min(c.size, 1<<20+4096), 24<<10
				if c.seed != 1 {
					c.ops = 1500
				}
			}
			st := memfs.New()
			d := createLUKS(t, st, "/m.luks", c.size, "model pass", c.opts...)
			m := model.New(c.size)
			reopen := func(d *vdisk.Disk) (*vdisk.Disk, error) {
				if err := d.Close(); err != nil {
					return nil, err
				}
				return openLUKS(st, "/m.luks", "model pass", false)
			}
			h := &model.Harness{Seed: c.seed, Ops: c.ops, MaxIO: maxIO, Reopen: reopen, NoDiscard: true}
			d = h.Run(t, d, m)
			// Grow: the new range reads zeros; shrink keeps the rest.
			if err := d.Resize(ctx, c.size+64<<10, "off"); err != nil {
				t.Fatal(err)
			}
			m2 := model.New(c.size + 64<<10)
			copy(m2.Data, m.Data)
			(&model.Harness{Seed: c.seed}).Verify(t, d, m2)
			if err := d.Resize(ctx, c.size-8192, "off"); err != nil {
				t.Fatal(err)
			}
			disktest.MustClose(t, d)
			d = mustOpen(t, st, "/m.luks", "model pass", true)
			m3 := model.New(c.size - 8192)
			copy(m3.Data, m.Data)
			(&model.Harness{Seed: c.seed}).Verify(t, d, m3)
			if _, ok := vdisk.As[driver.Amender](d.Top()); !ok {
				t.Fatal("no Amender")
			}
			disktest.MustClose(t, d)
		})
	}
}
