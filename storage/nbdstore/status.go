package nbdstore

import (
	"context"
	"io"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/nbd"
)

// run is a stretch of the export that reads as zeros or not.
type run struct {
	off, end int64
	zero     bool
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
	var ext []nbd.BlockExtent
	err := f.request("block-status", lo, func(ctx context.Context, c *nbd.Client) error {
		f.statusRequests.Add(1)
		m, err := c.BlockStatusContext(ctx, lo, uint32(n), 0)
		ext = m[nbd.ContextBaseAllocation]
		return err
	})
	if err != nil {
		return run{}, err
	}
	if len(ext) == 0 {
		return run{}, driver.Corruptf(f.t.url, lo, "the NBD server answered block status without base:allocation extents")
	}
	runs := make([]run, 0, len(ext))
	pos := lo
	for _, e := range ext {
		if e.Length == 0 {
			return run{}, driver.Corruptf(f.t.url, pos, "the NBD server sent an empty block status extent")
		}
		end := min(pos+int64(e.Length), f.size)
		z := e.Flags&nbd.StateZero != 0
		if k := len(runs) - 1; k >= 0 && runs[k].zero == z {
			runs[k].end = end
		} else {
			runs = append(runs, run{off: pos, end: end, zero: z})
		}
		pos = end
		if pos >= f.size {
			break
		}
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
