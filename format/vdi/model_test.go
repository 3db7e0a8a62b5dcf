package vdi

import (
	"bytes"
	"fmt"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/storage/memfs"
)

// TestModelChain runs the reference model over a VDI chain that grows to a
// base and two differencing images (snapshot steps), with reopen steps in
// which the container finds every parent by its UUID among the siblings.
// Then compact and whole-disk discard keep the content.
func TestModelChain(t *testing.T) {
	for _, c := range []struct {
		seed int64
		bs   string
		size int64
		ops  int
	}{
		{1, "64K", 4 << 20, 10000},
		{2, "1M", 6<<20 + 512, 2000}, // VirtualBox's default block size: heavier copy-on-write
		{3, "32K", 3<<20 + 4096, 10000},
	} {
		t.Run(fmt.Sprintf("seed%d-%s", c.seed, c.bs), func(t *testing.T) {
			st := memfs.New()
			opts := []driver.KV{{Key: "block_size", Value: c.bs}}
			m := model.New(c.size)
			// The base is smaller than the images above it.
			base := createVDI(t, st, "/base.vdi", c.size-8192, "", opts...)
			pat := bytes.Repeat([]byte{0xb7}, 300000)
			disktest.MustWrite(t, base, m, pat, c.size-8192-300000)
			disktest.MustClose(t, base)
			d, err := vdisk.Create(ctx, "/l1.vdi", &vdisk.CreateOptions{Format: "vdi", Size: c.size, Backing: "base.vdi",
				BackingFormat: "vdi", Options: opts, Storage: st})
			if err != nil {
				t.Fatal(err)
			}
			g := &model.Chain{Storage: st, Format: "vdi", Ext: "vdi", Options: opts, MaxDepth: 2, Top: "/l1.vdi", Depth: 1}
			h := &model.Harness{Seed: c.seed, Ops: c.ops, MaxIO: 64 << 10, Reopen: g.Reopen, Snapshot: g.Snapshot}
			d = h.Run(t, d, m)
			if g.Depth < 2 {
				t.Fatalf("the chain never grew (depth %d)", g.Depth)
			}
			// The chain links by UUID.
			ls := d.Layers()
			for i := 0; i+1 < len(ls); i++ {
				ref := ls[i].ParentRef()
				id, ok := vdisk.As[driver.Identifier](ls[i+1])
				if !ok {
					t.Fatalf("layer %d is no driver.Identifier", i+1)
				}
				if ref == nil || ref.UUID != id.UUID() || ref.Name != "" {
					t.Fatalf("layer %d records parent %+v, its parent's UUID is %s", i, ref, id.UUID())
				}
			}
			if ls[len(ls)-1].ParentRef() != nil {
				t.Fatal("the base records a parent")
			}
			res, err := d.Check(ctx, driver.RepairNone)
			if err != nil || res.Corruptions != 0 || res.Leaks != 0 {
				t.Fatalf("check after the run: %+v %v %q", res, err, res.Messages)
			}

			// Compact keeps the content and never grows the file.
			before := disktest.FileSize(t, st, g.Top)
			if err := d.Compact(ctx, nil); err != nil {
				t.Fatal(err)
			}
			(&model.Harness{Seed: c.seed}).Verify(t, d, m)
			if after := disktest.FileSize(t, st, g.Top); after > before {
				t.Fatalf("compact grew the file from %d to %d", before, after)
			}
			// A reopen after compaction still finds the chain and reads the same.
			disktest.MustClose(t, d)
			d = openVDI(t, st, g.Top, false)
			(&model.Harness{Seed: c.seed}).Verify(t, d, m)

			// Writing zeros with unmap over everything leaves an image of
			// zero blocks and no data.
			if err := d.WriteZeroes(0, d.Size(), true); err != nil {
				t.Fatal(err)
			}
			m.Zero(0, c.size)
			(&model.Harness{Seed: c.seed}).Verify(t, d, m)
			im := topImage(d)
			if got, want := disktest.FileSize(t, st, g.Top), im.offData; got != want {
				t.Fatalf("after zeroing everything the file is %d bytes, want %d (no data blocks)", got, want)
			}
			res, err = d.Check(ctx, driver.RepairNone)
			if err != nil || res.Corruptions != 0 || res.Leaks != 0 {
				t.Fatalf("final check: %+v %v %q", res, err, res.Messages)
			}
			disktest.MustClose(t, d)
		})
	}
}
