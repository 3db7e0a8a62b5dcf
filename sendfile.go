package vdisk

import "github.com/vdisk/vdisk/driver"

// StableExtenter is a FileExtenter whose runs never move: each byte of the
// image always lives at the same place of its file, and that place never
// holds anything else (a raw image is its file). Its extents stay right
// after the Disk's locks are released, which sending them needs: a socket
// given file pages by sendfile(2) reads them when the peer does, so a
// format that reuses space (qcow2 after a discard, VDI packing its blocks)
// could have another range's bytes read in their place.
type StableExtenter interface {
	FileExtenter
	StableExtents()
}

// StableFileRun reports where [off, off+n) of the disk is stored when all
// of it is one plain run in the file of a StableExtenter layer: f holds
// those bytes from fileOff on, and a server may have the kernel send them
// (driver.FileSender). ok is false, with a nil error, when it is not (the
// range holds zeros or spans several runs or layers, the layer's format
// stores data otherwise): the caller reads the range.
func (d *Disk) StableFileRun(off, n int64) (f driver.File, fileOff int64, ok bool, err error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if err := d.check(off, n); err != nil {
		return nil, 0, false, err
	}
	if n == 0 {
		return nil, 0, false, nil
	}
	r := d.lockRange(off, n, false)
	defer d.locks.Unlock(r)
	e, err := d.statusFrom(0, off, n)
	if err != nil {
		return nil, 0, false, err
	}
	if !e.IsData() || e.Compressed || e.Length < n {
		return nil, 0, false, nil
	}
	l := d.layers[e.Depth]
	se, isStable := l.img.(StableExtenter)
	if !isStable {
		return nil, 0, false, nil
	}
	// Holes of the file (the last result) are sent as the zeros they read
	// as: only the length matters.
	f, fileOff, length, _, err := se.FileExtent(off, n)
	if err != nil {
		return nil, 0, false, driver.WithFile(err, "map", l.Name)
	}
	if f == nil || length < n || fileOff < 0 {
		return nil, 0, false, nil
	}
	return f, fileOff, true, nil
}
