package cache

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/memfs"
)

// TestWarmCache: a second run with the cache reopened from its file, same
// source identity, fetches zero bytes.
func TestWarmCache(t *testing.T) {
	for _, c := range []struct {
		name string
		size int64
		o    Options
	}{
		{"64K", 3<<20 + 1234, small},
		{"1M", 5<<20 + 512, Options{Size: 16 << 20, BlockSize: 1 << 20}},
		{"default", 2 << 20, Options{}},
	} {
		t.Run(c.name, func(t *testing.T) {
			mem, data := source(t, c.size, 1)
			src := newCounting(mem)
			src.version = "etag-1"
			cst := memfs.New()
			rng := rand.New(rand.NewPCG(2, 2))
			f := openCached(t, src, cst, "/c.vci", c.o, driver.ReadOnly)
			readAll(t, f, data, 100000, rng)
			st := f.Stats()
			if src.bytes.Load() != c.size || st.BytesFetched != c.size || st.Misses == 0 {
				t.Fatalf("cold run fetched %d bytes (stats %+v), want %d", src.bytes.Load(), st, c.size)
			}
			if st.Discarded != "" {
				t.Fatalf("a new cache was discarded: %s", st.Discarded)
			}
			if _, ok := any(f).(driver.File); !ok {
				t.Fatal("not a file")
			}
			mustClose(t, f)

			src.reset()
			f2, err := Wrap(mustOpen(t, src, "/src"), cst, "/c.vci", c.o)
			if err != nil {
				t.Fatal(err)
			}
			if _, ok := f2.(driver.Versioned); !ok {
				t.Fatal("Versioned does not pass through")
			}
			if _, ok := f2.(driver.HoleSeeker); !ok {
				t.Fatal("HoleSeeker does not pass through")
			}
			readAll(t, f2, data, 77777, rng)
			cf, _ := As(f2)
			st = cf.Stats()
			if src.bytes.Load() != 0 || st.BytesFetched != 0 || st.Hits == 0 {
				t.Fatalf("warm run fetched %d bytes in %d reads (stats %+v), want 0", src.bytes.Load(), src.reads.Load(), st)
			}
			if st.Discarded != "" {
				t.Fatalf("warm cache discarded: %s", st.Discarded)
			}
			mustClose(t, f2)
			t.Logf("cold: %d bytes fetched; warm: 0 bytes, %d hits", c.size, st.Hits)
		})
	}
}

