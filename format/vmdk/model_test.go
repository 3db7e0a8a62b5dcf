package vmdk

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

// TestModel runs the reference model (writes, write-zeroes, discards,
// reads, flushes, reopens, parallel batches) over every writable
// subformat, then over a chain that grows from a base to two delta disks
// (snapshot steps), reopened through the parentFileNameHint/CID links.
func TestModel(t *testing.T) {
	for _, c := range []struct {
		name  string
		seed  int64
		size  int64
		ops   int
		opts  []string
		chain bool
	}{
		{"sparse-chain", 1, 4 << 20, 10000, nil, true},
		{"zeroed-chain", 2, 3<<20 + 4096, 4000, []string{"zeroed_grain=on"}, true},
		{"sparse", 3, 5<<20 + 512, 4000, nil, false},
		{"flat", 4, 3 << 20, 3000, []string{"subformat=monolithicFlat"}, false},
		{"split-sparse", 5, 3 << 20, 3000, []string{"subformat=twoGbMaxExtentSparse"}, false},
		{"split-flat", 6, 3 << 20, 2000, []string{"subformat=twoGbMaxExtentFlat"}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			st := memfs.New()
			m := model.New(c.size)
			top, depth := "/l0.vmdk", 0
			d := createDisk(t, st, top, c.size, "", c.opts...)
			h := &model.Harness{
				Seed: c.seed, Ops: c.ops, MaxIO: 200 << 10,
				Reopen: func(d *vdisk.Disk) (*vdisk.Disk, error) {
					if err := d.Close(); err != nil {
						return nil, err
					}
					nd, err := vdisk.Open(ctx, top, &vdisk.OpenOptions{Storage: st})
					if err == nil && len(nd.Layers()) != depth+1 {
						return nil, fmt.Errorf("reopened chain has %d layers, want %d", len(nd.Layers()), depth+1)
					}
					return nd, err
				},
			}
			if c.chain {
				h.Snapshot = func(d *vdisk.Disk) (*vdisk.Disk, error) {
					if depth >= 2 {
						return nil, nil
					}
					if err := d.Close(); err != nil {
						return nil, err
					}
					depth++
					name := fmt.Sprintf("/l%d.vmdk", depth)
					nd, err := vdisk.Create(ctx, name, &vdisk.CreateOptions{Format: "vmdk", Backing: top[1:], BackingFormat: "vmdk",
						Options: disktest.KVs(c.opts...), Storage: st})
					top = name
					return nd, err
				}
			}
			d = h.Run(t, d, m)
			if c.chain && depth < 2 {
				t.Fatalf("the chain never grew (depth %d)", depth)
			}
			ls := d.Layers()
			for i := 0; i+1 < len(ls); i++ {
				ref := ls[i].ParentRef()
				id, ok := vdisk.As[driver.Identifier](ls[i+1])
				if !ok {
					t.Fatalf("layer %d has no CID", i+1)
				}
				if ref == nil || ref.ModUUID != id.UUID() || ref.Name == "" {
					t.Fatalf("layer %d records parent %+v, its parent's CID is %s", i, ref, id.UUID())
				}
			}
			res, err := d.Check(ctx, driver.RepairNone)
			if err != nil || res.Corruptions != 0 {
				t.Fatalf("check after the run: %+v %v %q", res, err, res.Messages)
			}
			disktest.MustClose(t, d)
			d = openDisk(t, st, top, true)
			if got := disktest.ReadAll(t, d); !bytes.Equal(got, m.Data) {
				t.Fatal("content after the final reopen differs from the model")
			}
			disktest.MustClose(t, d)
		})
	}
}
