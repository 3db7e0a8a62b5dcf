package qcow2

import "github.com/vdisk/vdisk/driver"

// FileExtent maps [off, off+n) to the file where the image stores it
// byte for byte (vdisk.FileExtenter, for copy offload): uncompressed data
// clusters (and allocated subclusters) of an unencrypted image hold the
// guest's bytes verbatim, in the qcow2 file or in the external data file,
// and clusters contiguous in that file make one run. Compressed clusters,
// zero and unallocated runs, and every run of an encrypted image (its
// clusters hold ciphertext) map to no file. A data cluster may have holes
// in the file (qemu zeroes the unwritten part of a new cluster with a
// hole where it can) and the last one may end past the end of the file
// (read as zeros), so holes is true.
//
// Data clusters never move while they are mapped: a cluster is freed or
// reallocated only through its own guest range (a write that copies it
// because a snapshot shares it, a discard, a zero write), which the
// caller's range lock keeps out, or by structural operations (snapshots,
// resize, check) that the container runs with the whole disk locked and
// that take opMu exclusively here.
func (im *image) FileExtent(off, n int64) (f driver.File, fileOff, length int64, holes bool, err error) {
	im.opMu.RLock()
	defer im.opMu.RUnlock()
	if err := driver.CheckRange(im.name, off, n, im.Size()); err != nil {
		return nil, 0, 0, false, err
	}
	if n == 0 {
		return nil, 0, 0, false, nil
	}
	im.drainCompressor()
	im.mu.Lock()
	r, err := im.mapRange(off, n, false)
	im.mu.Unlock()
	if err != nil {
		return nil, 0, 0, false, err
	}
	if r.n <= 0 || r.n > n {
		return nil, 0, 0, false, driver.Corruptf(im.name, off, "mapping returned a run of %d bytes for %d", r.n, n)
	}
	if r.kind != rData || im.crypt != nil || r.host < 0 {
		return nil, 0, r.n, false, nil
	}
	return im.df, r.host, r.n, true, nil
}
