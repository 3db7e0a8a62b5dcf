package vhdx

import (
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/storage/memfs"
)

// TestModelChain: a dynamic base and two differencing layers grown during
// the run (sector bitmaps, partial blocks, copy-on-write at sector edges),
// 10^4 random operations with reopens, parallel batches, zeroes and
// discards, against the reference model.
func TestModelChain(t *testing.T) {
	for _, c := range []struct {
		name string
		size int64
		opts []string
	}{
		{"512", 12<<20 + 4096, []string{"block_size=1M"}},
		{"4k", 16 << 20, []string{"block_size=2M", "logical_sector_size=4096"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			mem := memfs.New()
			opts := disktest.KVs(c.opts...)
			d := createVHDX(t, mem, "/base.vhdx", c.size, "", opts...)
			m := model.New(d.Size())
			ch := &model.Chain{Storage: mem, Format: "vhdx", Ext: "vhdx", Options: opts, MaxDepth: 2, Top: "/base.vhdx"}
			// Every reopen compacts the top first: blocks move, the file
			// is cut, and freed space is reused by later allocations.
			compacts := 0
			reopen := func(d *vdisk.Disk) (*vdisk.Disk, error) {
				if err := d.Compact(ctx, nil); err != nil {
					return nil, err
				}
				compacts++
				return ch.Reopen(d)
			}
			h := &model.Harness{Seed: 16, Ops: 10000, MaxIO: 640 << 10, Reopen: reopen, Snapshot: ch.Snapshot}
			if c.name == "4k" {
				h.Ops = 2000
			}
			d = h.Run(t, d, m)
			if ch.Depth != 2 || compacts == 0 {
				t.Fatalf("the chain grew to %d diff layers (want 2), %d compactions", ch.Depth, compacts)
			}
			if n := len(d.Layers()); n != 3 {
				t.Fatalf("%d layers", n)
			}
			disktest.MustClose(t, d)
			d2, err := vdisk.Open(ctx, ch.Top, &vdisk.OpenOptions{Storage: mem, ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			h.Verify(t, d2, m)
			disktest.MustClose(t, d2)
		})
	}
}

// TestModelBase: a dynamic and a fixed image alone, with reopens.
func TestModelBase(t *testing.T) {
	for _, sub := range []string{"dynamic", "fixed"} {
		t.Run(sub, func(t *testing.T) {
			mem := memfs.New()
			opts := disktest.KVs("block_size=1M", "subformat="+sub)
			d := createVHDX(t, mem, "/base.vhdx", 10<<20, "", opts...)
			m := model.New(d.Size())
			ch := &model.Chain{Storage: mem, Top: "/base.vhdx"}
			h := &model.Harness{Seed: 3, Ops: 2000, MaxIO: 1 << 20, Reopen: ch.Reopen}
			d = h.Run(t, d, m)
			disktest.MustClose(t, d)
		})
	}
}
