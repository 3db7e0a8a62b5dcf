package holecache

import (
	"math/rand/v2"
	"testing"
)

// TestExtentCacheAgainstTruth drives the cache with random true runs
// (as lseek would report them, from any offset), changes and forgets, and
// checks every lookup against the truth, that runs stay sorted and
// disjoint, and that an answer read before a change is not stored.
func TestExtentCacheAgainstTruth(t *testing.T) {
	const size = 1 << 12
	rng := rand.New(rand.NewPCG(3, 4))
	truth := make([]bool, size) // data per unit
	var c Cache
	runAt := func(off int64) Run {
		end := off
		for end < size && truth[end] == truth[off] {
			end++
		}
		return Run{Start: off, End: end, Data: truth[off]}
	}
	for i := range 200000 {
		off := rng.Int64N(size)
		switch rng.IntN(10) {
		case 0, 1: // a change: flip a range, then forget it
			n := rng.Int64N(64) + 1
			d := rng.IntN(2) == 0
			for k := off; k < min(off+n, size); k++ {
				truth[k] = d
			}
			c.Invalidate(off, min(off+n, size))
		case 2: // a lookup that raced with a change must not be stored
			gen := c.generation()
			r := runAt(off)
			truth[off] = !truth[off]
			c.Invalidate(off, off+1)
			c.store(r, gen)
		case 3, 4, 5:
			c.store(runAt(off), c.generation())
		default:
			r, ok := c.Lookup(off)
			if !ok {
				continue
			}
			if r.Start > off || r.End <= off {
				t.Fatalf("op %d: lookup(%d) returned %+v", i, off, r)
			}
			for k := r.Start; k < r.End; k++ {
				if truth[k] != r.Data {
					t.Fatalf("op %d: cached run %+v is wrong at %d", i, r, k)
				}
			}
		}
		if i%1000 == 0 {
			for k := 1; k < len(c.runs); k++ {
				if c.runs[k-1].End > c.runs[k].Start || c.runs[k].Start >= c.runs[k].End {
					t.Fatalf("op %d: runs not sorted and disjoint: %+v %+v", i, c.runs[k-1], c.runs[k])
				}
			}
		}
	}
}
