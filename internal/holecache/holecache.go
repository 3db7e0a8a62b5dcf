package raw

import (
	"slices"
	"sync"
)

// maxRuns bounds the extent cache. A file with more runs than this is
// fragmented enough that the cache starts over when full (a reset is
// cheaper to reason about than an eviction order, and costs a pair of
// lseeks per run again).
const maxRuns = 4096

// run is a known stretch of the file: all data, or all hole.
type run struct {
	start, end int64
	data       bool
}

// extentCache remembers what SEEK_DATA/SEEK_HOLE said about the file, so
// that the reads following a status walk (every Disk read asks Status
// first) and an NBD server's small reads cost no lseek. It holds disjoint
// runs sorted by start.
//
// Coherence: the image's own writes, discards, zeroes and resizes are the
// only changes to the file (it is locked), and each invalidates the runs
// it overlaps after it completed. A lookup that raced with such a change
// must not put its stale answer back: gen counts changes, and a result is
// stored only if gen did not move since before its lseeks.
type extentCache struct {
	mu   sync.RWMutex
	runs []run
	gen  uint64
}

// lookup returns the cached run holding off, if any.
func (c *extentCache) lookup(off int64) (run, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	i := c.find(off)
	if i < len(c.runs) && c.runs[i].start <= off {
		return c.runs[i], true
	}
	return run{}, false
}

// find returns the index of the first run ending after off. Callers hold mu.
func (c *extentCache) find(off int64) int {
	i, _ := slices.BinarySearchFunc(c.runs, off, func(r run, off int64) int {
		if r.end <= off {
			return -1
		}
		return 1
	})
	return i
}

// generation is read before asking the file; store takes it back.
func (c *extentCache) generation() uint64 {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.gen
}

// store records r unless the file changed since gen was read.
func (c *extentCache) store(r run, gen uint64) {
	if r.end <= r.start {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gen != gen {
		return
	}
	i := c.find(r.start)
	j := i
	for j < len(c.runs) && c.runs[j].start < r.end {
		j++
	}
	// Runs overlapping r were read from the same unchanged file, so they
	// agree with it; r replaces them (it may be longer or shorter).
	// A run of the other kind cannot overlap r; were it to, r wins.
	if i < j {
		if first := c.runs[i]; first.start < r.start && first.data == r.data {
			r.start = first.start
		}
		if last := c.runs[j-1]; last.end > r.end && last.data == r.data {
			r.end = last.end
		}
	}
	if len(c.runs)-(j-i)+1 > maxRuns {
		c.runs = c.runs[:0]
		i, j = 0, 0
	}
	c.runs = slices.Replace(c.runs, i, j, r)
}

// covered reports whether [off, end) lies in one cached data run: writing
// there changes nothing the cache says.
func (c *extentCache) covered(off, end int64) bool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	i := c.find(off)
	return i < len(c.runs) && c.runs[i].data && c.runs[i].start <= off && end <= c.runs[i].end
}

// invalidate forgets what the cache knows about [off, end) (end < 0: to
// infinity) and makes lookups in flight drop their answers. Callers call
// it after the change reached the file.
func (c *extentCache) invalidate(off, end int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	if end < 0 {
		end = 1<<63 - 1
	}
	i := c.find(off)
	j := i
	for j < len(c.runs) && c.runs[j].start < end {
		j++
	}
	if i == j {
		return
	}
	// Keep the parts of the first and last runs outside the range.
	var keepBuf [2]run // on the stack: an NBD trim allocates nothing
	keep := keepBuf[:0]
	if r := c.runs[i]; r.start < off {
		keep = append(keep, run{r.start, off, r.data})
	}
	if r := c.runs[j-1]; r.end > end {
		keep = append(keep, run{end, r.end, r.data})
	}
	c.runs = slices.Replace(c.runs, i, j, keep...)
}
