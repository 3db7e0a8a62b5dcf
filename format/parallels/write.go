package parallels

import (
	"context"
	"encoding/binary"
	"errors"
	"math"
	"sync/atomic"

	"github.com/vdisk/vdisk/driver"
)

// writable fails for read-only images.
func (im *image) writable(off int64) error {
	if im.ro {
		return driver.Errorf(driver.ErrReadOnly, im.name, off, "image opened read-only")
	}
	return nil
}

// WriteAt writes p at off. Allocated clusters are written in place
// (clusters contiguous in the file with one write); a write into
// unallocated clusters takes new clusters (a hole left by a discard, or the
// end of the data), writes the data, then points the BAT entries at them.
// New clusters read zeros, so a partial write needs no fill: Parallels
// images have no parent here, and never answer with a FillError.
func (im *image) WriteAt(p []byte, off int64) (int, error) {
	if err := im.writable(off); err != nil {
		return 0, err
	}
	im.mu.RLock()
	defer im.mu.RUnlock()
	if err := driver.CheckRange(im.name, off, int64(len(p)), im.Size()); err != nil {
		return 0, err
	}
	cs := im.l.cs
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		c, in := pos/cs, pos%cs
		e := im.entry(c)
		n := int(min(int64(len(p)-done), cs-in))
		if e != 0 {
			fo := im.off(e) + in
			for done+n < len(p) {
				ne := im.entry((pos + int64(n)) / cs)
				if ne == 0 || im.off(ne) != fo+int64(n) {
					break
				}
				n += int(min(int64(len(p)-done-n), cs))
			}
			if _, err := im.f.WriteAt(p[done:done+n], fo); err != nil {
				return done, driver.WithFile(err, "write", im.name)
			}
			done += n
			continue
		}
		if driver.IsZero(p[done : done+n]) {
			done += n // an unallocated cluster reads zeros already
			continue
		}
		// Take the run of following unallocated clusters in one go, up to
		// one that would be written only with zeros.
		k := int64(1)
		for done+n < len(p) {
			nc := (pos + int64(n)) / cs
			if im.entry(nc) != 0 {
				break
			}
			m := int(min(int64(len(p)-done-n), cs))
			if driver.IsZero(p[done+n : done+n+m]) {
				break
			}
			n += m
			k++
		}
		if err := im.allocRun(c, k, in, p[done:done+n]); err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// allocRun gives clusters c..c+k-1 new file clusters and writes data
// (starting at byte in of cluster c) into them: the data first, then the
// BAT entries.
func (im *image) allocRun(c, k, in int64, data []byte) error {
	first, err := im.reserve(k)
	if err != nil {
		return err
	}
	// Clusters that fail here are leaked (check reclaims them), never
	// reused: they may hold part of the data.
	if _, err := im.f.WriteAt(data, first+in); err != nil {
		return driver.WithFile(err, "write", im.name)
	}
	return im.pointRun(c, k, first)
}

// pointRun points the BAT entries of clusters c..c+k-1 at the k file
// clusters from first (whose data is written).
func (im *image) pointRun(c, k, first int64) error {
	raw := make([]byte, 4*k)
	for j := range k {
		binary.LittleEndian.PutUint32(raw[4*j:], uint32((first+j*im.l.cs)/im.l.mult))
	}
	im.meta.Lock()
	defer im.meta.Unlock()
	if _, err := im.f.WriteAt(raw, headerSize+4*c); err != nil {
		return driver.WithFile(err, "write BAT", im.name)
	}
	for j := range k {
		atomic.StoreUint32(&im.bat[c+j], binary.LittleEndian.Uint32(raw[4*j:]))
	}
	return nil
}

// reserve takes k consecutive file clusters that read zeros: a hole from
// the free list for a single cluster, else the end of the data, growing the
// file by the preallocation size when it is too short.
func (im *image) reserve(k int64) (int64, error) {
	im.meta.Lock()
	defer im.meta.Unlock()
	if k == 1 && len(im.free) > 0 {
		off := im.free[len(im.free)-1]
		im.free = im.free[:len(im.free)-1]
		return off, nil
	}
	cs := im.l.cs
	off := im.l.alignUp(im.dataEnd)
	end := off + k*cs
	if end < 0 || (end-cs)/im.l.mult > math.MaxUint32 {
		return 0, driver.Errorf(driver.ErrUnsupported, im.name, -1,
			"the image is full: a cluster at file offset %d cannot be recorded in the BAT", end-cs)
	}
	if end > im.fileLen {
		grow := max(cs, (im.preSize+sectorSize-1)&^(sectorSize-1))
		if err := im.growLocked(end + grow); err != nil {
			return 0, err
		}
	}
	im.dataEnd = end
	return off, nil
}

// growLocked extends the file to n bytes as prealloc-mode says.
func (im *image) growLocked(n int64) error {
	if !im.preTrunc {
		if a, ok := im.f.(driver.Allocator); ok {
			err := a.Allocate(im.fileLen, n-im.fileLen)
			if err == nil {
				im.fileLen = n
				return nil
			}
			if !errors.Is(err, driver.ErrUnsupported) {
				return driver.WithFile(err, "preallocate", im.name)
			}
		}
	}
	if err := im.f.Truncate(n); err != nil {
		return driver.WithFile(err, "grow", im.name)
	}
	im.fileLen = n
	return nil
}

// Discard makes every whole cluster inside [off, off+n) unallocated (it
// reads zeros): the BAT entries are cleared, then the clusters are punched
// and kept for reuse.
func (im *image) Discard(off, n int64) error {
	if err := im.writable(off); err != nil {
		return err
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := driver.CheckRange(im.name, off, n, im.Size()); err != nil {
		return err
	}
	return im.discardLocked(off, n)
}

// discardLocked is Discard's work; the caller holds mu exclusively.
func (im *image) discardLocked(off, n int64) error {
	cs := im.l.cs
	first := (off + cs - 1) / cs
	end := off + n
	last := end / cs // exclusive
	if end == im.Size() {
		last = (end + cs - 1) / cs
	}
	im.meta.Lock()
	defer im.meta.Unlock()
	for c := first; c < last && c < int64(len(im.bat)); {
		if im.entry(c) == 0 {
			c++
			continue
		}
		// A run of allocated entries is cleared with one write.
		r := c
		for r < last && r < int64(len(im.bat)) && im.entry(r) != 0 {
			r++
		}
		if _, err := im.f.WriteAt(make([]byte, 4*(r-c)), headerSize+4*c); err != nil {
			return driver.WithFile(err, "write BAT", im.name)
		}
		for j := c; j < r; j++ {
			fo := im.off(atomic.SwapUint32(&im.bat[j], 0))
			if err := im.f.PunchHole(fo, cs); err != nil {
				// The cluster is unreferenced but may hold data: leak it.
				continue
			}
			im.free = append(im.free, fo)
		}
		c = r
	}
	return nil
}

// WriteZeroes makes [off, off+n) read zeros. With unmap, whole clusters
// become unallocated (they read zeros in an image without a parent); the
// allocated parts left are overwritten with zeros in place. Unallocated
// clusters read zeros already.
func (im *image) WriteZeroes(off, n int64, unmap bool) error {
	if err := im.writable(off); err != nil {
		return err
	}
	if unmap {
		im.mu.Lock()
		defer im.mu.Unlock()
	} else {
		im.mu.RLock()
		defer im.mu.RUnlock()
	}
	if err := driver.CheckRange(im.name, off, n, im.Size()); err != nil {
		return err
	}
	if unmap {
		if err := im.discardLocked(off, n); err != nil {
			return err
		}
	}
	cs := im.l.cs
	for pos, end := off, off+n; pos < end; {
		c, in := pos/cs, pos%cs
		m := min(end-pos, cs-in)
		if e := im.entry(c); e != 0 {
			if err := im.zeroFile(im.off(e)+in, m); err != nil {
				return driver.WithFile(err, "write zeros", im.name)
			}
		}
		pos += m
	}
	return nil
}

// Resize grows the virtual disk. When the larger BAT does not fit before
// the data area, the clusters in its way move to the end of the data
// first.
func (im *image) Resize(ctx context.Context, size int64, prealloc string) error {
	if err := im.writable(-1); err != nil {
		return err
	}
	if prealloc != "" && prealloc != "off" {
		return driver.Unsupportedf(im.name, "preallocation %q on resize", prealloc)
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if size < im.Size() {
		return driver.Unsupportedf(im.name, "shrinking a Parallels image")
	}
	if size > math.MaxInt64-im.l.cs {
		return driver.OptionErrorf("size %d is too large", size)
	}
	size = (size + sectorSize - 1) &^ (sectorSize - 1)
	cs := im.l.cs
	nb := (size + cs - 1) / cs
	if nb > math.MaxUint32 || (!im.hdr.ext() && size/sectorSize > math.MaxUint32) {
		return driver.OptionErrorf("size %d is too large for this Parallels image", size)
	}
	old := int64(len(im.bat))
	newDataOff := im.l.dataOff
	if be := batEnd(nb); be > im.l.dataOff {
		newDataOff = im.l.alignUp(be)
		if newDataOff/sectorSize > math.MaxUint32 {
			return driver.OptionErrorf("size %d is too large: the BAT would not fit", size)
		}
		if err := im.evict(ctx, newDataOff); err != nil {
			return err
		}
	}
	// Zero the new entries (the space may have held data), durable before
	// the header that makes them part of the BAT.
	if nb > old {
		if err := driver.WriteZeros(im.f, batEnd(old), 4*(nb-old)); err != nil {
			return driver.WithFile(err, "resize", im.name)
		}
		if err := im.f.Sync(); err != nil {
			return driver.WithFile(err, "resize", im.name)
		}
	}
	im.meta.Lock()
	defer im.meta.Unlock()
	h := im.hdr
	h.batEntries = uint32(nb)
	h.nbSectors = uint64(size / sectorSize)
	h.cylinders = uint32(min(size/sectorSize/createHeads/secInCyl, math.MaxUint32))
	h.dataOff = uint32(newDataOff / sectorSize)
	if _, err := im.f.WriteAt(h.encode(), 0); err != nil {
		return driver.WithFile(err, "resize", im.name)
	}
	im.hdr = h
	bat := make([]uint32, nb)
	copy(bat, im.bat)
	im.bat = bat
	im.l.dataOff = newDataOff
	im.dataEnd = max(im.dataEnd, newDataOff)
	if im.fileLen < newDataOff {
		if err := im.f.Truncate(newDataOff); err != nil {
			return driver.WithFile(err, "resize", im.name)
		}
		im.fileLen = newDataOff
	}
	im.size.Store(size)
	return nil
}

// evict moves the clusters below newDataOff to the end of the data (copy,
// sync, then the entry), so the BAT can grow over them. The caller holds
// mu exclusively.
func (im *image) evict(ctx context.Context, newDataOff int64) error {
	im.meta.Lock()
	keep := im.free[:0]
	for _, fo := range im.free {
		if fo >= newDataOff {
			keep = append(keep, fo)
		}
	}
	im.free = keep
	if im.dataEnd < newDataOff {
		im.dataEnd = newDataOff
	}
	im.meta.Unlock()
	for c := range int64(len(im.bat)) {
		e := im.entry(c)
		if e == 0 || im.off(e) >= newDataOff {
			continue
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		// A fresh cluster at the end, never a hole below newDataOff.
		im.meta.Lock()
		saved := im.free
		im.free = nil
		im.meta.Unlock()
		to, err := im.reserve(1)
		im.meta.Lock()
		im.free = saved
		im.meta.Unlock()
		if err != nil {
			return err
		}
		if err := im.copyCluster(im.off(e), to); err != nil {
			return err
		}
		if err := im.f.Sync(); err != nil {
			return driver.WithFile(err, "resize", im.name)
		}
		var raw [4]byte
		ne := uint32(to / im.l.mult)
		binary.LittleEndian.PutUint32(raw[:], ne)
		im.meta.Lock()
		_, err = im.f.WriteAt(raw[:], headerSize+4*c)
		if err == nil {
			atomic.StoreUint32(&im.bat[c], ne)
		}
		im.meta.Unlock()
		if err != nil {
			return driver.WithFile(err, "resize", im.name)
		}
	}
	return im.f.Sync()
}

// copyChunk bounds the buffer copying a cluster takes: clusters can be
// nearly 2 GiB.
const copyChunk = 1 << 20

// copyCluster copies the cluster at from to the cluster at to, in pieces;
// the part of the source past the end of the file copies as zeros.
func (im *image) copyCluster(from, to int64) error {
	buf := make([]byte, min(im.l.cs, copyChunk))
	for done := int64(0); done < im.l.cs; {
		n := min(int64(len(buf)), im.l.cs-done)
		if err := im.readData(buf[:n], from+done); err != nil {
			return err
		}
		if _, err := im.f.WriteAt(buf[:n], to+done); err != nil {
			return driver.WithFile(err, "copy cluster", im.name)
		}
		done += n
	}
	return nil
}

// zeroFile zeros n bytes of the file at off, keeping them allocated.
func (im *image) zeroFile(off, n int64) error {
	if z, ok := im.f.(driver.ZeroRanger); ok {
		err := z.ZeroRange(off, n)
		if err == nil || !errors.Is(err, driver.ErrUnsupported) {
			return err
		}
	}
	return driver.WriteZeros(im.f, off, n)
}
