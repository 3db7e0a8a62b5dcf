package raw_test

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/storage/osfs"
)

// seekCounter is osfs with every SEEK_DATA/SEEK_HOLE counted.
type seekCounter struct {
	driver.Storage
	seeks atomic.Int64
}

type countedFile struct {
	driver.File
	s *seekCounter
}

func (s *seekCounter) Open(name string, flag driver.OpenFlag) (driver.File, error) {
	f, err := s.Storage.Open(name, flag)
	if err != nil {
		return nil, err
	}
	return &countedFile{File: f, s: s}, nil
}

func (f *countedFile) SeekData(off int64) (int64, error) {
	f.s.seeks.Add(1)
	return f.File.(driver.HoleSeeker).SeekData(off)
}

func (f *countedFile) SeekHole(off int64) (int64, error) {
	f.s.seeks.Add(1)
	return f.File.(driver.HoleSeeker).SeekHole(off)
}

func (f *countedFile) PunchHole(off, n int64) error { return f.File.PunchHole(off, n) }

func (f *countedFile) ZeroRange(off, n int64) error {
	return f.File.(driver.ZeroRanger).ZeroRange(off, n)
}

// TestStatusCostsNoSeekWhenCached: after a status walk, 4 KiB reads (the
// NBD server's hot path: every Disk read asks Status) cost no lseek; a walk
// costs one lseek per run boundary.
func TestStatusCostsNoSeekWhenCached(t *testing.T) {
	st := &seekCounter{Storage: osfs.New()}
	name := filepath.Join(t.TempDir(), "a.raw")
	d, err := vdisk.Create(ctx, name, &vdisk.CreateOptions{Format: "raw", Size: 64 << 20, Storage: st})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	// 16 data runs of 1 MiB, every other MiB from 0.
	buf := bytes.Repeat([]byte{0x5a}, 1<<20)
	for i := int64(0); i < 32; i += 2 {
		if _, err := d.WriteAt(buf, i<<20); err != nil {
			t.Fatal(err)
		}
	}
	st.seeks.Store(0)
	runs := 0
	if err := d.Map(ctx, 0, d.Size(), func(vdisk.Extent) error { runs++; return nil }); err != nil {
		t.Fatal(err)
	}
	walk := st.seeks.Load()
	if runs != 32 || walk > int64(runs)+1 {
		t.Fatalf("walk of %d runs cost %d lseeks (want 32 runs, at most one lseek per run boundary)", runs, walk)
	}
	p := make([]byte, 4096)
	for i := range 4096 {
		off := int64(i%8192) * 4096
		if _, err := d.ReadAt(p, off); err != nil {
			t.Fatal(err)
		}
	}
	if got := st.seeks.Load() - walk; got != 0 {
		t.Fatalf("4096 reads of 4 KiB after the walk cost %d lseeks, want 0", got)
	}
	// Writes inside a known data run keep the cache; a write into a hole
	// and a discard are seen at once.
	if _, err := d.WriteAt(p[:512], 4096); err != nil {
		t.Fatal(err)
	}
	if _, err := d.ReadAt(p, 0); err != nil || st.seeks.Load() != walk {
		t.Fatalf("a write inside a data run cost lseeks (%d) or failed: %v", st.seeks.Load()-walk, err)
	}
	wantStatus(t, d, 40<<20, driver.Zero)
	if _, err := d.WriteAt(buf[:4096], 40<<20); err != nil {
		t.Fatal(err)
	}
	wantStatus(t, d, 40<<20, driver.Data)
	if err := d.Discard(3<<20-4096, 2<<20+8192); err != nil {
		t.Fatal(err)
	}
	wantStatus(t, d, 3<<20-4096, driver.Zero)
	wantStatus(t, d, 4<<20, driver.Zero)
	wantStatus(t, d, 4<<20+1<<20, driver.Zero)
	wantStatus(t, d, 3<<20-8192, driver.Data)
	if err := d.WriteZeroes(6<<20, 1<<20, true); err != nil {
		t.Fatal(err)
	}
	wantStatus(t, d, 6<<20, driver.Zero)
	// Shrinking and growing again: the tail is a hole.
	if err := d.Resize(ctx, 8<<20, ""); err != nil {
		t.Fatal(err)
	}
	if err := d.Resize(ctx, 64<<20, ""); err != nil {
		t.Fatal(err)
	}
	wantStatus(t, d, 10<<20, driver.Zero)
	wantStatus(t, d, 0, driver.Data)
}

func wantStatus(t *testing.T, d *vdisk.Disk, off int64, want driver.State) {
	t.Helper()
	e, err := d.Status(off, 4096)
	if err != nil {
		t.Fatal(err)
	}
	if e.State != want {
		t.Fatalf("status at %d: %v, want %v", off, e.State, want)
	}
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
