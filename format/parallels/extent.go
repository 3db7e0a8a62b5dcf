package parallels

import "github.com/vdisk/vdisk/driver"

// Copy offload (vdisk.FileExtenter, ExtentPinner and FileCopier): a
// Parallels data cluster holds the guest's bytes verbatim, so a convert
// from a Parallels image copies its clusters file to file inside the
// kernel, and a convert into one copies the source's plain runs straight
// into new clusters, with no pass through user space (qemu-img convert -C;
// on file systems that share blocks, a reflink).

// PinExtents holds off every operation that frees or moves clusters
// (discard, write-zeroes with unmap, resize, repair: they take mu
// exclusively) until unpin is called, so the BAT entries FileExtent read
// stay where they point while the caller copies from them.
func (im *image) PinExtents() (unpin func()) {
	im.mu.RLock()
	return im.mu.RUnlock
}

// FileExtent maps [off, off+n) to the file where the image stores it byte
// for byte: allocated clusters, and clusters contiguous in the file make
// one run; unallocated clusters map to no file (length says how far). A
// cluster may hold holes of the file (preallocated or never written) and
// may end past the end of the file (read as zeros), so holes is true.
//
// The caller holds the pin (PinExtents), so mu is not taken here.
func (im *image) FileExtent(off, n int64) (f driver.File, fileOff, length int64, holes bool, err error) {
	if err := driver.CheckRange(im.name, off, n, im.Size()); err != nil {
		return nil, 0, 0, false, err
	}
	if n == 0 {
		return nil, 0, 0, false, nil
	}
	cs := im.l.cs
	c := off / cs
	e := im.entry(c)
	end := min(off+n, (c+1)*cs)
	if e == 0 {
		return nil, 0, end - off, false, nil
	}
	fo := im.off(e) + off%cs
	for end < off+n {
		nc := end / cs
		ne := im.entry(nc)
		if ne == 0 || im.off(ne) != fo+(end-off) {
			break
		}
		end = min(off+n, (nc+1)*cs)
	}
	return im.f, fo, end - off, true, nil
}

// CopyFrom copies n bytes of src at srcOff into the image at off inside
// the kernel, as WriteAt would store them: allocated clusters in place,
// runs of unallocated clusters in new clusters (which read zeros where the
// copy does not reach), the copied bytes first and the BAT entries after
// them. Where the storage cannot copy between files it fails with
// ErrUnsupported before anything is written: the caller then reads and
// writes.
func (im *image) CopyFrom(src driver.File, srcOff, off, n int64) (int64, error) {
	if err := im.writable(off); err != nil {
		return 0, err
	}
	cp, err := driver.CopierOf(im.f, im.name, off)
	if err != nil {
		return 0, err
	}
	im.mu.RLock()
	defer im.mu.RUnlock()
	if err := driver.CheckRange(im.name, off, n, im.Size()); err != nil {
		return 0, err
	}
	cs := im.l.cs
	var done int64
	for done < n {
		pos := off + done
		c, in := pos/cs, pos%cs
		e := im.entry(c)
		m := min(n-done, cs-in)
		if e == 0 {
			// The run of following unallocated clusters the copy covers.
			k := int64(1)
			for done+m < n && im.entry((pos+m)/cs) == 0 {
				m += min(n-done-m, cs)
				k++
			}
			got, err := im.copyRun(cp, src, srcOff+done, c, k, in, m)
			done += got
			if err != nil || got < m {
				return done, err
			}
			continue
		}
		fo := im.off(e) + in
		for done+m < n {
			ne := im.entry((pos + m) / cs)
			if ne == 0 || im.off(ne) != fo+m {
				break
			}
			m += min(n-done-m, cs)
		}
		got, err := cp.CopyFrom(src, srcOff+done, fo, m)
		done += got
		if err != nil {
			return done, driver.WithFile(err, "copy", im.name)
		}
		if got < m {
			return done, nil // the source ends: the caller sees the short count
		}
	}
	return done, nil
}

// copyRun gives clusters c..c+k-1 new file clusters and copies m bytes of
// src at srcOff into them from byte in of cluster c, then points the BAT
// entries at them. A copy that copied nothing gives the clusters back
// (they still read zeros).
func (im *image) copyRun(cp driver.RangeCopier, src driver.File, srcOff, c, k, in, m int64) (int64, error) {
	first, err := im.reserve(k)
	if err != nil {
		return 0, err
	}
	got, err := cp.CopyFrom(src, srcOff, first+in, m)
	if got == 0 {
		im.unreserve(first, k)
		if err != nil {
			return 0, driver.WithFile(err, "copy", im.name)
		}
		return 0, nil
	}
	if err != nil {
		// Part of the data is there: the clusters are leaked (check
		// reclaims them), never reused, as a failed write leaves them.
		return 0, driver.WithFile(err, "copy", im.name)
	}
	if err := im.pointRun(c, k, first); err != nil {
		return 0, err
	}
	return got, nil
}

// unreserve gives back k clusters from first that reserve handed out and
// nothing wrote: the end of the data moves back if they end it, a single
// cluster returns to the free list, and anything else stays leaked.
func (im *image) unreserve(first, k int64) {
	im.meta.Lock()
	defer im.meta.Unlock()
	switch {
	case first+k*im.l.cs == im.dataEnd:
		im.dataEnd = first
	case k == 1:
		im.free = append(im.free, first)
	}
}

// ClonedBytes is the number of bytes CopyFrom shared into the file by
// reflink rather than copied (0 where the storage does not say).
func (im *image) ClonedBytes() int64 { return driver.ClonedBytes(im.f) }
