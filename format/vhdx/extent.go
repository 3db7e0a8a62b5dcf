package vhdx

import "github.com/vdisk/vdisk/driver"

// Copy offload (vdisk.FileExtenter and FileCopier): a VHDX payload block
// holds the guest's bytes verbatim, so a convert from a VHDX copies its
// data runs file to file inside the kernel (skipping the holes of the
// file inside written blocks, which qemu-img reads), and a convert into
// one copies the source's plain runs straight into its blocks, with no
// pass through user space. Blocks never move inside the file while the
// container's range lock on them is held (only Compact, Resize and
// repair move or free referenced blocks, and they run with the disk
// locked exclusively), so no pin is needed.

// FileExtent maps [off, off+n) to the file where the image stores it byte
// for byte: the data runs of present blocks (and of the sectors a
// differencing image's bitmap marks present), consecutive blocks
// contiguous in the file making one run. Zero and unallocated runs map to
// no file. A block may hold holes of the file (parts never written, which
// read as zeros), so holes is true. A log replayed in memory (a read-only
// open) may patch the file, so such an image maps nothing and is read
// through the patches instead.
func (im *image) FileExtent(off, n int64) (f driver.File, fileOff, length int64, holes bool, err error) {
	im.mu.Lock()
	size := im.p.diskSize
	if err := driver.CheckRange(im.name, off, n, size); err != nil || n == 0 {
		im.mu.Unlock()
		return nil, 0, 0, false, err
	}
	if _, patched := im.r.(*overlay); patched {
		im.mu.Unlock()
		return nil, 0, n, false, nil
	}
	st, foff, l, err := im.runLocked(off, n)
	if err != nil {
		im.mu.Unlock()
		return nil, 0, 0, false, err
	}
	if st != driver.Data {
		im.mu.Unlock()
		return nil, 0, l, false, nil
	}
	for off+l < off+n && (off+l)%im.p.blockSize == 0 {
		nst, nfoff, nl, err := im.runLocked(off+l, n-l)
		if err != nil || nst != driver.Data || nfoff != foff+l {
			break
		}
		l += nl
	}
	im.mu.Unlock()
	// qemu cuts a fixed image's file at the disk's end, and a block
	// written only at its start ends the file early: what lies past the
	// end of the file reads zeros through the read path.
	fsize, err := im.f.Size()
	if err != nil {
		return nil, 0, 0, false, err
	}
	if foff >= fsize {
		return nil, 0, l, false, nil
	}
	return im.f, foff, min(l, fsize-foff), true, nil
}

// CopyFrom copies n bytes of src at srcOff into the image at off inside
// the kernel, as WriteAt would store them: present blocks in place, new
// blocks allocated as a write allocates them (at the end of the file or
// in free space, reading zeros around the copy), the BAT and sector
// bitmap changes committed through the log by the next flush. Where the
// storage cannot copy between files, or a differencing image needs a
// fill from its parent for a partial sector, it fails with ErrUnsupported
// and the caller reads and writes instead; a block allocated for a copy
// the kernel then refused reads as it did before (zeros in a base image;
// the parent, its sectors unmarked, in a differencing one).
func (im *image) CopyFrom(src driver.File, srcOff, off, n int64) (int64, error) {
	if im.ro {
		return 0, im.readOnlyErr(off)
	}
	cp, err := driver.CopierOf(im.f, im.name, off)
	if err != nil {
		return 0, err
	}
	if err := im.needFill(off, n); err != nil {
		return 0, driver.Errorf(driver.ErrUnsupported, im.name, off, "a copy into part of a sector the image does not hold needs a fill: %v", err)
	}
	if err := im.prepareWrite(off, n); err != nil {
		return 0, err
	}
	bs := im.p.blockSize
	var done int64
	for done < n {
		pos := off + done
		b, in := pos/bs, pos%bs
		c := min(n-done, bs-in)
		so := srcOff + done
		got, err := im.storeBlock(b, in, c, func(foff int64) (int64, error) {
			return cp.CopyFrom(src, so, foff, c)
		})
		done += got
		if err != nil {
			return done, driver.WithFile(err, "copy", im.name)
		}
		if got < c {
			return done, nil // the source ends: the caller sees the short count
		}
	}
	return done, nil
}

// ClonedBytes is the number of bytes CopyFrom shared into the file by
// reflink rather than copied (0 where the storage does not say).
func (im *image) ClonedBytes() int64 { return driver.ClonedBytes(im.f) }
