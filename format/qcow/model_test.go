package qcow

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

// TestModelChain runs the reference model over a qcow chain that grows
// from a base to two diff images (snapshot steps), with reopen steps
// (the container probes every backing file: qcow records no format) and
// parallel batches, under several geometries. The base is smaller than the
// images above it and starts with compressed clusters. Afterwards the top
// is made empty (qemu's make_empty) and reads its backing chain again.
func TestModelChain(t *testing.T) {
	for _, c := range []struct {
		seed     int64
		cb, l2b  uint8 // 0: qemu's geometry
		size     int64
		ops      int
		parallel int
	}{
		{1, 0, 0, 4 << 20, 10000, 4},
		{2, 16, 6, 6<<20 + 512, 3000, 4},
		{3, 10, 8, 3<<20 + 4096, 10000, 2},
	} {
		t.Run(fmt.Sprintf("seed%d-cb%d", c.seed, c.cb), func(t *testing.T) {
			if c.cb != 0 {
				withGeometry(t, c.cb, c.l2b)
			}
			st := memfs.New()
			m := model.New(c.size)
			bsize := c.size - 8192
			base := createQcow(t, st, "/base.qcow", bsize, "")
			// Compressed clusters in the base, then a plain write.
			cw := topImage(base)
			unit := cw.CompressedUnit()
			for off := int64(0); off+unit <= bsize && off < 40*unit; off += unit {
				p := bytes.Repeat([]byte(fmt.Sprintf("cluster %d ", off/unit)), int(unit/8))[:unit]
				if err := cw.WriteCompressed(p, off); err != nil {
					t.Fatal(err)
				}
				m.Write(p, off)
			}
			disktest.MustWrite(t, base, m, bytes.Repeat([]byte{0xb7}, 300000), bsize-300000)
			disktest.MustClose(t, base)
			d := createQcow(t, st, "/l1.qcow", c.size, "base.qcow")
			g := &model.Chain{Storage: st, Format: "qcow", Ext: "qcow", MaxDepth: 2, Top: "/l1.qcow", Depth: 1}
			h := &model.Harness{Seed: c.seed, Ops: c.ops, MaxIO: 64 << 10, Reopen: g.Reopen, Snapshot: g.Snapshot, Parallel: c.parallel}
			d = h.Run(t, d, m)
			if g.Depth < 2 {
				t.Fatalf("the chain never grew (depth %d)", g.Depth)
			}
			ls := d.Layers()
			for i := 0; i+1 < len(ls); i++ {
				if ref := ls[i].ParentRef(); ref == nil || ref.Format != "" || ref.Name == "" {
					t.Fatalf("layer %d records parent %+v", i, ref)
				}
			}
			disktest.MustClose(t, d)

			// Reopened read-only, the chain reads the model.
			d = openQcow(t, st, g.Top, true)
			(&model.Harness{Seed: c.seed}).Verify(t, d, m)
			disktest.MustClose(t, d)

			// MakeEmpty: the top shows its backing chain again and its
			// file shrinks to the metadata.
			below := openQcow(t, st, fmt.Sprintf("/l%d.qcow", g.Depth-1), true)
			want := disktest.ReadAll(t, below)
			disktest.MustClose(t, below)
			d = openQcow(t, st, g.Top, false)
			im := topImage(d)
			if err := im.MakeEmpty(); err != nil {
				t.Fatal(err)
			}
			if got := disktest.FileSize(t, st, g.Top); got != im.lo.metaEnd {
				t.Fatalf("after make-empty the file is %d bytes, want %d", got, im.lo.metaEnd)
			}
			got := disktest.ReadAll(t, d)
			if !bytes.Equal(got[:len(want)], want) || !driver.IsZero(got[len(want):]) {
				t.Fatal("after make-empty the top does not read its backing chain")
			}
			disktest.MustWrite(t, d, nil, []byte("after"), 12345)
			disktest.MustClose(t, d)
			d = openQcow(t, st, g.Top, true)
			copy(want[12345:], "after")
			if got := disktest.ReadAll(t, d); !bytes.Equal(got[:len(want)], want) {
				t.Fatal("a write after make-empty reads wrong")
			}
			disktest.MustClose(t, d)
		})
	}
}

// TestModelCompressedBase: reads and writes over an image that is all
// compressed clusters (as convert -c leaves it): partial writes rewrite
// compressed clusters as normal ones.
func TestModelCompressedBase(t *testing.T) {
	st := memfs.New()
	const size = 2<<20 + 1536
	m := model.New(size)
	d := createQcow(t, st, "/c.qcow", size, "")
	src := make([]byte, size)
	for i := range src {
		src[i] = byte(i/3) ^ byte(i>>12)
	}
	m.Write(src, 0)
	cw := topImage(d)
	for off := int64(0); off < size; off += cw.CompressedUnit() {
		if err := cw.WriteCompressed(src[off:min(size, off+cw.CompressedUnit())], off); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if e, _ := d.Status(0, size); !e.Compressed {
		t.Fatalf("status after compressed writes: %+v", e)
	}
	h := &model.Harness{Seed: 9, Ops: 3000, MaxIO: 20000,
		Reopen: func(d *vdisk.Disk) (*vdisk.Disk, error) {
			if err := d.Close(); err != nil {
				return nil, err
			}
			return vdisk.Open(ctx, "/c.qcow", &vdisk.OpenOptions{Storage: st})
		}}
	d = h.Run(t, d, m)
	disktest.MustClose(t, d)
}
