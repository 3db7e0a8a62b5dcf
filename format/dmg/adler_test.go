package dmg

import (
	"bytes"
	"hash/adler32"
	"math/rand/v2"
	"testing"

	"github.com/klauspost/compress/zlib"
)

// TestAdler32: the eight-at-a-time Adler-32 equals hash/adler32 for every
// length around the block and word edges, for random bytes, for all-0xff
// bytes (the largest sums) and continuing from a running checksum.
func TestAdler32(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	rnd := make([]byte, 3*adlerNMax+100)
	for i := range rnd {
		rnd[i] = byte(rng.Uint32())
	}
	ff := bytes.Repeat([]byte{0xff}, len(rnd))
	lengths := []int{0, 1, 7, 8, 9, 15, 16, 17, 100, adlerNMax - 1, adlerNMax, adlerNMax + 1, adlerNMax + 8, 2 * adlerNMax, len(rnd)}
	for _, src := range [][]byte{rnd, ff} {
		for _, n := range lengths {
			if got, want := adler32Update(1, src[:n]), adler32.Checksum(src[:n]); got != want {
				t.Fatalf("%d bytes (first %#x): %#08x, want %#08x", n, src[0], got, want)
			}
			// In two pieces, the first one odd.
			k := n / 3
			h := adler32.New()
			h.Write(src[:n])
			if got, want := adler32Update(adler32Update(1, src[:k]), src[k:n]), h.Sum32(); got != want {
				t.Fatalf("%d bytes in pieces %d+%d: %#08x, want %#08x", n, k, n-k, got, want)
			}
		}
	}
}

// TestZlibFraming: a chunk framed by the writer (header, deflate, Adler-32)
// is a zlib stream zlib's reader accepts at every level, and a flipped
// checksum byte is caught.
func TestZlibFraming(t *testing.T) {
	data := source("mixed", 1<<20, 3)
	for level := 1; level <= 9; level++ {
		z, err := newZlibChunker(level)
		if err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		if err := z.compress(&buf, data); err != nil {
			t.Fatal(err)
		}
		zr, err := zlib.NewReader(bytes.NewReader(buf.Bytes()))
		if err != nil {
			t.Fatalf("level %d: header refused: %v", level, err)
		}
		var out bytes.Buffer
		if _, err := out.ReadFrom(zr); err != nil || !bytes.Equal(out.Bytes(), data) {
			t.Fatalf("level %d: stream does not read back (%v)", level, err)
		}
		bad := bytes.Clone(buf.Bytes())
		bad[len(bad)-1] ^= 1
		zr, err = zlib.NewReader(bytes.NewReader(bad))
		if err == nil {
			_, err = out.ReadFrom(zr)
		}
		if err == nil {
			t.Fatalf("level %d: a wrong Adler-32 was not caught", level)
		}
	}
}
