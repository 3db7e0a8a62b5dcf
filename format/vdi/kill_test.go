package vdi

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/faultfs"
	"github.com/vdisk/vdisk/storage/memfs"
)

// killLoad is a random load of allocating and in-place writes, zeroes
// (unmapping ones free blocks: pack moves others into the holes),
// discards, grows and flushes, on a 12 MiB image of 1 MiB blocks (the
// only block size qemu reads).
func killLoad(d *vdisk.Disk) error {
	rng := rand.New(rand.NewPCG(21, 1))
	src := make([]byte, 320<<10)
	for i := range src {
		src[i] = byte(rng.Uint32())
	}
	const maxIO = 256 << 10
	for i := range 40 {
		size := d.Size()
		n := int64(1+rng.IntN(maxIO/512)) * 512
		off := rng.Int64N((size-n)/512+1) * 512
		var err error
		switch r := rng.IntN(100); {
		case r < 60:
			_, err = d.WriteAt(src[i%128*512:][:n], off)
		case r < 72:
			err = d.WriteZeroes(off, n, true)
		case r < 84:
			err = d.Discard(off&^(1<<20-1), min(3<<20, size-off&^(1<<20-1)))
		case r < 86:
			err = d.Resize(ctx, size+2<<20, "")
		default:
			err = d.Flush()
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// TestKillEveryWrite: a writer killed after any write leaves an image
// whose header count matches its block map (what qemu-img check compares)
// and that vdisk's Check finds no corruption in, for the block map right
// after the header (as we and qemu create it) and VirtualBox's layout with
// the map 1 MiB into the file (one larger write per map change).
func TestKillEveryWrite(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	for _, align := range []int64{sectorSize, 1 << 20} {
		t.Run(fmt.Sprintf("map-at-%d", align), func(t *testing.T) {
			defer func(a int64) { mapAlign = a }(mapAlign)
			mapAlign = align
			base := memfs.New()
			d := createVDI(t, base, "/k.vdi", 12<<20, "")
			disktest.MustClose(t, d)
			run := func(k int) (*memfs.FS, int) {
				mem := base.Clone()
				ffs := faultfs.New(mem)
				if k > 0 {
					ffs.KillAfterWrites(k)
				}
				d, err := vdisk.Open(ctx, "/k.vdi", &vdisk.OpenOptions{Storage: ffs})
				if err != nil {
					t.Fatal(err)
				}
				if err := killLoad(d); err != nil && (k == 0 || !errors.Is(err, faultfs.ErrKilled)) {
					t.Fatalf("load (kill after %d): %v", k, err)
				}
				d.Close()
				return mem, ffs.Writes()
			}
			_, total := run(0)
			dir := t.TempDir()
			// Every index of our layout; every third of VirtualBox's,
			// whose 1 MiB writes make each replay slower (and the last).
			step := 1
			if align > sectorSize {
				step = 3
			}
			for k := 1; k <= total; k = nextIndex(k, step, total) {
				mem, _ := run(k)
				d := openVDI(t, mem, "/k.vdi", true)
				im := topImage(d)
				res, err := d.Check(ctx, driver.RepairNone)
				if err != nil || res.Corruptions != 0 || im.hdr.allocated != uint32(res.AllocatedClusters) {
					t.Fatalf("killed after write %d of %d: header count %d, map %d: %+v %q %v",
						k, total, im.hdr.allocated, res.AllocatedClusters, res, res.Messages, err)
				}
				disktest.MustClose(t, d)
				if k%10 == 1 || k == total {
					p := disktest.SaveTo(t, mem, "/k.vdi", dir)
					if out, code, err := qemutest.RunCode("qemu-img", "check", "-f", "vdi", p); err != nil || code != 0 {
						t.Fatalf("killed after write %d of %d: qemu-img check exit %d: %v\n%s", k, total, code, err, out)
					}
					os.Remove(filepath.Join(dir, "k.vdi"))
				}
			}
			t.Logf("%d write indices, every %d checked", total, step)
		})
	}
}

// nextIndex steps k by step without passing total, then past it.
func nextIndex(k, step, total int) int {
	if k == total {
		return total + 1
	}
	return min(k+step, total)
}
