package cache

import (
	"bytes"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/memfs"
	"github.com/vdisk/vdisk/storage/osfs"
)

// TestDirectFill: reads that cover whole missing blocks fetch them from
// the source straight into the caller's buffer, in runs of up to
// fetchUnit (one source read per run), and keep them: every byte is
// fetched once, a second pass reads nothing from the source, and a
// reopened persistent cache serves them too.
func TestDirectFill(t *testing.T) {
	// Background flushes every few blocks (they run concurrently with
	// the fills and the commit at close).
	defer func(n int64) { flushAheadBytes = n }(flushAheadBytes)
	flushAheadBytes = 256 << 10
	const size = 8 << 20
	for _, c := range []struct {
		name      string
		bs        int64
		off, n    int64 // the reads: [off+k*n, off+(k+1)*n) until size
		parallel  int   // goroutines reading interleaved pieces
		wantReads int64 // source reads of the first pass
	}{
		{"aligned 2M reads, 256K blocks", 256 << 10, 0, 2 << 20, 1, 8},
		{"aligned 4M reads, 1M blocks", 1 << 20, 0, 4 << 20, 1, 8},
		{"one block at a time", 64 << 10, 0, 64 << 10, 1, 128},
		{"unaligned 3M reads, 256K blocks", 256 << 10, 100, 3 << 20, 1, -1},
		{"8 readers of 2M, 64K blocks", 64 << 10, 0, 2 << 20, 8, 8},
		{"8 readers of 1M+512", 256 << 10, 512, 1<<20 + 512, 8, -1},
	} {
		t.Run(c.name, func(t *testing.T) {
			fs, data := source(t, size, 7)
			cnt := newCounting(fs)
			cst := memfs.New()
			o := Options{Size: 64 << 20, BlockSize: c.bs}
			f := openCached(t, cnt, cst, "/c.vci", o, driver.ReadOnly)
			var offs []int64
			if c.off > 0 {
				offs = append(offs, 0)
			}
			for p := c.off; p < size; p += c.n {
				offs = append(offs, p)
			}
			pass := func() {
				var wg sync.WaitGroup
				next := make(chan int64)
				for range c.parallel {
					wg.Go(func() {
						for p := range next {
							n := c.n
							if p == 0 && c.off > 0 {
								n = c.off
							}
							n = min(n, size-p)
							buf := make([]byte, n)
							if _, err := f.ReadAt(buf, p); err != nil {
								t.Error(err)
							} else if !bytes.Equal(buf, data[p:p+n]) {
								t.Errorf("read at %d: wrong content", p)
							}
						}
					})
				}
				for _, p := range offs {
					next <- p
				}
				close(next)
				wg.Wait()
			}
			pass()
			if t.Failed() {
				t.FailNow()
			}
			reads, got := cnt.reads.Load(), cnt.bytes.Load()
			t.Logf("%d source reads, %d bytes", reads, got)
			if got != size || cnt.maxPerOff() != 1 {
				t.Fatalf("fetched %d bytes of %d (max %d reads at one offset)", got, size, cnt.maxPerOff())
			}
			if c.wantReads >= 0 && reads != c.wantReads {
				t.Fatalf("%d source reads, want %d", reads, c.wantReads)
			}
			if st := f.Stats(); st.BytesFetched != size {
				t.Fatalf("stats: %+v", st)
			}
			cnt.reset()
			pass()
			if r := cnt.reads.Load(); r != 0 {
				t.Fatalf("second pass: %d source reads", r)
			}
			mustClose(t, f)
			g := openCached(t, cnt, cst, "/c.vci", o, driver.ReadOnly)
			defer mustClose(t, g)
			f = g
			pass()
			if r := cnt.reads.Load(); r != 0 {
				t.Fatalf("reopened cache: %d source reads", r)
			}
		})
	}
}

// TestZeroBlocks: blocks of zeros are kept as holes of the cache file
// (punched in slots that held other blocks before): they read back as
// zeros, through eviction and slot reuse, in this session and after a
// reopen, and the cache file (on disk) allocates no space for them.
func TestZeroBlocks(t *testing.T) {
	// Background flushes every few blocks (they run concurrently with
	// the fills and the commit at close).
	defer func(n int64) { flushAheadBytes = n }(flushAheadBytes)
	flushAheadBytes = 256 << 10
	const bs = 64 << 10
	for _, c := range []struct {
		name  string
		size  int64
		cache int64
		disk  bool
	}{
		{"room for all, memfs", 8 << 20, 64 << 20, false},
		{"room for all, disk", 8 << 20, 64 << 20, true},
		{"evicting, memfs", 32 << 20, 6 << 20, false},
		{"evicting, disk", 32 << 20, 6 << 20, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			fs, data := source(t, c.size, 9)
			// Every other run of 1..3 blocks is zeros.
			rng := rand.New(rand.NewPCG(3, 4))
			for b := int64(0); b < c.size/bs; b += 2 + rng.Int64N(4) {
				clear(data[b*bs : min(c.size, (b+1+rng.Int64N(3))*bs)])
			}
			if err := fs.WriteFile("/src", data); err != nil {
				t.Fatal(err)
			}
			cnt := newCounting(fs)
			var cst driver.Storage = memfs.New()
			name := "/c.vci"
			if c.disk {
				cst = osfs.New()
				name = filepath.Join(t.TempDir(), "c.vci")
			}
			o := Options{Size: c.cache, BlockSize: bs}
			f := openCached(t, cnt, cst, name, o, driver.ReadOnly)
			readAll(t, f, data, 3*bs/2, rng)
			readAll(t, f, data, 2<<20, rng)
			readAll(t, f, data, bs, rng)
			mustClose(t, f)
			if c.disk && c.cache > c.size {
				var zeros int64
				for b := int64(0); b < c.size/bs; b++ {
					if driver.IsZero(data[b*bs : (b+1)*bs]) {
						zeros++
					}
				}
				var st syscall.Stat_t
				if err := syscall.Stat(name, &st); err != nil {
					t.Fatal(err)
				}
				t.Logf("cache file allocates %d bytes for %d data blocks", st.Blocks*512, c.size/bs-zeros)
				// Data blocks and metadata, not the zeros.
				if alloc, most := st.Blocks*512, c.size-zeros*bs+1<<20; alloc > most {
					t.Fatalf("cache file allocates %d bytes; %d of the %d blocks are zeros (at most %d expected)", alloc, zeros, c.size/bs, most)
				}
			}
			g := openCached(t, cnt, cst, name, o, driver.ReadOnly)
			defer mustClose(t, g)
			cnt.reset()
			readAll(t, g, data, bs, rng)
			if c.cache > c.size && cnt.reads.Load() != 0 {
				t.Fatalf("reopened cache: %d source reads", cnt.reads.Load())
			}
		})
	}
}
