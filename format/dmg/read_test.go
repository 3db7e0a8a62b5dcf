package dmg

import (
	"bytes"
	"errors"
	"hash/crc32"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/storage/memfs"
)

// TestCRCArithmetic: the zero extension and the combination of CRC-32s
// agree with hashing the bytes.
func TestCRCArithmetic(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, n := range []int64{0, 1, 7, 512, 4096, 1<<20 + 3} {
		a := make([]byte, rng.IntN(3000))
		for i := range a {
			a[i] = byte(rng.Uint32())
		}
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		ca := crc32.ChecksumIEEE(a)
		if got, want := crcZeros(ca, n), crc32.ChecksumIEEE(append(append([]byte(nil), a...), make([]byte, n)...)); got != want {
			t.Fatalf("zeros %d: %08x want %08x", n, got, want)
		}
		if got, want := crcCombine(ca, crc32.ChecksumIEEE(b), n), crc32.ChecksumIEEE(append(append([]byte(nil), a...), b...)); got != want {
			t.Fatalf("combine %d: %08x want %08x", n, got, want)
		}
	}
}

// TestConcurrentReads: many goroutines read random ranges of a UDZO and a
// UDBZ image (small chunks, a cache smaller than the image) and always
// see the right bytes; run with -race.
func TestConcurrentReads(t *testing.T) {
	defer func(u int64) { unitSize = u }(unitSize)
	unitSize = 16 << 10
	data := source("mixed", 1<<20+512, 9)
	for _, sub := range []string{"UDZO", "UDBZ"} {
		st := memfs.New()
		b := vdiskImage(t, sub, data)
		writeMem(t, st, "c.dmg", b)
		im := openImage(t, st, "c.dmg")
		im.cache = newChunkCache(64<<10, 2)
		var wg sync.WaitGroup
		errs := make(chan error, 8)
		for g := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(uint64(g), 1))
				buf := make([]byte, 64<<10)
				for range 30 {
					off := rng.Int64N(int64(len(data)))
					n := min(int64(rng.IntN(len(buf))+1), int64(len(data))-off)
					if _, err := im.ReadAt(buf[:n], off); err != nil {
						errs <- err
						return
					}
					if !bytes.Equal(buf[:n], data[off:off+n]) {
						errs <- errors.New("wrong bytes at " + sub)
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		im.cache.mu.Lock()
		if im.cache.used > 64<<10 && im.cache.lru.Len() > 2 {
			t.Errorf("cache holds %d bytes in %d chunks", im.cache.used, im.cache.lru.Len())
		}
		im.cache.mu.Unlock()
		im.Close()
	}
}

// TestCacheSharesLoads: concurrent requests for one chunk load it once;
// failures are not cached.
func TestCacheSharesLoads(t *testing.T) {
	c := newChunkCache(1<<20, 2)
	var mu sync.Mutex
	loads := 0
	var wg sync.WaitGroup
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.get(1, func() ([]byte, error) {
				mu.Lock()
				loads++
				mu.Unlock()
				return make([]byte, 10), nil
			})
		}()
	}
	wg.Wait()
	if loads != 1 {
		t.Fatalf("%d loads", loads)
	}
	fail := errors.New("io")
	if _, err := c.get(2, func() ([]byte, error) { return nil, fail }); err != fail {
		t.Fatal(err)
	}
	if b, err := c.get(2, func() ([]byte, error) { return []byte{1}, nil }); err != nil || len(b) != 1 {
		t.Fatal("a failed load was cached")
	}
}

// TestProbe: a trailer at the end scores 100, one found by qemu's search
// of the last 515 bytes (trailing bytes after it) less, none 0; vdisk.Open
// finds the format by probing.
func TestProbe(t *testing.T) {
	b := foreignImages()["types"].build()
	if s := probe(bytes.NewReader(b), int64(len(b))); s != 100 {
		t.Fatalf("score %d", s)
	}
	odd := append(append([]byte(nil), b...), make([]byte, 100)...)
	if s := probe(bytes.NewReader(odd), int64(len(odd))); s == 0 || s == 100 {
		t.Fatalf("odd-sized score %d", s)
	}
	if s := probe(bytes.NewReader(make([]byte, 4096)), 4096); s != 0 {
		t.Fatalf("zeros score %d", s)
	}
	im, err := openBytes(t, odd)
	if err != nil {
		t.Fatalf("an image with bytes after its trailer: %v", err)
	}
	im.Close()
	st := memfs.New()
	writeMem(t, st, "p.dmg", b)
	d, err := vdisk.Open(ctx, "p.dmg", &vdisk.OpenOptions{Storage: st, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if f := d.Top().Format.Name; f != "dmg" {
		t.Fatalf("probed as %s", f)
	}
}
