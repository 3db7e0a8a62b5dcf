package vhd

import "github.com/vdisk/vdisk/driver"

// FileExtent maps [off, off+n) to the file where the image stores it
// byte for byte (vdisk.FileExtenter, for copy offload). A fixed image's
// data area is the disk itself, from offset 0; its Status reports the
// file's holes, so a Data run holds none. In a dynamic or differencing
// image a block's sectors whose bitmap bits are set are stored verbatim
// in the block's data area; the run ends at the block's end or at the
// first sector whose bit differs, and a run not held (unallocated block,
// clear bits) maps to no file. A block's data area may have holes (a
// block written in part), so holes is true there.
//
// Blocks move only by Compact, which the container runs with the whole
// disk locked; the range lock the caller holds keeps writes out of the
// run, so the answer stays valid while the caller copies.
func (im *image) FileExtent(off, n int64) (f driver.File, fileOff, length int64, holes bool, err error) {
	if err := im.checkAccess(off, n); err != nil {
		return nil, 0, 0, false, err
	}
	if n == 0 {
		return nil, 0, 0, false, nil
	}
	if im.kind == diskFixed {
		return im.f, off, n, false, nil
	}
	b, in := off/im.bs, off%im.bs
	c := min(n, im.bs-in)
	s0, s1 := in/sectorSize, (in+c+sectorSize-1)/sectorSize
	v, err := im.view(b, s0, s1)
	if err != nil {
		return nil, 0, 0, false, err
	}
	if !v.alloc {
		return nil, 0, c, false, nil
	}
	set, ns := v.run(s0, s1)
	l := min((s0+ns)*sectorSize-in, c)
	if !set {
		return nil, 0, l, false, nil
	}
	return im.f, v.data + in, l, true, nil
}
