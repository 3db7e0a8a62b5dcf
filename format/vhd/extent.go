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
	if _, err := im.checkAccess(off, n); err != nil {
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

// CopyFrom copies n bytes of src at srcOff into the image at off inside
// the kernel (vdisk.FileCopier), as WriteAt would store them: a fixed
// image's data area in place; in a dynamic or differencing image, present
// blocks in place with their sectors marked, new blocks appended as a
// write appends them (data, then the bitmap, then the BAT entry). Only
// whole sectors are copied: a range that starts or ends inside a sector
// (which may need a read-modify-write or a fill from the parent), or
// storage that cannot copy between files, fails with ErrUnsupported
// before anything is written, and the caller reads and writes instead.
func (im *image) CopyFrom(src driver.File, srcOff, off, n int64) (int64, error) {
	if im.ro {
		return 0, im.readOnlyErr(off)
	}
	cp, err := driver.CopierOf(im.f, im.name, off)
	if err != nil {
		return 0, err
	}
	if _, err := im.checkAccess(off, n); err != nil {
		return 0, err
	}
	if im.kind == diskFixed {
		got, err := cp.CopyFrom(src, srcOff, off, n)
		im.holes.Changed(off, got, true)
		return got, driver.WithFile(err, "copy", im.name)
	}
	if off%sectorSize != 0 || n%sectorSize != 0 {
		return 0, driver.Errorf(driver.ErrUnsupported, im.name, off, "a copy of part of a sector is written through the write path")
	}
	var done int64
	for done < n {
		pos := off + done
		b, in := pos/im.bs, pos%im.bs
		c := min(n-done, im.bs-in)
		got, err := im.copyBlock(cp, src, srcOff+done, b, in, c)
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

// copyBlock copies c bytes (whole sectors) of src at srcOff to byte in of
// block b and returns the bytes the image now holds from the copy, a
// multiple of the sector size.
func (im *image) copyBlock(cp driver.RangeCopier, src driver.File, srcOff, b, in, c int64) (int64, error) {
	s0, s1 := in/sectorSize, (in+c)/sectorSize
	v, err := im.view(b, s0, s1)
	if err != nil {
		return 0, err
	}
	if v.alloc {
		got, err := cp.CopyFrom(src, srcOff, v.data+in, c)
		got -= got % sectorSize
		if got > 0 {
			im.mu.Lock()
			serr := im.setBitsLocked(b, s0, s0+got/sectorSize)
			im.mu.Unlock()
			if err == nil {
				err = serr
			}
		}
		return got, err
	}
	bm := make([]byte, im.bmSize)
	return im.allocBlockWith(b, bm, func(dataPos int64) (int64, error) {
		got, err := cp.CopyFrom(src, srcOff, dataPos+in, c)
		if err != nil {
			return 0, err
		}
		got -= got % sectorSize
		if im.kind == diskDiff {
			// Only the sectors copied become this image's.
			for s := s0; s < s0+got/sectorSize; s++ {
				bm[s/8] |= 0x80 >> (s % 8)
			}
		} else {
			// As allocWrite: every bit set, the rest reads zeros.
			for i := range bm {
				bm[i] = 0xFF
			}
		}
		return got, nil
	})
}

// ClonedBytes is the number of bytes CopyFrom shared into the file by
// reflink rather than copied (0 where the storage does not say).
func (im *image) ClonedBytes() int64 { return driver.ClonedBytes(im.f) }