func mustOpen(t testing.TB, st driver.Storage, name string) driver.File {
	t.Helper()
	f, err := st.Open(name, driver.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// TestIdentity: a source whose size, version or name changed discards the
// cache, which then serves the new content.
func TestIdentity(t *testing.T) {
	const size = 2<<20 + 100
	for _, change := range []string{"same", "size", "version", "name", "options"} {
		t.Run(change, func(t *testing.T) {
			mem, data := source(t, size, 3)
			src := newCounting(mem)
			src.version = "v1"
			cst := memfs.New()
			f := openCached(t, src, cst, "/c.vci", small, driver.ReadOnly)
			readAll(t, f, data, 65536, nil)
			mustClose(t, f)

			o := small
			name := "/src"
			switch change {
			case "size":
				data = append(data, 1, 2, 3)
				mem.WriteFile("/src", data)
			case "version":
				// Same size, new content and ETag.
				data = bytes.Clone(data)
				data[5] ^= 0xff
				mem.WriteFile("/src", data)
				src.version = "v2"
			case "name":
				name = "/other"
				data = bytes.Clone(data)
				data[7] ^= 0xff
				mem.WriteFile(name, data)
			case "options":
				o.Size = 10 << 20
			}
			src.reset()
			cf, err := Wrap(mustOpen(t, src, name), cst, "/c.vci", o)
			if err != nil {
				t.Fatal(err)
			}
			readAll(t, cf, data, 65536, nil)
			st := mustAs(t, cf).Stats()
			if change == "same" {
				if st.Discarded != "" || src.bytes.Load() != 0 {
					t.Fatalf("unchanged source: discarded %q, fetched %d", st.Discarded, src.bytes.Load())
				}
			} else if st.Discarded == "" || src.bytes.Load() != int64(len(data)) {
				t.Fatalf("changed %s: discarded %q, fetched %d of %d", change, st.Discarded, src.bytes.Load(), len(data))
			} else {
				t.Logf("discarded: %s", st.Discarded)
			}
			mustClose(t, cf)
		})
	}
}

func mustAs(t testing.TB, f driver.File) *File {
	cf, ok := As(f)
	if !ok {
		t.Fatalf("As(%T) failed", f)
	}
	return cf
}

// TestLRUBound: random reads over a source four times the cache keep the
// file within cache-size, evict, and stay correct, also after a reopen.
func TestLRUBound(t *testing.T) {
	const size = 32 << 20
	mem, data := source(t, size, 4)
	src := newCounting(mem)
	cst := memfs.New()
	o := Options{Size: 4 << 20, BlockSize: 64 << 10}
	rng := rand.New(rand.NewPCG(5, 5))
	for round := range 3 {
		f := openCached(t, src, cst, "/c.vci", o, driver.ReadOnly)
		if d := f.Stats().Discarded; d != "" {
			t.Fatalf("round %d: cache discarded: %s", round, d)
		}
		buf := make([]byte, 200000)
		for range 400 {
			n := rng.Int64N(int64(len(buf))) + 1
			off := rng.Int64N(size - n)
			if _, err := f.ReadAt(buf[:n], off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf[:n], data[off:off+n]) {
				t.Fatalf("read %d+%d: wrong data", off, n)
			}
			if fi, _ := cst.Stat("/c.vci"); fi.Size > o.Size {
				t.Fatalf("cache file %d bytes, bound %d", fi.Size, o.Size)
			}
		}
		st := f.Stats()
		if st.Evictions == 0 || st.CachedBlocks > st.CapacityBlocks {
			t.Fatalf("stats %+v", st)
		}
		mustClose(t, f)
		fi, _ := cst.Stat("/c.vci")
		t.Logf("round %d: file %d bytes (bound %d), %+v", round, fi.Size, o.Size, st)
	}
}

// TestConcurrentReaders: readers of the same cold blocks fetch each block
// once, and all see the right data.
func TestConcurrentReaders(t *testing.T) {
	const size = 4 << 20
	for _, mode := range []string{"file", "memory"} {
		t.Run(mode, func(t *testing.T) {
			mem, data := source(t, size, 6)
			src := newCounting(mem)
			name := ""
			if mode == "file" {
				name = "/c.vci"
			}
			f := openCached(t, src, memfs.New(), name, small, driver.ReadOnly)
			var wg sync.WaitGroup
			for g := range 8 {
				wg.Go(func() {
					rng := rand.New(rand.NewPCG(uint64(g), 7))
					buf := make([]byte, 300000)
					for range 60 {
						n := rng.Int64N(int64(len(buf))) + 1
						off := rng.Int64N(size - n)
						if _, err := f.ReadAt(buf[:n], off); err != nil {
							t.Error(err)
							return
						}
						if !bytes.Equal(buf[:n], data[off:off+n]) {
							t.Errorf("read %d+%d: wrong data", off, n)
							return
						}
					}
				})
			}
			wg.Wait()
			if m := src.maxPerOff(); m != 1 {
				t.Fatalf("a block was fetched %d times", m)
			}
			if src.bytes.Load() > size {
				t.Fatalf("fetched %d bytes of a %d-byte source", src.bytes.Load(), size)
			}
			mustClose(t, f)
		})
	}
}

// TestPrefetch: prefetch of a sparse source fetches only its data blocks,
// reports progress to the end, and later reads of them fetch nothing.
func TestPrefetch(t *testing.T) {
	const size = 16 << 20
	mem := memfs.New()
	w, _ := mem.Open("/src", driver.ReadWrite|driver.Create)
	w.Truncate(size)
	data := make([]byte, size)
	for _, r := range [][2]int64{{0, 100}, {1 << 20, 300000}, {9<<20 + 5, 70000}, {size - 10, 10}} {
		for i := r[0]; i < r[0]+r[1]; i++ {
			data[i] = byte(i*7 + 1)
		}
		w.WriteAt(data[r[0]:r[0]+r[1]], r[0])
	}
	w.Close()
	src := newCounting(mem)
	f := openCached(t, src, memfs.New(), "/c.vci", small, driver.ReadOnly)
	var last, total int64
	if err := f.Prefetch(context.Background(), func(d, tot int64) { last, total = d, tot }); err != nil {
		t.Fatal(err)
	}
	// Data blocks: 1 + 5 (300000 bytes from 1 MiB) + 2 + 1.
	if last != total || src.bytes.Load() != total || total > 9*64<<10 || total == 0 {
		t.Fatalf("prefetch: progress %d/%d, fetched %d", last, total, src.bytes.Load())
	}
	before := src.bytes.Load()
	buf := make([]byte, 300000)
	if _, err := f.ReadAt(buf, 1<<20); err != nil || !bytes.Equal(buf, data[1<<20:1<<20+300000]) {
		t.Fatalf("read after prefetch: %v", err)
	}
	if src.bytes.Load() != before {
		t.Fatal("read of prefetched data fetched again")
	}
	readAll(t, f, data, 1<<20, nil)
	mustClose(t, f)
	t.Logf("prefetch fetched %d bytes of a %d-byte sparse source", total, int64(size))

	// Cancelled: stops with the context's error.
	f = openCached(t, src, nil, "", small, driver.ReadOnly)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := f.Prefetch(ctx, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled prefetch: %v", err)
	}
	mustClose(t, f)

	// Bounded by the cache: a dense source larger than the cache.
	mem2, data2 := source(t, 12<<20, 9)
	src2 := newCounting(mem2)
	o := Options{Size: 4 << 20, BlockSize: 64 << 10}
	f = openCached(t, src2, memfs.New(), "/c.vci", o, driver.ReadOnly)
	if err := f.Prefetch(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	st := f.Stats()
	if st.Evictions != 0 || st.CachedBlocks != st.CapacityBlocks || src2.bytes.Load() != st.CapacityBlocks*o.BlockSize {
		t.Fatalf("bounded prefetch: %+v, fetched %d", st, src2.bytes.Load())
	}
	readAll(t, f, data2, 1<<20, nil)
	mustClose(t, f)
}

// TestWriteThrough: writes reach the source and the cache; after Close
// the cache is clean and warm; a write without Sync leaves it unclean, so
// a reopen from what a crash would leave discards it.
func TestWriteThrough(t *testing.T) {
	const size = 3 << 20
	mem, data := source(t, size, 8)
	src := newCounting(mem)
	cst := memfs.New()
	f := openCached(t, src, cst, "/c.vci", small, driver.ReadWrite)
	readAll(t, f, data, 1<<20, nil)
	p := bytes.Repeat([]byte{0xab}, 100000)
	if _, err := f.WriteAt(p, 70000); err != nil {
		t.Fatal(err)
	}
	copy(data[70000:], p)
	if err := f.PunchHole(2<<20, 65536*2); err != nil {
		t.Fatal(err)
	}
	clear(data[2<<20 : 2<<20+65536*2])
	src.reset()
	readAll(t, f, data, 65536, nil)
	if src.bytes.Load() != 2*65536 {
		t.Fatalf("after write and punch: fetched %d, want the 2 punched blocks", src.bytes.Load())
	}
	got, _ := mem.ReadFile("/src")
	if !bytes.Equal(got, data) {
		t.Fatal("the source does not hold the writes")
	}
	mustClose(t, f)

	src.reset()
	f = openCached(t, src, cst, "/c.vci", small, driver.ReadWrite)
	readAll(t, f, data, 65536, nil)
	if d := f.Stats().Discarded; d != "" || src.bytes.Load() != 0 {
		t.Fatalf("after a clean close: discarded %q, fetched %d", d, src.bytes.Load())
	}
	// A write, then the process dies: the cache file as left then.
	if _, err := f.WriteAt(p[:10], 5); err != nil {
		t.Fatal(err)
	}
	copy(data[5:], p[:10])
	left := cst.Clone()
	mustClose(t, f)
	f = openCached(t, src, left, "/c.vci", small, driver.ReadOnly)
	if f.Stats().Discarded == "" {
		t.Fatal("a cache left unclean by a write was trusted")
	}
	readAll(t, f, data, 65536, nil)
	mustClose(t, f)

	// Truncate shrinks and grows through the cache.
	f = openCached(t, src, cst, "/c.vci", small, driver.ReadWrite)
	readAll(t, f, data, 65536, nil)
	if err := f.Truncate(size / 2); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	clear(data[size/2:])
	readAll(t, f, data, 65536, nil)
	mustClose(t, f)
	f = openCached(t, src, cst, "/c.vci", small, driver.ReadOnly)
	readAll(t, f, data, 65536, nil)
	if d := f.Stats().Discarded; d != "" {
		t.Fatalf("discarded: %s", d)
	}
	mustClose(t, f)
}

// TestOptions: option parsing and bounds.
func TestOptions(t *testing.T) {
	o, err := ParseOptions([]driver.KV{{Key: "cache-size", Value: "64M"}, {Key: "cache-block-size", Value: "1M"}})
	if err != nil || o.Size != 64<<20 || o.BlockSize != 1<<20 || o.Parallel != DefaultParallel {
		t.Fatalf("%+v %v", o, err)
	}
	for _, kv := range []driver.KV{{Key: "cache-size", Value: "1M"}, {Key: "cache-block-size", Value: "96K"},
		{Key: "cache-block-size", Value: "4K"}, {Key: "size", Value: "1G"}} {
		if _, err := ParseOptions([]driver.KV{kv}); !errors.Is(err, driver.ErrInvalidOption) {
			t.Errorf("%v: %v", kv, err)
		}
	}
	mem, _ := source(t, 1000, 1)
	if _, err := Wrap(mustOpen(t, mem, "/src"), nil, "", Options{BlockSize: 3000}); !errors.Is(err, driver.ErrInvalidOption) {
		t.Fatalf("bad block size: %v", err)
	}
}

// TestStorage: NewStorage caches the first open, serves a second
// read-only open uncached, refuses a second writable one, does not cache
// files it creates, and caches again once the first is closed.
func TestStorage(t *testing.T) {
	mem, data := source(t, 1<<20, 12)
	cst := memfs.New()
	st := NewStorage(mem, cst, "/c.vci", small)
	// NoLock: memfs's advisory locks would refuse the second opens before
	// the cache does.
	a, err := st.Open("/src", driver.ReadWrite|driver.NoLock)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := As(a); !ok {
		t.Fatalf("first open not cached: %T", a)
	}
	b, err := st.Open("/src", driver.ReadOnly|driver.NoLock)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := As(b); ok {
		t.Fatal("second open cached")
	}
	readAll(t, b, data, 1<<20, nil)
	mustClose(t, b)
	if _, err := st.Open("/src", driver.ReadWrite|driver.NoLock); !errors.Is(err, driver.ErrBusy) {
		t.Fatalf("second writable open: %v", err)
	}
	c, err := st.Open("/new", driver.ReadWrite|driver.Create)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := As(c); ok {
		t.Fatal("a created file is cached")
	}
	mustClose(t, c)
	readAll(t, a, data, 1<<20, nil)
	mustClose(t, a)
	a, err = st.Open("/src", driver.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	readAll(t, a, data, 100000, nil)
	if s := mustAs(t, a).Stats(); s.BytesFetched != 0 || s.Discarded != "" || s.File != "/c.vci" {
		t.Fatalf("reopened: %+v", s)
	}
	mustClose(t, a)
	for _, n := range []string{"/x"} {
		if _, err := st.Stat(n); err == nil {
			t.Fatal("stat of a missing file")
		}
	}
}
