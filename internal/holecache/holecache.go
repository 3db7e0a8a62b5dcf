// Package holecache remembers what a file's SEEK_DATA/SEEK_HOLE said, per
// open image, so that the reads following a status walk (every Disk read
// asks Status first) and an NBD server's small reads cost no lseek. The
// raw driver and fixed VHDs use it.
package holecache

import (
	"errors"
	"io"
	"slices"
	"sync"

	"github.com/vdisk/vdisk/driver"
)

// maxRuns bounds the extent cache. A file with more runs than this is
// fragmented enough that the cache starts over when full (a reset is
// cheaper to reason about than an eviction order, and costs a pair of
// lseeks per run again).
const maxRuns = 4096

// Run is a known stretch of the file: all data, or all hole.
type Run struct {
	Start, End int64
	Data       bool
}

// Cache holds disjoint runs sorted by start. The zero value is empty and
// ready.
//
// Coherence: the image's own writes, discards, zeroes and resizes are the
// only changes to the file (it is locked), and each calls Changed (or
// Invalidate) for the range it touched after it completed. A lookup that
// raced with such a change must not put its stale answer back: gen counts
// changes, and a result is stored only if gen did not move since before
// its lseeks.
type Cache struct {
	mu   sync.RWMutex
	runs []Run
	gen  uint64
}

// Lookup returns the cached run holding off, if any.
func (c *Cache) Lookup(off int64) (Run, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	i := c.find(off)
	if i < len(c.runs) && c.runs[i].Start <= off {
		return c.runs[i], true
	}
	return Run{}, false
}

// find returns the index of the first run ending after off. Callers hold mu.
func (c *Cache) find(off int64) int {
	i, _ := slices.BinarySearchFunc(c.runs, off, func(r Run, off int64) int {
		if r.End <= off {
			return -1
		}
		return 1
	})
	return i
}

// generation is read before asking the file; store takes it back.
func (c *Cache) generation() uint64 {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.gen
}

// store records r unless the file changed since gen was read.
func (c *Cache) store(r Run, gen uint64) {
	if r.End <= r.Start {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gen != gen {
		return
	}
	i := c.find(r.Start)
	j := i
	for j < len(c.runs) && c.runs[j].Start < r.End {
		j++
	}
	// Runs overlapping r were read from the same unchanged file, so they
	// agree with it; r replaces them (it may be longer or shorter).
	// A run of the other kind cannot overlap r; were it to, r wins.
	if i < j {
		if first := c.runs[i]; first.Start < r.Start && first.Data == r.Data {
			r.Start = first.Start
		}
		if last := c.runs[j-1]; last.End > r.End && last.Data == r.Data {
			r.End = last.End
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
func (c *Cache) covered(off, end int64) bool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	i := c.find(off)
	return i < len(c.runs) && c.runs[i].Data && c.runs[i].Start <= off && end <= c.runs[i].End
}

// Invalidate forgets what the cache knows about [off, end) (end < 0: to
// infinity) and makes lookups in flight drop their answers. Callers call
// it after the change reached the file.
func (c *Cache) Invalidate(off, end int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	if end < 0 {
		end = 1<<63 - 1
	}
	i := c.find(off)
	j := i
	for j < len(c.runs) && c.runs[j].Start < end {
		j++
	}
	if i == j {
		return
	}
	// Keep the parts of the first and last runs outside the range.
	var keepBuf [2]Run // on the stack: an NBD trim allocates nothing
	keep := keepBuf[:0]
	if r := c.runs[i]; r.Start < off {
		keep = append(keep, Run{r.Start, off, r.Data})
	}
	if r := c.runs[j-1]; r.End > end {
		keep = append(keep, Run{end, r.End, r.Data})
	}
	c.runs = slices.Replace(c.runs, i, j, keep...)
}

// Find returns the run holding off (below size, the end of the data):
// from the cache, else asked of hs and cached.
func (c *Cache) Find(hs driver.HoleSeeker, off, size int64) (Run, error) {
	if r, ok := c.Lookup(off); ok {
		return r, nil
	}
	gen := c.generation()
	data, err := hs.SeekData(off)
	if errors.Is(err, io.EOF) {
		data = size
	} else if err != nil {
		return Run{}, err
	}
	data = min(data, size)
	if data > off {
		r := Run{Start: off, End: data}
		c.store(r, gen)
		// A walk asks next about the data run starting here: learning
		// its end now makes that a cache hit, so a walk costs one lseek
		// per run boundary instead of three per data run.
		if data < size {
			if hole, err := hs.SeekHole(data); err == nil && hole > data {
				c.store(Run{Start: data, End: min(hole, size), Data: true}, gen)
			}
		}
		return r, nil
	}
	hole, err := hs.SeekHole(off)
	if errors.Is(err, io.EOF) {
		hole = size
	} else if err != nil {
		return Run{}, err
	}
	if hole <= off { // should not happen; be safe
		return Run{Start: off, End: size, Data: true}, nil
	}
	r := Run{Start: off, End: min(hole, size), Data: true}
	c.store(r, gen)
	return r, nil
}

// fsBlock is the widest file system block a write or punch may touch
// beyond its bytes (btrfs and XFS go up to 64 KiB): the runs around a
// change are forgotten up to it, since the file system tracks holes by
// whole blocks.
const fsBlock = 64 << 10

// Changed updates the cache after [off, off+n) of the file changed (write:
// by a write, else by a punch or zeroing). A write inside a known data run
// changes nothing the cache says.
func (c *Cache) Changed(off, n int64, write bool) {
	if write && c.covered(off, off+n) {
		return
	}
	c.Invalidate(off&^(fsBlock-1), (off+n+fsBlock-1)&^(fsBlock-1))
}
