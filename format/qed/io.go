package qed

import (
	"io"

	"github.com/vdisk/vdisk/driver"
)

// clusterLen is the number of bytes of cluster c inside the virtual disk.
func (im *image) clusterLen(c int64) int64 { return min(im.cs, im.Size()-c*im.cs) }

// curEnd reads the allocation end under meta.
func (im *image) curEnd() int64 {
	im.meta.Lock()
	defer im.meta.Unlock()
	return im.fileEnd
}

// entryAt returns the entry of cluster c, checked: a data entry that is
// misaligned, inside the header or past the end of the file is corrupt.
func (im *image) entryAt(c int64) (uint64, int64, error) {
	e, span, err := im.lookup(c)
	if err != nil {
		return 0, 0, err
	}
	if kindOf(e) == kindData && !im.validData(e, im.curEnd()) {
		return 0, 0, driver.Corruptf(im.name, c*im.cs, "L2 entry of cluster %d points to %#x: misaligned, inside the header or past the end of the file (run check -r all)", c, e)
	}
	return e, span, nil
}

func stateOf(e uint64) driver.State {
	switch kindOf(e) {
	case kindUnalloc:
		return driver.Unallocated
	case kindZero:
		return driver.Zero
	}
	return driver.Data
}

// Status reports the run at off: data clusters (with their file offset
// while contiguous in the file), zero clusters, or unallocated ones.
func (im *image) Status(off, n int64) (driver.Extent, error) {
	im.mu.RLock()
	defer im.mu.RUnlock()
	if err := driver.CheckRange(im.name, off, n, im.Size()); err != nil {
		return driver.Extent{}, err
	}
	if n == 0 {
		return driver.Extent{State: driver.Unallocated, Offset: -1}, nil
	}
	stop := off + n
	c := off >> im.shift
	e, span, err := im.entryAt(c)
	if err != nil {
		return driver.Extent{}, err
	}
	st := stateOf(e)
	fo := int64(-1)
	if st == driver.Data {
		fo = int64(e) + off&(im.cs-1)
	}
	end := min(stop, (c+span)<<im.shift)
	for end < stop {
		nc := end >> im.shift
		ne, nspan, err := im.entryAt(nc)
		if err != nil || stateOf(ne) != st || (st == driver.Data && int64(ne) != fo+(end-off)) {
			break
		}
		end = min(stop, (nc+nspan)<<im.shift)
	}
	return driver.Extent{State: st, Length: end - off, Offset: fo}, nil
}

// ReadAt reads p at off: data clusters from the file (clusters contiguous
// in the file in one read); zero and unallocated clusters read zeros (the
// container reads unallocated runs from the backing chain).
func (im *image) ReadAt(p []byte, off int64) (int, error) {
	im.mu.RLock()
	defer im.mu.RUnlock()
	if err := driver.CheckRange(im.name, off, int64(len(p)), im.Size()); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		c, in := pos>>im.shift, pos&(im.cs-1)
		e, span, err := im.entryAt(c)
		if err != nil {
			return done, err
		}
		n := int(min(int64(len(p)-done), span*im.cs-in))
		if kindOf(e) != kindData {
			clear(p[done : done+n])
			done += n
			continue
		}
		fo := int64(e) + in
		for done+n < len(p) {
			ne, _, err := im.entryAt((pos + int64(n)) >> im.shift)
			if err != nil || kindOf(ne) != kindData || int64(ne) != fo+int64(n) {
				break
			}
			n += int(min(int64(len(p)-done-n), im.cs))
		}
		if _, err := im.f.ReadAt(p[done:done+n], fo); err != nil && err != io.EOF {
			return done, driver.WithFile(err, "read", im.name)
		} else if err == io.EOF {
			return done, driver.Corruptf(im.name, fo, "data cluster cut short by the end of the file")
		}
		done += n
	}
	return done, nil
}

// writable fails for read-only images and images that need repair.
func (im *image) writable(off int64) error {
	if im.ro {
		return driver.Errorf(driver.ErrReadOnly, im.name, off, "image opened read-only")
	}
	im.meta.Lock()
	broken := im.broken
	im.meta.Unlock()
	if broken != "" {
		return driver.Corruptf(im.name, -1, "the image must be repaired before it is written: %s (run check -r all)", broken)
	}
	return nil
}

// WriteAt writes p at off. Allocated clusters are written in place; runs
// of other clusters are allocated together at the end of the file (the
// rest of a new cluster zeros), then the L2 entries are pointed at them.
// In an image with a backing file, a write covering part of an
// unallocated cluster writes nothing and asks for a fill.
func (im *image) WriteAt(p []byte, off int64) (int, error) {
	if err := im.writable(off); err != nil {
		return 0, err
	}
	im.mu.RLock()
	defer im.mu.RUnlock()
	if err := driver.CheckRange(im.name, off, int64(len(p)), im.Size()); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	diff := im.hasBacking()
	if err := im.needFill(off, off+int64(len(p)), diff); err != nil {
		return 0, err
	}
	if err := im.write(p, off, diff); err != nil {
		return 0, err
	}
	return len(p), nil
}

