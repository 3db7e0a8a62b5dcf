package parallels

import (
	"encoding/binary"
	"math/rand/v2"
	"testing"
)

// TestMutatedImages runs FuzzOpen's body over seed images with header and
// BAT fields set to edge values (the fuzzing engine's job, done
// deterministically so that plain `go test` covers it).
func TestMutatedImages(t *testing.T) {
	seeds := tinyImages(t)
	names := []string{"old", "ext", "1k", "extun"}
	rng := rand.New(rand.NewPCG(1, 2))
	vals := []uint32{0, 1, 2, 3, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 100, 512, 4096, 65536, inuseMagic}
	for i := range 3000 {
		s := seeds[names[i%len(names)]]
		b := append([]byte(nil), s...)
		for j := rng.IntN(4); j >= 0; j-- {
			off := rng.IntN(len(b)/4) * 4
			if rng.IntN(2) == 0 {
				off = 16 + rng.IntN(12)*4
			}
			binary.LittleEndian.PutUint32(b[off:], vals[rng.IntN(len(vals))])
		}
		fuzzOpen(t, b)
		if t.Failed() {
			t.Fatalf("mutation %d: %q", i, b)
		}
	}
}
