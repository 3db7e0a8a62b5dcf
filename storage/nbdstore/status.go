package nbdstore

import (
	"context"
	"io"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/nbd"
)

// run is a stretch of the export that reads as zeros or not, and that
// the server's chain holds or not (qemu:allocation-depth 0: only ever
// for zero runs).
type run struct {
	off, end int64
	zero     bool
	absent   bool
}

// statusCache keeps the runs of the last base:allocation reply, so a
// sequential scan (SeekData, SeekHole, SeekData, ...) costs one request
// per reply instead of one per call. It is valid for one modification
// generation.
type statusCache struct {
	gen  uint64
	runs []run // sorted, contiguous
}

func (c *statusCache) find(off int64, gen uint64) (run, bool) {
	if c.gen != gen || len(c.runs) == 0 || off < c.runs[0].off || off >= c.runs[len(c.runs)-1].end {
		return run{}, false
	}
	lo, hi := 0, len(c.runs)
	for lo < hi {
		m := (lo + hi) / 2
		if c.runs[m].end <= off {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return c.runs[lo], true
}

// StatusRequests is the number of BLOCK_STATUS requests sent so far.
func (f *File) StatusRequests() int64 { return f.statusRequests.Load() }

// runAt returns the run holding off (0 <= off < size).
func (f *File) runAt(off int64) (run, error) {
	if !f.allocation {
		// No allocation information: everything is data.
		return run{off: off, end: f.size}, nil
	}
	gen := f.gen.Load()
	f.stMu.Lock()
	r, ok := f.status.find(off, gen)
	f.stMu.Unlock()
	if ok {
		return r, nil
	}
	lo := off / f.minBS * f.minBS
	n := min(f.size-lo, maxZeroLen)
	var ext, depth []nbd.BlockExtent
	var hasDepth bool
	err := f.request("block-status", lo, func(ctx context.Context, c *nbd.Client) error {
		f.statusRequests.Add(1)
		m, err := c.BlockStatusContext(ctx, lo, uint32(n), 0)
		ext = m[nbd.ContextBaseAllocation]
		depth, hasDepth = m[nbd.ContextAllocationDepth]
		return err
	})
	if err != nil {
		return run{}, err
	}
	if len(ext) == 0 {
		return run{}, driver.Corruptf(f.t.url, lo, "the NBD server answered block status without base:allocation extents")
	}
	if !f.depth || !hasDepth || len(depth) == 0 {
		// Without qemu:allocation-depth (or a reconnect to a server that
		// stopped offering it), everything is held.
		depth = nil
	}
	runs, err := mergeExtents(f.t.url, lo, f.size, ext, depth)
	if err != nil {
		return run{}, err
	}
	c := statusCache{gen: gen, runs: runs}
	r, ok = c.find(off, gen)
	if !ok {
		return run{}, driver.Corruptf(f.t.url, lo, "the NBD server's block status reply does not reach offset %d", off)
	}
	f.stMu.Lock()
	f.status = c
	f.stMu.Unlock()
	return r, nil
}

// mergeExtents turns the base:allocation extents ext (and, when not nil,
// the qemu:allocation-depth extents depth) of a reply for the range
// starting at lo into runs, up to where both lists reach (and no further
// than size). A range is absent when its depth is 0 and it reads as
// zeros: a data range is data whatever its depth says.
func mergeExtents(url string, lo, size int64, ext, depth []nbd.BlockExtent) ([]run, error) {
	runs := make([]run, 0, len(ext))
	pos := lo
	di, dpos := 0, lo // depth[di] covers [dpos, dpos+depth[di].Length)
	for _, e := range ext {
		if e.Length == 0 {
			return nil, driver.Corruptf(url, pos, "the NBD server sent an empty block status extent")
		}
		end := min(pos+int64(e.Length), size)
		z := e.Flags&nbd.StateZero != 0
		for pos < end {
			stop, absent := end, false
			if depth != nil {
				for di < len(depth) && depth[di].Length != 0 && dpos+int64(depth[di].Length) <= pos {
					dpos += int64(depth[di].Length)
					di++
				}
				if di >= len(depth) {
					return runs, nil // the depth extents end here
				}
				if depth[di].Length == 0 {
					return nil, driver.Corruptf(url, dpos, "the NBD server sent an empty qemu:allocation-depth extent")
				}
				stop = min(end, dpos+int64(depth[di].Length))
				absent = z && depth[di].Flags == 0
			}
			if k := len(runs) - 1; k >= 0 && runs[k].zero == z && runs[k].absent == absent {
				runs[k].end = stop
			} else {
				runs = append(runs, run{off: pos, end: stop, zero: z, absent: absent})
			}
			pos = stop
		}
		if pos >= size {
			break
		}
	}
	return runs, nil
}

// Allocation implements driver.AllocationReporter: the run at off is not
// held when the server's qemu:allocation-depth says no layer of its chain
// holds it (and it reads as zeros). Without that context everything is
// held.
func (f *File) Allocation(off int64) (bool, int64, error) {
	if off < 0 || off >= f.size {
		return false, 0, driver.Errorf(driver.ErrOutOfRange, f.t.url, off, "allocation status outside the %d-byte export", f.size)
	}
	if !f.depth {
		return true, f.size, nil
	}
	r, err := f.runAt(off)
	if err != nil {
		return false, 0, err
	}
	return !r.absent, r.end, nil
}

// SeekData returns the first offset at or after off that does not read
// as zeros per base:allocation (io.EOF when none).
func (f *File) SeekData(off int64) (int64, error) {
	if off < 0 {
		return 0, driver.Errorf(driver.ErrOutOfRange, f.t.url, off, "negative offset")
	}
	for off < f.size {
		r, err := f.runAt(off)
		if err != nil {
			return 0, err
		}
		if !r.zero {
			return off, nil
		}
		off = r.end
	}
	return 0, io.EOF
}

// SeekHole returns the first offset at or after off that reads as zeros
// per base:allocation; the end of the export counts as a hole.
func (f *File) SeekHole(off int64) (int64, error) {
	if off < 0 {
		return 0, driver.Errorf(driver.ErrOutOfRange, f.t.url, off, "negative offset")
	}
	for off < f.size {
		r, err := f.runAt(off)
		if err != nil {
			return 0, err
		}
		if r.zero {
			return off, nil
		}
		off = r.end
	}
	return f.size, nil
}