// needFill returns the FillError for a write of [off, end) whose head or
// tail cluster is unallocated and only partly covered, in an image with a
// backing file; nil when the write can go ahead. The container's range
// lock keeps the two entries from changing until the write is done.
func (im *image) needFill(off, end int64, diff bool) error {
	if !diff {
		return nil
	}
	start, stop := off, end
	partial := func(c int64) (bool, error) {
		e, _, err := im.entryAt(c)
		if err != nil || e != 0 {
			return false, err
		}
		lo := c * im.cs
		return off > lo || end < lo+im.clusterLen(c), nil
	}
	hc, tc := off>>im.shift, (end-1)>>im.shift
	if ok, err := partial(hc); err != nil {
		return err
	} else if ok {
		start = hc * im.cs
	}
	if ok, err := partial(tc); err != nil {
		return err
	} else if ok {
		stop = tc*im.cs + im.clusterLen(tc)
	}
	if start == off && stop == end {
		return nil
	}
	return driver.NeedFill(im.name, start, stop)
}

// write does WriteAt's work after the fill check.
func (im *image) write(p []byte, off int64, diff bool) error {
	for len(p) > 0 {
		c, in := off>>im.shift, off&(im.cs-1)
		e, _, err := im.entryAt(c)
		if err != nil {
			return err
		}
		var n int64
		if kindOf(e) == kindData {
			n = min(int64(len(p)), im.cs-in)
			fo := int64(e) + in
			for n < int64(len(p)) {
				ne, _, err := im.entryAt((off + n) >> im.shift)
				if err != nil || kindOf(ne) != kindData || int64(ne) != fo+n {
					break
				}
				n += min(int64(len(p))-n, im.cs)
			}
			if _, err := im.f.WriteAt(p[:n], fo); err != nil {
				return driver.WithFile(err, "write", im.name)
			}
		} else if n, err = im.writeNew(p, off, e, diff); err != nil {
			return err
		}
		p, off = p[n:], off+n
	}
	return nil
}

// writeNew writes a prefix of p at off, whose cluster (entry e) is zero or
// unallocated, and returns its length. It allocates the run of following
// non-data clusters of the same L2 table that p covers with data.
func (im *image) writeNew(p []byte, off int64, e uint64, diff bool) (int64, error) {
	c, in := off>>im.shift, off&(im.cs-1)
	cl := im.clusterLen(c)
	n := min(int64(len(p)), cl-in)
	if driver.IsZero(p[:n]) {
		if e == zeroEntry || !diff {
			return n, nil // reads zeros already
		}
		if in == 0 && n == cl {
			return n, im.setRun(c, 1, zeroEntry)
		}
	}
	k := int64(1)
	for n < int64(len(p)) && (c+k)%im.nelems != 0 {
		ne, _, err := im.entryAt(c + k)
		if err != nil || kindOf(ne) == kindData {
			break
		}
		m := min(int64(len(p))-n, im.clusterLen(c+k))
		if driver.IsZero(p[n : n+m]) {
			break // the next round may need no allocation for it
		}
		n += m
		k++
	}
	im.allocMu.Lock()
	defer im.allocMu.Unlock()
	fo, err := im.allocData(k)
	if err != nil {
		return 0, err
	}
	data := p[:n]
	if in != 0 || n != k*im.cs {
		// Whole clusters go to the file: zeros around the data.
		data = make([]byte, k*im.cs)
		copy(data[in:], p[:n])
	}
	if _, err := im.f.WriteAt(data, fo); err != nil {
		im.release(fo, k)
		return 0, driver.WithFile(err, "write", im.name)
	}
	im.meta.Lock()
	defer im.meta.Unlock()
	if _, err := im.setEntriesLocked(c, k, uint64(fo)); err != nil {
		im.releaseLocked(fo, k)
		return 0, err
	}
	return n, nil
}

// setRun points clusters c..c+k-1 (one L2 table) at v (0 or the zero
// entry), freeing the data clusters they held.
func (im *image) setRun(c, k int64, v uint64) error {
	im.meta.Lock()
	defer im.meta.Unlock()
	if err := im.markNeedCheck(); err != nil {
		return err
	}
	old, err := im.setEntriesLocked(c, k, v)
	if err != nil {
		return err
	}
	im.freeLocked(old)
	return nil
}

// release gives back clusters reserved for a write that failed: they are
// referenced by nothing, so they can be reused after the next flush.
func (im *image) release(fo, k int64) {
	im.meta.Lock()
	defer im.meta.Unlock()
	im.releaseLocked(fo, k)
}

func (im *image) releaseLocked(fo, k int64) {
	if fo+k*im.cs == im.fileEnd {
		im.fileEnd = fo
		return
	}
	for i := range k {
		im.pending = append(im.pending, fo+i*im.cs)
	}
}
