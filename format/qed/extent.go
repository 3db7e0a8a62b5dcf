package qed

import "github.com/vdisk/vdisk/driver"

// Copy offload (vdisk.FileExtenter, ExtentPinner and FileCopier): a QED
// data cluster holds the guest's bytes verbatim, so a convert from a QED
// image copies its data clusters file to file inside the kernel, and a
// convert into one copies the source's plain runs straight into new
// clusters, with no pass through user space (qemu-img convert -C; on
// file systems that share blocks, a reflink).

// PinExtents holds off every move of data clusters inside the file (the
// pack on Flush and Close, resize, check and repair, which take mu
// exclusively) until unpin is called, so the entries FileExtent read stay
// where they point while the caller copies from them.
func (im *image) PinExtents() (unpin func()) {
	im.mu.RLock()
	return im.mu.RUnlock
}

// FileExtent maps [off, off+n) to the file where the image stores it byte
// for byte: data clusters, and clusters contiguous in the file make one
// run. Zero and unallocated clusters map to no file (length says how far).
// A data cluster may hold holes of the file (parts never written, which
// read as zeros), so holes is true. Every data entry is checked as reads
// check it: a bad one is ErrCorrupt, as the read path reports it.
//
// The caller holds the pin (PinExtents), so mu is not taken here.
func (im *image) FileExtent(off, n int64) (f driver.File, fileOff, length int64, holes bool, err error) {
	if err := driver.CheckRange(im.name, off, n, im.Size()); err != nil {
		return nil, 0, 0, false, err
	}
	if n == 0 {
		return nil, 0, 0, false, nil
	}
	stop := off + n
	c := off >> im.shift
	e, span, err := im.entryAt(c)
	if err != nil {
		return nil, 0, 0, false, err
	}
	end := min(stop, (c+span)<<im.shift)
	if kindOf(e) != kindData {
		// Runs of the same kind need not be merged: the caller asks again.
		return nil, 0, end - off, false, nil
	}
	fo := int64(e) + off&(im.cs-1)
	for end < stop {
		nc := end >> im.shift
		ne, _, err := im.entryAt(nc)
		if err != nil || kindOf(ne) != kindData || int64(ne) != fo+(end-off) {
			break
		}
		end = min(stop, (nc+1)<<im.shift)
	}
	return im.f, fo, end - off, true, nil
}

// CopyFrom copies n bytes of src at srcOff into the image at off inside
// the kernel, as WriteAt would store them: allocated clusters in place,
// runs of other clusters (of one L2 table) allocated together at the end
// of the file, the copied bytes first and the L2 entries after them. The
// part of a new cluster the copy does not cover is zeroed. Where the
// storage cannot copy between files, or the copy covers part of an
// unallocated cluster of an image with a backing file (which needs a fill
// from the chain), it fails with ErrUnsupported before anything is
// written: the caller then reads and writes.
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
	if err := im.needFill(off, off+n, im.hasBacking()); err != nil {
		return 0, driver.Errorf(driver.ErrUnsupported, im.name, off,
			"a copy into part of an unallocated cluster over a backing file needs a fill: %v", err)
	}
	var done int64
	for done < n {
		pos := off + done
		c, in := pos>>im.shift, pos&(im.cs-1)
		e, _, err := im.entryAt(c)
		if err != nil {
			return done, err
		}
		if kindOf(e) != kindData {
			got, err := im.copyNew(cp, src, srcOff+done, pos, n-done)
			done += got
			if err != nil || got == 0 {
				return done, err
			}
			continue
		}
		m := min(n-done, im.cs-in)
		fo := int64(e) + in
		for done+m < n {
			ne, _, err := im.entryAt((pos + m) >> im.shift)
			if err != nil || kindOf(ne) != kindData || int64(ne) != fo+m {
				break
			}
			m += min(n-done-m, im.cs)
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

// copyNew copies a prefix of the n bytes of src at srcOff into the image
// at off, whose cluster is zero or unallocated, and returns its length: the
// run of following non-data clusters of the same L2 table that the copy
// covers gets new clusters at the end of the file, filled by the copy
// (zeros around it), then the L2 entries point at them.
func (im *image) copyNew(cp driver.RangeCopier, src driver.File, srcOff, off, n int64) (int64, error) {
	c, in := off>>im.shift, off&(im.cs-1)
	m := min(n, im.clusterLen(c)-in)
	k := int64(1)
	for m < n && (c+k)%im.nelems != 0 {
		ne, _, err := im.entryAt(c + k)
		if err != nil || kindOf(ne) == kindData {
			break
		}
		m += min(n-m, im.clusterLen(c+k))
		k++
	}
	im.allocMu.Lock()
	defer im.allocMu.Unlock()
	fo, err := im.allocData(k)
	if err != nil {
		return 0, err
	}
	got, err := cp.CopyFrom(src, srcOff, fo+in, m)
	if err != nil || got == 0 {
		// Nothing points at the clusters: give them back. Bytes a failed
		// copy left there are never read (a reused cluster is written
		// whole before an entry points at it).
		im.release(fo, k)
		if err != nil {
			return 0, driver.WithFile(err, "copy", im.name)
		}
		return 0, nil
	}
	// The rest of the new clusters reads zeros: a reused hole may hold
	// old bytes, and the file must reach the end of the last cluster.
	if in > 0 {
		if err := driver.WriteZeros(im.f, fo, in); err != nil {
			im.release(fo, k)
			return 0, driver.WithFile(err, "write", im.name)
		}
	}
	if tail := in + got; tail < k*im.cs {
		if err := driver.WriteZeros(im.f, fo+tail, k*im.cs-tail); err != nil {
			im.release(fo, k)
			return 0, driver.WithFile(err, "write", im.name)
		}
	}
	im.meta.Lock()
	defer im.meta.Unlock()
	if _, err := im.setEntriesLocked(c, k, uint64(fo)); err != nil {
		im.releaseLocked(fo, k)
		return 0, err
	}
	return got, nil
}

// ClonedBytes is the number of bytes CopyFrom shared into the file by
// reflink rather than copied (0 where the storage does not say).
func (im *image) ClonedBytes() int64 { return driver.ClonedBytes(im.f) }
