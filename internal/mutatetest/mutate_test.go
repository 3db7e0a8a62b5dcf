// Package mutatetest runs every format's parsers over thousands of mutated
// images that qemu (or, for DMG, vdisk) made: bit flips, header and table
// fields smashed to edge values, sectors copied over others, truncations.
// info, check and convert must end quickly with a result or a clear error:
// never a panic, a hang or a huge allocation.
package mutatetest

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	_ "github.com/vdisk/vdisk/format/all"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/memfs"
)

var ctx = context.Background()

// seeds returns small images of every format with some data in them.
func seeds(t *testing.T) map[string]map[string][]byte {
	io := []string{"write -P 0x11 0 6k", "write -P 0x22 100k 64k", "write -z 300k 64k"}
	out := map[string]map[string][]byte{
		"vdi":       qemutest.Seeds(t, "vdi", qemutest.Seed{Name: "a", Size: "2M", IO: io}),
		"vpc":       qemutest.Seeds(t, "vpc", qemutest.Seed{Name: "a", Size: "2M", IO: io}, qemutest.Seed{Name: "f", Size: "256k", Opts: []string{"subformat=fixed"}}),
		"vmdk":      qemutest.Seeds(t, "vmdk", qemutest.Seed{Name: "a", Size: "2M", IO: io}, qemutest.Seed{Name: "s", Size: "1M", Convert: true, Opts: []string{"subformat=streamOptimized"}, IO: io[:2]}),
		"qcow2":     qemutest.Seeds(t, "qcow2", qemutest.Seed{Name: "a", Size: "2M", Opts: []string{"cluster_size=4k"}, IO: io}, qemutest.Seed{Name: "c", Size: "1M", Convert: true, Flags: []string{"-c"}, Opts: []string{"cluster_size=4k"}, IO: io[:2]}),
		"qed":       qemutest.Seeds(t, "qed", qemutest.Seed{Name: "a", Size: "2M", Opts: []string{"cluster_size=4k"}, IO: io}),
		"parallels": qemutest.Seeds(t, "parallels", qemutest.Seed{Name: "a", Size: "2M", Opts: []string{"cluster_size=4k"}, IO: io}),
		"qcow":      qemutest.Seeds(t, "qcow", qemutest.Seed{Name: "a", Size: "2M", IO: io}),
		"vhdx":      qemutest.Seeds(t, "vhdx", qemutest.Seed{Name: "a", Size: "2M", Opts: []string{"block_size=1M"}, IO: io}),
	}
	// qemu cannot write DMG: vdisk makes one from a raw image.
	st := memfs.New()
	src, err := vdisk.Create(ctx, "/s.raw", &vdisk.CreateOptions{Format: "raw", Size: 1 << 20, Storage: st})
	if err != nil {
		t.Fatal(err)
	}
	disktest.MustWrite(t, src, nil, disktest.Fill(70000, 0x33), 5000)
	out["dmg"] = map[string][]byte{}
	for _, sub := range []string{"UDZO", "UDRO"} {
		dst, err := vdisk.Create(ctx, "/d.dmg", &vdisk.CreateOptions{Format: "dmg", Size: src.Size(), Storage: st,
			Options: disktest.KVs("subformat=" + sub), Overwrite: true})
		if err != nil {
			t.Fatal(err)
		}
		if err := vdisk.Convert(ctx, dst, src, nil); err != nil {
			t.Fatal(err)
		}
		disktest.MustClose(t, dst)
		b, err := st.ReadFile("/d.dmg")
		if err != nil {
			t.Fatal(err)
		}
		out["dmg"][sub] = b
	}
	disktest.MustClose(t, src)
	return out
}

