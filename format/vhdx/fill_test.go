package vhdx

import (
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// TestFillError calls a differencing image directly: writes (and write
// zeroes) covering part of a logical sector the image does not hold ask
// for that sector's rest and write nothing; whole sectors, sectors the
// image holds, and images without a parent never ask.
func TestFillError(t *testing.T) {
	for _, lss := range []int64{512, 4096} {
		mem := memfs.New()
		opts := disktest.KVs("block_size=1M", "logical_sector_size="+map[int64]string{512: "512", 4096: "4096"}[lss])
		d := createVHDX(t, mem, "/base.vhdx", 4<<20, "", opts...)
		disktest.MustWrite(t, d, nil, disktest.Fill(4<<20, 0x11), 0)
		disktest.MustClose(t, d)
		d = createVHDX(t, mem, "/top.vhdx", 0, "base.vhdx", opts...)
		im := topImage(d)
		// The image holds sector 8 of block 1 (from an aligned write).
		held := int64(1<<20) + 8*lss
		if _, err := im.WriteAt(disktest.Fill(int(lss), 0x22), held); err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct {
			name        string
			off, n      int64
			fill        bool
			start, stop int64
		}{
			{"head", 100, lss, true, 0, 2 * lss},
			{"tail", 0, lss + 10, true, 0, 2 * lss},
			{"both", 10, lss, true, 0, 2 * lss},
			{"inside-one", 2*lss + 5, 7, true, 2 * lss, 3 * lss},
			{"whole-sectors", 3 * lss, 2 * lss, false, 0, 0},
			{"across-blocks", 1<<20 - lss, 2 * lss, false, 0, 0},
			{"held-head", held + 7, lss - 7, false, 0, 0},
			{"held-tail-unheld-head", held - 3, 13, true, held - lss, held + 10},
			{"held-both", held + 1, 5, false, 0, 0},
		} {
			for _, zero := range []bool{false, true} {
				name := c.name
				if zero {
					name += "/zeroes"
				}
				before, _ := im.Status(c.off, c.n)
				fsize, _ := im.f.Size()
				var err error
				if zero {
					err = im.WriteZeroes(c.off, c.n, false)
				} else {
					_, err = im.WriteAt(disktest.Fill(int(c.n), 0x33), c.off)
				}
				fe, isFill := driver.AsFill(err)
				if isFill != c.fill {
					t.Fatalf("%d/%s: error %v, fill wanted %v", lss, name, err, c.fill)
				}
				if !c.fill {
					if err != nil {
						t.Fatalf("%d/%s: %v", lss, name, err)
					}
					continue
				}
				if fe.Off != c.start || fe.Off+fe.Len != c.stop {
					t.Fatalf("%d/%s: fill [%d, %d), want [%d, %d)", lss, name, fe.Off, fe.Off+fe.Len, c.start, c.stop)
				}
				after, _ := im.Status(c.off, c.n)
				fsize2, _ := im.f.Size()
				if before != after || fsize != fsize2 {
					t.Fatalf("%d/%s: a write asking for a fill changed the image", lss, name)
				}
			}
		}
		// No parent: the base fills partial sectors itself.
		disktest.MustClose(t, d)
		d2 := openVHDX(t, mem, "/base.vhdx", false)
		if _, err := topImage(d2).WriteAt([]byte{1, 2, 3}, 3<<20+5); err != nil {
			t.Fatalf("base image: %v", err)
		}
		disktest.MustClose(t, d2)
	}
}
