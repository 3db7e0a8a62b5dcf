package raw_test

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/model"
)

// TestStatusCostsNoSeekWhenCached: after a status walk, 4 KiB reads (the
// NBD server's hot path: every Disk read asks Status) cost no lseek; a walk
// costs one lseek per run boundary; the image's own changes are seen.
func TestStatusCostsNoSeekWhenCached(t *testing.T) {
	disktest.StatusCache(t, "raw")
}

// TestModelCache runs the reference model on a raw image on a real file
// system (where SEEK_DATA/SEEK_HOLE answer, so the extent cache is used),
// with parallel batches: a stale "zero" run would read back as zeros
// where data was written. At the end, every run the cached image reports
// agrees with a fresh open's (uncached) view of the file's content.
func TestModelCache(t *testing.T) {
	for _, seed := range []int64{1, 2} {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			name := filepath.Join(t.TempDir(), "m.raw")
			size := int64(8<<20 + 512*int(seed))
			d, err := vdisk.Create(ctx, name, &vdisk.CreateOptions{Format: "raw", Size: size})
			if err != nil {
				t.Fatal(err)
			}
			m := model.New(size)
			h := &model.Harness{Seed: seed, Ops: 2000, MaxIO: 256 << 10, Unit: 4096}
			d = h.Run(t, d, m)
			defer d.Close()
			if err := d.Flush(); err != nil {
				t.Fatal(err)
			}
			fresh, err := os.ReadFile(name)
			if err != nil {
				t.Fatal(err)
			}
			checkZeroRuns(t, d, fresh)
		})
	}
}

// checkZeroRuns: where d's status says zero, the file (read apart from
// the image: fresh) holds zeros.
func checkZeroRuns(t *testing.T, d *vdisk.Disk, fresh []byte) {
	t.Helper()
	err := d.Map(ctx, 0, d.Size(), func(e vdisk.Extent) error {
		if e.State == driver.Data {
			return nil
		}
		p := fresh[min(e.Start, int64(len(fresh))):min(e.Start+e.Length, int64(len(fresh)))]
		if i := bytes.IndexFunc(p, func(r rune) bool { return r != 0 }); i >= 0 {
			return fmt.Errorf("run at %d+%d reported %v holds data at %d", e.Start, e.Length, e.State, e.Start+int64(i))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestCacheConcurrent hammers one image from goroutines that each own a
// region and write, discard, zero and ask status in it while others do
// the same next door (runs spanning regions are cached by any of them):
// every status answer must match the goroutine's own knowledge.
func TestCacheConcurrent(t *testing.T) {
	const regions, region = 8, 1 << 20
	name := filepath.Join(t.TempDir(), "c.raw")
	d, err := vdisk.Create(ctx, name, &vdisk.CreateOptions{Format: "raw", Size: regions * region})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	var wg sync.WaitGroup
	errs := make(chan error, regions)
	for g := range regions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 7))
			base := int64(g) * region
			const blk = 64 << 10 // the cache forgets whole 64 KiB blocks
			data := make([]bool, region/blk)
			p := bytes.Repeat([]byte{byte(g + 1)}, blk)
			for i := range 400 {
				b := rng.IntN(len(data))
				off := base + int64(b)*blk
				switch rng.IntN(4) {
				case 0:
					if _, err := d.WriteAt(p[:rng.IntN(blk-1)+1], off); err != nil {
						errs <- err
						return
					}
					data[b] = true
				case 1:
					if err := d.Discard(off, blk); err != nil {
						errs <- err
						return
					}
					data[b] = false
				case 2:
					if err := d.WriteZeroes(off, blk, true); err != nil {
						errs <- err
						return
					}
					data[b] = false
				default:
					e, err := d.Status(off, blk)
					if err != nil {
						errs <- err
						return
					}
					if got := e.State == driver.Data; got != data[b] {
						errs <- fmt.Errorf("goroutine %d op %d: status at %d is %v, the block holds data: %v", g, i, off, e.State, data[b])
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}
