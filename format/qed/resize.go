package qed

import (
	"context"
	"sync/atomic"

	"github.com/vdisk/vdisk/driver"
)

// Resize grows the virtual size (qemu's QED does not shrink). The size is
// rounded up to whole sectors. What the image itself holds past the old
// end (the tail of an allocated last cluster, stray entries of a damaged
// image) is cleared so the grown range reads zeros.
func (im *image) Resize(ctx context.Context, size int64, prealloc string) error {
	if prealloc != "" && prealloc != "off" {
		return driver.Unsupportedf(im.name, "QED has no preallocation (%q)", prealloc)
	}
	if err := im.writable(-1); err != nil {
		return err
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if size < 0 {
		return driver.OptionErrorf("negative size %d", size)
	}
	mx := maxImageSize(im.cs, im.ts)
	if size <= mx {
		size = (size + 511) &^ 511
	}
	old := im.Size()
	if size < old {
		return driver.Unsupportedf(im.name, "shrinking a QED image is not supported (from %d to %d bytes)", old, size)
	}
	if size > mx {
		return driver.OptionErrorf("size %d is too large for this QED image (at most %d with %d-byte clusters and %d-cluster tables)", size, mx, im.cs, im.ts)
	}
	if size == old {
		return nil
	}
	im.meta.Lock()
	defer im.meta.Unlock()
	if err := im.markNeedCheck(); err != nil {
		return err
	}
	// The tail of the last cluster past the old end.
	if in := old & (im.cs - 1); in != 0 {
		c := old >> im.shift
		i, j := c/im.nelems, c%im.nelems
		t, err := im.tableLocked(i)
		if err != nil {
			return err
		}
		if t != nil {
			if e := atomic.LoadUint64(&t.e[j]); kindOf(e) == kindData && im.validData(e, im.fileEnd) {
				if err := driver.WriteZeros(im.f, int64(e)+in, im.cs-in); err != nil {
					return driver.WithFile(err, "write", im.name)
				}
			}
		}
	}
	// Entries of clusters wholly past the old end.
	first := (old + im.cs - 1) >> im.shift
	last := (size + im.cs - 1) >> im.shift
	for i := first / im.nelems; i*im.nelems < last; i++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		t, err := im.tableLocked(i)
		if err != nil {
			return err
		}
		if t == nil {
			continue
		}
		for j := max(first-i*im.nelems, 0); j < im.nelems && i*im.nelems+j < last; j++ {
			if e := atomic.LoadUint64(&t.e[j]); e != 0 {
				if err := im.setOneLocked(owner{i, j}, 0); err != nil {
					return err
				}
				im.freeLocked([]uint64{e})
			}
		}
	}
	im.hdr.imageSize = uint64(size)
	if err := im.writeHeader(); err != nil {
		return err
	}
	im.size.Store(size)
	return nil
}

// SetParent rewrites the recorded backing file (inside the header
// clusters, after the fixed fields); nil makes the image standalone.
// Only "raw" can be recorded as the backing format.
func (im *image) SetParent(ref *driver.ParentRef) error {
	if err := im.writable(-1); err != nil {
		return err
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	im.meta.Lock()
	defer im.meta.Unlock()
	h := im.hdr
	h.features &^= featBacking | featRawNoProbe
	h.backOff, h.backSize, h.backing = 0, 0, ""
	if ref != nil {
		if ref.Name == "" {
			return driver.OptionErrorf("QED records the backing file by name; an empty name cannot be recorded")
		}
		if int64(len(ref.Name)) > min(im.hdrBytes-headerLen, maxBackingName) {
			return driver.OptionErrorf("backing file name too long for the QED header (%d bytes)", len(ref.Name))
		}
		h.features |= featBacking
		if ref.Format == "raw" {
			h.features |= featRawNoProbe
		}
		h.backOff, h.backSize, h.backing = headerLen, uint32(len(ref.Name)), ref.Name
		if _, err := im.f.WriteAt([]byte(ref.Name), headerLen); err != nil {
			return driver.WithFile(err, "write header", im.name)
		}
		// The name reaches the disk before the header that points at it.
		if err := im.f.Sync(); err != nil {
			return driver.WithFile(err, "sync", im.name)
		}
	}
	im.hdr = h
	return im.writeHeader()
}

// MakeEmpty makes every cluster unallocated (qemu's make-empty after a
// commit): the L1 table is cleared and synced, then the file is cut back
// to the header and the L1 table when nothing else precedes them.
func (im *image) MakeEmpty() error {
	if err := im.writable(-1); err != nil {
		return err
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	im.meta.Lock()
	defer im.meta.Unlock()
	if _, err := im.f.WriteAt(make([]byte, im.tableBytes), int64(im.hdr.l1Offset)); err != nil {
		return driver.WithFile(err, "write L1 table", im.name)
	}
	if err := im.f.Sync(); err != nil {
		return driver.WithFile(err, "sync", im.name)
	}
	for i := range im.l1 {
		atomic.StoreUint64(&im.l1[i], 0)
	}
	clear(im.l2)
	im.l2Bytes = 0
	im.holes, im.pending = nil, nil
	end := max(im.hdrBytes, int64(im.hdr.l1Offset)+im.tableBytes)
	if end < im.fileEnd {
		if err := im.f.Truncate(end); err != nil {
			return driver.WithFile(err, "truncate", im.name)
		}
		im.fileEnd = end
	}
	return nil
}