// mutate returns a damaged copy of b.
func mutate(rng *rand.Rand, b []byte) ([]byte, string) {
	c := append([]byte(nil), b...)
	// Most damage goes where metadata lives: headers in the first 64 KiB,
	// footers and trailers in the last 4 KiB, and non-zero words anywhere
	// (tables; also data, which must not matter).
	pos := func() int {
		words := len(c) / 8
		switch r := rng.IntN(20); {
		case r < 10:
			return rng.IntN(min(words, 8192)) * 8
		case r < 13:
			return (words - 1 - rng.IntN(min(words, 512))) * 8
		}
		for range 64 {
			i := rng.IntN(words) * 8
			if binary.LittleEndian.Uint64(c[i:]) != 0 {
				return i
			}
		}
		return rng.IntN(words) * 8
	}
	edges := []uint64{0, 1, 0x7fffffff, 0xffffffff, 1 << 31, 1 << 32, 1<<63 - 1, 1 << 63, ^uint64(0),
		uint64(len(c)), uint64(len(c)) + 512, uint64(len(c)) / 512, 1 << 40, 0x200, 0x10000}
	switch k := rng.IntN(6); k {
	case 0:
		i := pos() + rng.IntN(8)
		c[i] ^= 1 << rng.IntN(8)
		return c, fmt.Sprintf("bit flip at %d", i)
	case 1, 2:
		i, v := pos(), edges[rng.IntN(len(edges))]
		if rng.IntN(2) == 0 {
			binary.BigEndian.PutUint32(c[i+rng.IntN(2)*4:], uint32(v))
		} else {
			binary.BigEndian.PutUint64(c[i:], v)
		}
		return c, fmt.Sprintf("big-endian field at %d = %#x", i, v)
	case 3:
		i, v := pos(), edges[rng.IntN(len(edges))]
		binary.LittleEndian.PutUint64(c[i:], v)
		return c, fmt.Sprintf("little-endian field at %d = %#x", i, v)
	case 4:
		n := rng.IntN(len(c))
		return c[:n], fmt.Sprintf("truncated to %d", n)
	default:
		from, to := rng.IntN(len(c)/512)*512, rng.IntN(len(c)/512)*512
		copy(c[to:to+512], c[from:from+512])
		return c, fmt.Sprintf("sector %d copied over %d", from/512, to/512)
	}
}

// clear says whether err is one a user can act on.
func isClear(err error) bool {
	for _, e := range []error{driver.ErrCorrupt, driver.ErrUnsupported, driver.ErrInvalidOption, driver.ErrNotFound, driver.ErrReadOnly} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// exercise runs info, check and convert on one damaged image and reports
// whether it opened.
func exercise(t *testing.T, format string, b []byte) bool {
	disktest.WalkBytes(t, format, b, 8<<20)
	st := memfs.New()
	if err := st.WriteFile("/m.img", b); err != nil {
		t.Fatal(err)
	}
	d, err := vdisk.Open(ctx, "/m.img", &vdisk.OpenOptions{Format: format, Storage: st, ReadOnly: true, NoBacking: true})
	if err != nil {
		if !isClear(err) {
			t.Fatalf("open: unclear error %v", err)
		}
		return false
	}
	defer d.Close()
	_ = d.Top().Info()
	if _, err := d.Check(ctx, driver.RepairNone); err != nil && !isClear(err) {
		t.Fatalf("check: unclear error %v", err)
	}
	if d.Size() > 64<<20 {
		return true // converting a huge hostile disk proves nothing more
	}
	dst, err := vdisk.Create(ctx, "/out.raw", &vdisk.CreateOptions{Format: "raw", Size: d.Size(), Storage: st})
	if err != nil {
		t.Fatal(err)
	}
	if err := vdisk.Convert(ctx, dst, d, nil); err != nil && !isClear(err) {
		t.Fatalf("convert: unclear error %v", err)
	}
	dst.Close()
	return true
}

// TestMutatedImages: per format, a few hundred damaged images (thousands
// with VDISK_LONG=1) each go through info, check and convert within 10 s
// and 256 MiB of heap growth.
func TestMutatedImages(t *testing.T) {
	n := 150
	if os.Getenv("VDISK_LONG") != "" {
		n = 3000
	}
	for format, imgs := range seeds(t) {
		t.Run(format, func(t *testing.T) {
			t.Parallel()
			rng := rand.New(rand.NewPCG(uint64(len(format)), 7))
			opened := 0
			for name, good := range imgs {
				for i := range n {
					b, what := mutate(rng, good)
					done := make(chan struct{})
					timer := time.AfterFunc(10*time.Second, func() {
						select {
						case <-done:
						default:
							panic(fmt.Sprintf("%s seed %s mutation %d (%s) runs for more than 10 s", format, name, i, what))
						}
					})
					t.Run(fmt.Sprintf("%s-%d", name, i), func(t *testing.T) {
						disktest.HeapBound(t, what, 256<<20, func() {
							if exercise(t, format, b) {
								opened++
							}
						})
					})
					close(done)
					timer.Stop()
				}
			}
			// Damage that every open refuses would test the header
			// checks alone: many damaged images must open and be used.
			if total := n * len(imgs); opened < total/10 {
				t.Errorf("only %d of %d damaged images opened", opened, total)
			}
			t.Logf("%d of %d damaged images opened", opened, n*len(imgs))
		})
	}
}
