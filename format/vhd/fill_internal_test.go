package vhd

import (
	"bytes"
	"context"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/memfs"
)

const testBS = 64 << 10

// newTestImage creates a 1 MiB image with 64 KiB blocks directly through
// the driver: a differencing one (its parent file need not exist: the
// driver never reads it) or a dynamic one.
func newTestImage(t *testing.T, st driver.Storage, diff bool) *image {
	t.Helper()
	vals, err := driver.ParseOptions("vpc", Format.CreateOptions, []driver.KV{{Key: "block_size", Value: "64K"}, {Key: "force_size", Value: "on"}})
	if err != nil {
		t.Fatal(err)
	}
	p := &driver.CreateParams{Storage: st, Name: "/t.vhd", Size: 1 << 20, Options: vals}
	if diff {
		p.ParentRef = &driver.ParentRef{Name: "base.vhd"}
		p.ParentInfo = &driver.ParentInfo{Format: "vpc", Size: 1 << 20, Path: "/base.vhd"}
	}
	di, err := create(context.Background(), p)
	if err != nil {
		t.Fatal(err)
	}
	im := di.(*image)
	t.Cleanup(func() { im.Close() })
	return im
}

// statusMap is the image's Status runs over the whole disk.
func statusMap(t *testing.T, im *image) []driver.Extent {
	t.Helper()
	var out []driver.Extent
	for off := int64(0); off < im.Size(); {
		e, err := im.Status(off, im.Size()-off)
		if err != nil {
			t.Fatal(err)
		}
		e.Offset = 0 // only the states and lengths matter here
		out = append(out, e)
		off += e.Length
	}
	return out
}

