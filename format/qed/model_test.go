package qed

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

// TestModelChain runs the reference model (10^4 operations with 4 KiB
// clusters, 4000 with 64 KiB and over a raw base: writes, zero writes,
// discards, flushes, reopens, parallel batches) over a QED chain that grows from a base and one diff image to two diff images
// (snapshot steps); the base is smaller than the images above it. Every
// image checks clean afterwards and the files hold no leaked clusters.
func TestModelChain(t *testing.T) {
	for _, c := range []struct {
		seed int64
		cs   string
		ts   string
		size int64
		ops  int
		raw  bool
	}{
		{1, "4k", "1", 4 << 20, 10000, false},
		{2, "64k", "4", 6<<20 + 512, 4000, false},
		{3, "16k", "2", 3<<20 + 4096, 4000, true},
	} {
		t.Run(fmt.Sprintf("seed%d-%s-t%s", c.seed, c.cs, c.ts), func(t *testing.T) {
			st := memfs.New()
			opts := disktest.KVs("cluster_size="+c.cs, "table_size="+c.ts)
			m := model.New(c.size)
			baseFmt, baseName := "qed", "/base.qed"
			var baseOpts []driver.KV
			if c.raw {
				baseFmt, baseName = "raw", "/base.raw"
			} else {
				baseOpts = opts
			}
			base, err := vdisk.Create(ctx, baseName, &vdisk.CreateOptions{Format: baseFmt, Size: c.size - 8192, Options: baseOpts, Storage: st})
			if err != nil {
				t.Fatal(err)
			}
			pat := bytes.Repeat([]byte{0xb7}, 300000)
			disktest.MustWrite(t, base, m, pat, c.size-8192-300000)
			disktest.MustClose(t, base)
			d := createQED(t, st, "/l1.qed", c.size, baseName[1:], baseFmt, opts...)
			g := &model.Chain{Storage: st, Format: "qed", Ext: "qed", Options: opts, MaxDepth: 2, Top: "/l1.qed", Depth: 1}
			h := &model.Harness{Seed: c.seed, Ops: c.ops, MaxIO: 64 << 10, Reopen: g.Reopen, Snapshot: g.Snapshot}
			d = h.Run(t, d, m)
			if g.Depth < 2 {
				t.Fatalf("the chain never grew (depth %d)", g.Depth)
			}
			if err := d.Flush(); err != nil {
				t.Fatal(err)
			}
			for i, l := range d.Layers() {
				if l.Format.Name != "qed" {
					continue
				}
				im, _ := vdisk.As[*image](l)
				im.mu.Lock()
				res, err := im.check(ctx, driver.RepairNone)
				im.mu.Unlock()
				if err != nil || res.Corruptions != 0 || res.Leaks != 0 {
					t.Fatalf("layer %d check after the run: %+v %v %q", i, res, err, res.Messages)
				}
			}
			// Zeroing everything with unmap leaves zero clusters only.
			if err := d.WriteZeroes(0, d.Size(), true); err != nil {
				t.Fatal(err)
			}
			m.Zero(0, c.size)
			(&model.Harness{Seed: c.seed}).Verify(t, d, m)
			disktest.MustClose(t, d)
			d = openQED(t, st, g.Top, false)
			(&model.Harness{Seed: c.seed}).Verify(t, d, m)
			res, err := d.Check(ctx, driver.RepairNone)
			if err != nil || res.Corruptions != 0 || res.Leaks != 0 {
				t.Fatalf("final check: %+v %v %q", res, err, res.Messages)
			}
			if e, err := d.Status(0, d.Size()); err != nil || e.State != driver.Zero || e.Length != d.Size() || e.Depth != 0 {
				t.Fatalf("after zeroing everything: %+v %v", e, err)
			}
			disktest.MustClose(t, d)
		})
	}
}
