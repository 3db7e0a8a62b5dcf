package qcow2

import (
	"context"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/prealloc"
)

// Resize changes the virtual size. Growing extends the L1 table when
// needed (moving it, like qemu) and makes the image's own data left past
// the old end (inside its last cluster) read zeros; the grown range is
// otherwise unallocated, reading zeros or, in an image with a backing
// file, what the chain shows there (the container zeroes a larger backing
// file's part itself). Shrinking frees every cluster past the new end.
// The preallocation mode applies to the grown range.
func (im *image) Resize(ctx context.Context, size int64, mode string) error {
	if err := im.beginOp(); err != nil {
		return err
	}
	// opMu stays held throughout; mu is released while zeroing and
	// preallocating the grown range, which take it themselves.
	defer im.opMu.Unlock()
	if err := im.cwErrLocked(); err != nil {
		im.mu.Unlock()
		return err
	}
	size = (size + 511) &^ 511
	old := im.size
	if err := im.resizeChecks(size, mode); err != nil {
		im.mu.Unlock()
		return err
	}
	var err error
	if size < old {
		err = im.shrinkDisk(ctx, size)
	} else if size > old {
		err = im.growDisk(ctx, size)
	}
	im.mu.Unlock()
	if err != nil || size <= old {
		return err
	}
	// Data left past the old end inside its last cluster must not show
	// in the grown range.
	if err := im.zeroGrown(old, min(size, (old+im.cs-1)&^(im.cs-1))); err != nil {
		return err
	}
	if prealloc.Active(mode) {
		if err := im.preallocate(ctx, old, size, mode); err != nil {
			return err
		}
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.flushLocked(false)
}

func (im *image) resizeChecks(size int64, mode string) error {
	if err := prealloc.Check("", mode, prealloc.Metadata, prealloc.Falloc, prealloc.Full); err != nil {
		return err
	}
	if im.crypt != nil && prealloc.Active(mode) {
		return driver.Unsupportedf(im.name, "preallocation=%s is not supported with encryption (preallocated clusters would not read zeros)", mode)
	}
	if im.hdr.bitmaps != nil && len(im.bitmaps) > 0 {
		return driver.Unsupportedf(im.name, "cannot resize an image with persistent bitmaps")
	}
	if len(im.snaps) > 0 && im.hdr.version < 3 {
		return driver.Unsupportedf(im.name, "cannot resize a version 2 image with internal snapshots")
	}
	if size < im.size && prealloc.Active(mode) {
		return driver.OptionErrorf("preallocation applies only when growing")
	}
	need := (size + im.l2Span() - 1) / im.l2Span()
	if need*8 > maxL1Bytes {
		return driver.OptionErrorf("size %d is too large for %d-byte clusters", size, im.cs)
	}
	return nil
}

// zeroGrown makes [old, end), the part of the old last cluster that
// growing from size old brings into the disk, read zeros, except an
// unallocated unit at old in an image with a backing file: its bytes are
// not the image's (the chain shows there, and the container zeroes what a
// backing file larger than old would show). Callers hold opMu exclusively.
func (im *image) zeroGrown(old, end int64) error {
	if end <= old {
		return nil
	}
	if im.backed() && old&(im.scSize-1) != 0 {
		im.mu.Lock()
		_, ue, unalloc, err := im.unitAt(old)
		im.mu.Unlock()
		if err != nil {
			return err
		}
		if unalloc {
			old = min(ue, end)
		}
	}
	if end <= old {
		return nil
	}
	return im.zeroRange(old, end-old)
}

// zeroRange makes [off, off+n) read zeros through the zero path, while the
// caller holds opMu exclusively. Partial units needing the backing chain
// must not occur (see zeroGrown).
func (im *image) zeroRange(off, n int64) error {
	if im.hdr.version < 3 && im.backed() {
		return im.writeZeroBytes(off, n)
	}
	end := off + n
	v2Base := im.hdr.version < 3
	span := im.l2Span()
	for pos := off; pos < end; {
		l1i := pos / span
		cend := min(end, (l1i+1)*span)
		lo := (pos + im.scSize - 1) &^ (im.scSize - 1)
		hi := cend
		if cend == im.sizeShared() {
			hi = (cend + im.scSize - 1) &^ (im.scSize - 1)
		} else {
			hi = cend &^ (im.scSize - 1)
		}
		if lo > pos {
			if err := im.writeZeroBytes(pos, min(lo, cend)-pos); err != nil {
				return err
			}
		}
		if lo < hi {
			rest, err := im.zeroUnits(l1i, lo, hi, true, false, v2Base)
			if err != nil {
				return err
			}
			for _, r := range rest {
				if err := im.writeZeroBytes(r.lo, r.hi-r.lo); err != nil {
					return err
				}
			}
		}
		if t := max(lo, min(hi, cend)); t < cend {
			if err := im.writeZeroBytes(t, cend-t); err != nil {
				return err
			}
		}
		pos = cend
	}
	return nil
}

// growDisk extends the disk to size. Callers hold mu.
func (im *image) growDisk(ctx context.Context, size int64) error {
	need := (size + im.l2Span() - 1) / im.l2Span()
	if need > int64(len(im.l1)) {
		// Everything else durable first, so the L1 move stands alone.
		if err := im.flushLocked(false); err != nil {
			return err
		}
		oldOff, oldN := int64(im.hdr.l1Offset), int64(len(im.l1))
		nclust := (need*8 + im.cs - 1) / im.cs
		s, err := im.allocContig(nclust)
		if err != nil {
			return err
		}
		l1 := make([]uint64, need)
		copy(l1, im.l1)
		im.l1 = l1
		im.hdr.l1Offset = uint64(s << im.cbits)
		im.hdr.l1Size = uint32(need)
		for k := int64(0); k < nclust; k++ {
			im.l1Dirty[k] = true
		}
		if oldN > 0 {
			if err := im.freeClusters(oldOff>>im.cbits, (oldN*8+im.cs-1)/im.cs); err != nil {
				return err
			}
		}
		im.rebuildFixed()
	}
	im.size = size
	// The data file grows with the disk.
	if im.extData {
		if sz, err := im.df.Size(); err == nil && sz < size {
			if err := im.df.Truncate(size); err != nil {
				return err
			}
		}
	}
	// L1 (at its new place, if moved), then the header, then the old L1
	// freed: see flushLocked.
	return im.flushLocked(false)
}

// shrinkDisk frees every cluster past size. Callers hold mu.
func (im *image) shrinkDisk(ctx context.Context, size int64) error {
	if err := im.flushLocked(false); err != nil {
		return err
	}
	span := im.l2Span()
	firstGone := (size + im.cs - 1) &^ (im.cs - 1) // first whole cluster past the end
	for l1i := firstGone / span; l1i < int64(len(im.l1)); l1i++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		l2off, err := im.l2Offset(l1i)
		if err != nil {
			return err
		}
		if l2off == 0 {
			continue
		}
		from := max(firstGone, l1i*span)
		whole := from == l1i*span
		t, err := im.l2ForWrite(l1i)
		if err != nil {
			return err
		}
		for v := from; v < (l1i+1)*span; v += im.cs {
			ci := (v >> im.cbits) & (im.l2n - 1)
			e, bm := im.entry(t.buf, ci)
			if e == 0 && bm == 0 {
				continue
			}
			if err := im.releaseEntry(e); err != nil {
				return err
			}
			im.setEntry(t.buf, ci, 0, 0)
			t.dirty = true
		}
		if whole {
			// The whole table is past the end: drop it.
			off := t.off
			im.setL1(l1i, 0)
			delete(im.metaSet, off>>im.cbits)
			im.l2c.remove(off)
			if err := im.addRef(off>>im.cbits, -1, 0); err != nil {
				return err
			}
		}
		im.shrinkCaches()
	}
	im.size = size
	if im.extData {
		if err := im.df.Truncate(size); err != nil {
			return err
		}
	}
	return im.flushLocked(false)
}

// releaseEntry drops the references an L2 entry holds. Callers hold mu.
func (im *image) releaseEntry(e uint64) error {
	if im.extData {
		return nil
	}
	switch {
	case e&oflagCompressed != 0:
		return im.releaseCompressed(e &^ (oflagCompressed | oflagCopied))
	case e&offMask != 0:
		return im.addRef(int64(e&offMask)>>im.cbits, -1, 0)
	}
	return nil
}
