package cache

import (
	"math/rand/v2"
	"os"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/faultfs"
	"github.com/vdisk/vdisk/storage/memfs"
)

// crashWorkload reads, writes, punches and syncs through a cache small
// enough to evict (and so commit from the read path). It stops at the
// first error (the crash).
func crashWorkload(f *File, seed uint64, size int64, writes bool) {
	rng := rand.New(rand.NewPCG(seed, 99))
	buf := make([]byte, 200000)
	for i := range 120 {
		n := rng.Int64N(int64(len(buf))) + 1
		off := rng.Int64N(size - n)
		var err error
		switch r := rng.IntN(20); {
		case r < 13:
			_, err = f.ReadAt(buf[:n], off)
		case r < 17 && !writes:
			_, err = f.ReadAt(buf[:n], off)
		case r < 17:
			for j := range buf[:n] {
				buf[j] = byte(i + j)
			}
			_, err = f.WriteAt(buf[:n], off)
		case r < 18 && writes:
			err = f.PunchHole(off, n)
		default:
			err = f.Sync()
		}
		if err != nil {
			return
		}
	}
	f.Sync()
}

// TestCrash crashes the cache file's storage after every one of the
// workload's writes to it (power loss: only what was synced survives; and
// process kill: every completed write survives). The source, a server,
// keeps what it was sent. Reopened, the cache is either used, and then
// every byte read equals the source's, or discarded.
func TestCrash(t *testing.T) {
	const size = 5 << 20
	o := Options{Size: 4 << 20, BlockSize: 64 << 10}
	_, data0 := source(t, size, 21)
	// A warm, clean cache to start from.
	warmSrc := memfs.New()
	warmSrc.WriteFile("/src", data0)
	warm := memfs.New()
	f := openCached(t, warmSrc, warm, "/c.vci", o, driver.ReadOnly)
	readAll(t, f, data0[:3<<20], 1<<20, nil)
	mustClose(t, f)

	long := os.Getenv("VDISK_LONG") != ""
	run := func(k int, kill, rw bool) (writes int, used bool) {
		src := memfs.New()
		src.WriteFile("/src", data0)
		fs := faultfs.New(warm.Clone())
		if k > 0 {
			if kill {
				fs.KillAfterWrites(k)
			} else {
				fs.CrashAfterWrites(k)
			}
		}
		f := openCached(t, src, fs, "/c.vci", o, driver.ReadWrite)
		crashWorkload(f, 7, size, rw)
		f.Close()
		writes = fs.Writes()
		if k == 0 {
			return writes, true
		}
		var left driver.Storage = fs.Inner()
		if !kill {
			left = fs.Durable()
		}
		want, _ := src.ReadFile("/src")
		g := openCached(t, src, left, "/c.vci", o, driver.ReadOnly)
		used = g.Stats().Discarded == ""
		readAll(t, g, want, 1<<20, nil)
		if st := g.Stats(); used && st.Hits == 0 {
			t.Fatalf("crash after write %d: the cache was used but served nothing", k)
		}
		mustClose(t, g)
		return writes, used
	}
	for _, rw := range []bool{true, false} {
		total, _ := run(0, false, rw)
		if total < 100 {
			t.Fatalf("the workload makes only %d writes to the cache file", total)
		}
		for _, kill := range []bool{false, true} {
			used, tried := 0, 0
			for k := 1; k <= total; k++ {
				// Without VDISK_LONG every point is tried only for power
				// loss during writes, every fifth for the other cases.
				if !long && (kill || !rw) && k%5 != 0 {
					continue
				}
				tried++
				if _, u := run(k, kill, rw); u {
					used++
				}
			}
			if used == 0 || (rw && used == tried) {
				t.Fatalf("writes=%v kill=%v: cache used after %d of %d crash points: the test proves nothing", rw, kill, used, tried)
			}
			t.Logf("writes=%v kill=%v: %d of %d crash points tried; cache used after %d, discarded after %d; data always right", rw, kill, tried, total, used, tried-used)
		}
	}
}

// TestFaults: failing cache I/O never fails or corrupts reads: the block
// is served from the source.
func TestFaults(t *testing.T) {
	const size = 2 << 20
	mem, data := source(t, size, 31)
	fs := faultfs.New(memfs.New())
	f := openCached(t, mem, fs, "/c.vci", small, driver.ReadOnly)
	readAll(t, f, data[:1<<20], 65536, nil)
	fs.FailWriteAfter(1, nil)
	fs.FailReadAfter(1, nil)
	readAll(t, f, data, 100000, nil)
	fs.Reset()
	readAll(t, f, data, 100000, nil)
	mustClose(t, f)
}
