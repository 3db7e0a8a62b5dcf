package raw

import "github.com/vdisk/vdisk/driver"

// FileExtent maps [off, off+n) to the file: a raw image is its file, byte
// for byte. Past the end of the file (the sector rounding) nothing is
// stored. The image's Status shows every hole of the file, so a run Status
// called data holds none (holes is false).
func (im *image) FileExtent(off, n int64) (f driver.File, fileOff, length int64, holes bool, err error) {
	im.mu.RLock()
	fsize := im.fileSize
	im.mu.RUnlock()
	if off >= fsize {
		return nil, 0, n, false, nil
	}
	return im.f, off, min(n, fsize-off), false, nil
}

// CopyFrom copies n bytes of src at srcOff into the image at off without
// passing them through user space, where the file can (see
// osfs.File.CopyFrom); otherwise it fails with driver.ErrUnsupported and
// copies nothing.
func (im *image) CopyFrom(src driver.File, srcOff, off, n int64) (int64, error) {
	if im.readOnly {
		return 0, driver.Errorf(driver.ErrReadOnly, im.name, off, "image opened read-only")
	}
	c, err := driver.CopierOf(im.f, im.name, off)
	if err != nil {
		return 0, err
	}
	done, err := c.CopyFrom(src, srcOff, off, n)
	if done > 0 {
		im.cache.Changed(off, done, true)
		im.mu.Lock()
		im.fileSize = max(im.fileSize, off+done)
		im.mu.Unlock()
	}
	return done, err
}

// ClonedBytes is the number of bytes CopyFrom shared into the file by
// reflink rather than copied (0 where the storage does not say).
func (im *image) ClonedBytes() int64 { return driver.ClonedBytes(im.f) }

// StableExtents marks the image's file extents as fixed (vdisk.StableExtenter):
// byte off of the image is byte off of the file, always.
func (im *image) StableExtents() {}
