package vdi

import "github.com/vdisk/vdisk/driver"

// PinExtents holds off every move of data blocks inside the file (the
// pack after a discard or an unmapping write-zeroes, compaction, resize,
// repair) until unpin is called: the block map entries FileExtent reads
// stay where they point while the caller copies from them
// (vdisk.ExtentPinner).
func (im *image) PinExtents() (unpin func()) {
	im.mu.RLock()
	return im.mu.RUnlock
}

// FileExtent maps [off, off+n) to the file where the image stores it
// byte for byte (vdisk.FileExtenter, for copy offload): allocated blocks,
// fixed or dynamic, hold the disk's bytes verbatim in their data blocks,
// and blocks contiguous in the file make one run. Free and zero blocks map
// to no file. A data block may have holes (a fixed image's preallocated
// blocks, a block written in part) and its tail may lie past the end of
// the file (a truncated last block, read as zeros), so holes is true; a
// run whose first byte lies past the end of the file maps to no file, so
// the read path reports it as the corruption it is.
//
// The caller holds the pin (PinExtents), so mu is not taken here.
func (im *image) FileExtent(off, n int64) (f driver.File, fileOff, length int64, holes bool, err error) {
	if err := driver.CheckRange(im.name, off, n, im.Size()); err != nil {
		return nil, 0, 0, false, err
	}
	if n == 0 {
		return nil, 0, 0, false, nil
	}
	b := off / im.bs
	e := im.entry(b)
	end := min(off+n, (b+1)*im.bs)
	if !allocated(e) {
		return nil, 0, end - off, false, nil
	}
	fo := im.dataOff(e) + off%im.bs
	for end < off+n {
		nb := end / im.bs
		ne := im.entry(nb)
		if !allocated(ne) || im.dataOff(ne) != fo+(end-off) {
			break
		}
		end = min(off+n, (nb+1)*im.bs)
	}
	fsize, err := im.f.Size()
	if err != nil {
		return nil, 0, 0, false, driver.WithFile(err, "size", im.name)
	}
	if fo >= fsize {
		return nil, 0, end - off, false, nil
	}
	return im.f, fo, end - off, true, nil
}
