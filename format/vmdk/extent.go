package vmdk

import "github.com/vdisk/vdisk/driver"

// FileExtent maps [off, off+n) to the file where the image stores it
// byte for byte (vdisk.FileExtenter, for copy offload): a FLAT or VMFS
// extent is its file from the extent's offset on (monolithicFlat,
// twoGbMaxExtentFlat, vmfs), and an uncompressed grain of a hosted
// sparse extent is stored verbatim (grains contiguous in the file make
// one run). Compressed grains (streamOptimized), ZERO extents and grains
// not allocated map to no file. A flat extent file may be sparse or
// shorter than the extent (both read as zeros), as may a grain's tail at
// the end of a sparse file, so holes is true; a grain starting past the
// end of its file maps to no file, so that the read path reports it.
//
// Grains never move once written (nothing packs a sparse extent), and
// the caller's range lock keeps writes out of the run.
func (im *image) FileExtent(off, n int64) (f driver.File, fileOff, length int64, holes bool, err error) {
	if err := driver.CheckRange(im.name, off, n, im.size); err != nil {
		return nil, 0, 0, false, err
	}
	if n == 0 {
		return nil, 0, 0, false, nil
	}
	r, err := im.runAt(off, n)
	if err != nil {
		return nil, 0, 0, false, err
	}
	if r.st != driver.Data || r.fileOff < 0 || r.e.f == nil {
		return nil, 0, r.n, false, nil
	}
	if sp := r.e.sp; sp != nil && r.fileOff >= sp.sizeNow() {
		return nil, 0, r.n, false, nil
	}
	return r.e.f, r.fileOff, r.n, true, nil
}