// TestNeedFill: a write (or WriteZeroes) covering part of a sector that a
// differencing image does not hold asks for the sector to be filled from
// the chain, rounded out to sectors only at the partial absent ends, and
// changes nothing; the container's extended write then succeeds. Whole
// sectors, held sectors and dynamic images never ask.
func TestNeedFill(t *testing.T) {
	const bs = testBS
	type rng struct{ off, n int64 }
	for _, c := range []struct {
		name    string
		diff    bool
		pre     []rng // sector-aligned writes of 0x11 before the test write
		zero    bool  // WriteZeroes instead of WriteAt
		off, n  int64
		fill    bool
		fillOff int64
		fillEnd int64
	}{
		{name: "unaligned head", diff: true, off: 1000, n: 536, fill: true, fillOff: 512, fillEnd: 1536},
		{name: "unaligned tail", diff: true, off: 1024, n: 276, fill: true, fillOff: 1024, fillEnd: 1536},
		{name: "unaligned both", diff: true, off: 1000, n: 100, fill: true, fillOff: 512, fillEnd: 1536},
		{name: "inside one sector", diff: true, off: 600, n: 100, fill: true, fillOff: 512, fillEnd: 1024},
		{name: "across blocks", diff: true, off: bs - 100, n: 200, fill: true, fillOff: bs - 512, fillEnd: bs + 512},
		{name: "allocated block, absent sector", diff: true, pre: []rng{{0, 512}}, off: 5000, n: 100, fill: true, fillOff: 4608, fillEnd: 5120},
		{name: "head present, tail absent", diff: true, pre: []rng{{512, 512}}, off: 600, n: 500, fill: true, fillOff: 600, fillEnd: 1536},
		{name: "head absent, tail present", diff: true, pre: []rng{{1024, 512}}, off: 600, n: 500, fill: true, fillOff: 512, fillEnd: 1100},
		{name: "last sector of the disk", diff: true, off: 1<<20 - 10, n: 10, fill: true, fillOff: 1<<20 - 512, fillEnd: 1 << 20},
		{name: "zeroes unaligned", diff: true, zero: true, off: 1000, n: 3000, fill: true, fillOff: 512, fillEnd: 4096},
		{name: "zeroes unaligned over blocks", diff: true, zero: true, off: 100, n: 3 * bs, fill: true, fillOff: 0, fillEnd: 3*bs + 512},
		{name: "sector-aligned no fill", diff: true, off: 1024, n: 1024},
		{name: "sector-aligned over blocks no fill", diff: true, off: bs - 512, n: bs + 1024},
		{name: "zeroes sector-aligned no fill", diff: true, zero: true, off: 512, n: 2 * bs},
		{name: "present sector no fill", diff: true, pre: []rng{{512, 512}}, off: 600, n: 100},
		{name: "present sectors no fill", diff: true, pre: []rng{{0, 1024}, {1536, 512}}, off: 1000, n: 700},
		{name: "zeroes present sector no fill", diff: true, zero: true, pre: []rng{{512, 512}}, off: 600, n: 100},
		{name: "base image no fill", off: 1000, n: 100},
		{name: "base image across blocks no fill", off: bs - 100, n: 200},
		{name: "base image allocated block no fill", pre: []rng{{0, 512}}, off: 5000, n: 100},
		{name: "base image zeroes no fill", zero: true, pre: []rng{{0, 2 * bs}}, off: 1000, n: bs},
	} {
		t.Run(c.name, func(t *testing.T) {
			st := memfs.New()
			im := newTestImage(t, st, c.diff)
			model := make([]byte, im.Size()) // what the disk shows; the parent reads 0x77
			held := make([]bool, im.Size()/sectorSize)
			if c.diff {
				for i := range model {
					model[i] = 0x77
				}
			}
			write := func(p []byte, off int64) {
				t.Helper()
				if _, err := im.WriteAt(p, off); err != nil {
					t.Fatalf("write [%d, +%d): %v", off, len(p), err)
				}
				copy(model[off:], p)
				for s := off / sectorSize; s < (off+int64(len(p))+sectorSize-1)/sectorSize; s++ {
					held[s] = true
				}
			}
			for _, p := range c.pre {
				write(bytes.Repeat([]byte{0x11}, int(p.n)), p.off)
			}
			if err := im.Flush(); err != nil {
				t.Fatal(err)
			}
			fileBefore, _ := st.ReadFile("/t.vhd")
			statusBefore := statusMap(t, im)

			data := bytes.Repeat([]byte{0xa5}, int(c.n))
			var err error
			if c.zero {
				clear(data)
				err = im.WriteZeroes(c.off, c.n, true)
			} else {
				_, err = im.WriteAt(data, c.off)
			}
			fe, isFill := driver.AsFill(err)
			if !c.fill {
				if err != nil {
					t.Fatalf("got %v, want no error", err)
				}
				copy(model[c.off:], data)
				for s := c.off / sectorSize; s < (c.off+c.n+sectorSize-1)/sectorSize; s++ {
					held[s] = true
				}
			} else {
				if !isFill {
					t.Fatalf("got %v, want a FillError for [%d, %d)", err, c.fillOff, c.fillEnd)
				}
				if fe.File != "/t.vhd" || fe.Off != c.fillOff || fe.Off+fe.Len != c.fillEnd {
					t.Fatalf("FillError %s [%d, %d), want [%d, %d)", fe.File, fe.Off, fe.Off+fe.Len, c.fillOff, c.fillEnd)
				}
				// Nothing was written.
				if err := im.Flush(); err != nil {
					t.Fatal(err)
				}
				fileAfter, _ := st.ReadFile("/t.vhd")
				if !bytes.Equal(fileBefore, fileAfter) {
					t.Fatal("the image file changed under a fill request")
				}
				statusAfter := statusMap(t, im)
				if len(statusAfter) != len(statusBefore) {
					t.Fatalf("status changed under a fill request: %v, was %v", statusAfter, statusBefore)
				}
				for i := range statusAfter {
					if statusAfter[i] != statusBefore[i] {
						t.Fatalf("status changed under a fill request: %v, was %v", statusAfter, statusBefore)
					}
				}
				// The container's answer: the request extended with what
				// the chain shows around it.
				ext := append([]byte(nil), model[fe.Off:fe.Off+fe.Len]...)
				copy(ext[c.off-fe.Off:], data)
				write(ext, fe.Off)
			}
			// The image reads the model where it holds sectors; Status says
			// Data exactly there.
			got := make([]byte, im.Size())
			if _, err := im.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			for s := range held {
				off := int64(s) * sectorSize
				e, err := im.Status(off, sectorSize)
				if err != nil {
					t.Fatal(err)
				}
				want := held[s] || !c.diff && e.State == driver.Data // a dynamic image's new block is all data
				if (e.State == driver.Data) != want {
					t.Fatalf("sector %d: %v, held %v", s, e.State, held[s])
				}
				if e.State == driver.Data && !bytes.Equal(got[off:off+sectorSize], model[off:off+sectorSize]) {
					t.Fatalf("sector %d reads differently", s)
				}
				if !c.diff && !bytes.Equal(got[off:off+sectorSize], model[off:off+sectorSize]) {
					t.Fatalf("dynamic image: sector %d reads differently", s)
				}
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			res := reopenCheck(t, st)
			if res.Corruptions+res.Leaks != 0 {
				t.Fatalf("check: %+v %v", res, res.Messages)
			}
		})
	}
}

func reopenCheck(t *testing.T, st driver.Storage) *driver.CheckResult {
	t.Helper()
	di, err := open(context.Background(), &driver.OpenParams{Storage: st, Name: "/t.vhd", Options: driver.Values{}})
	if err != nil {
		t.Fatal(err)
	}
	defer di.Close()
	res, err := di.(driver.Checker).Check(context.Background(), driver.RepairNone)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// TestDiscardUnallocates: every whole block inside a discarded range
// becomes Unallocated (BAT entry free) in dynamic and differencing images;
// partial blocks keep what they hold; Compact then packs the file without
// changing what the image reads.
func TestDiscardUnallocates(t *testing.T) {
	const bs = testBS
	for _, diff := range []bool{false, true} {
		name := "dynamic"
		if diff {
			name = "differencing"
		}
		t.Run(name, func(t *testing.T) {
			st := memfs.New()
			im := newTestImage(t, st, diff)
			if im.Info().ClusterSize != bs {
				t.Fatalf("cluster size %d", im.Info().ClusterSize)
			}
			p := make([]byte, 1<<20)
			for i := range p {
				p[i] = byte(i/bs + 1)
			}
			if _, err := im.WriteAt(p, 0); err != nil {
				t.Fatal(err)
			}
			// Blocks 3..5 whole, parts of 2 and 6; then the last block.
			if err := im.Discard(2*bs+512, 4*bs); err != nil {
				t.Fatal(err)
			}
			if err := im.Discard(15*bs, bs); err != nil {
				t.Fatal(err)
			}
			for b := int64(0); b < 16; b++ {
				free := b >= 3 && b <= 5 || b == 15
				if (im.bat[b] == batUnused) != free {
					t.Fatalf("block %d: entry %#x, want free %v", b, im.bat[b], free)
				}
				e, err := im.Status(b*bs, bs)
				if err != nil {
					t.Fatal(err)
				}
				if free != (e.State == driver.Unallocated) || e.Length != bs {
					t.Fatalf("block %d: %+v", b, e)
				}
			}
			sizeBefore, _ := im.f.Size()
			var last, total int64
			if err := im.Compact(context.Background(), func(d, n int64) { last, total = d, n }); err != nil {
				t.Fatal(err)
			}
			if last != total || total != 12 {
				t.Fatalf("progress %d of %d", last, total)
			}
			sizeAfter, _ := im.f.Size()
			if want := packedEnd(im.metaEnd, 12, bs) + footerSize; sizeAfter != want {
				t.Fatalf("file %d bytes after compact (was %d), want %d", sizeAfter, sizeBefore, want)
			}
			got := make([]byte, 1<<20)
			if _, err := im.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			want := append([]byte(nil), p...)
			clear(want[3*bs : 6*bs])
			clear(want[15*bs:])
			if !bytes.Equal(got, want) {
				t.Fatal("content changed by discard + compact")
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			if res := reopenCheck(t, st); res.Corruptions+res.Leaks != 0 || res.AllocatedClusters != 12 {
				t.Fatalf("check: %+v %v", res, res.Messages)
			}
		})
	}
}

// packedEnd is where n blocks of bs bytes (and a one-sector bitmap) end
// when packed from off on, each block's data aligned (dataAlign).
func packedEnd(off, n, bs int64) int64 {
	for range n {
		off = roundUp(off+512, dataAlign) + bs
	}
	return off
}
