package qcow2

import (
	"github.com/vdisk/vdisk/driver"
)

// WriteZeroes makes [off, off+n) read as zeros. Whole clusters (whole
// subclusters with extended L2) become zero clusters on version 3 images,
// or unallocated clusters on a version 2 image without a backing file;
// unmap releases their host clusters. The remaining pieces are written as
// zero bytes, composed with the rest of their unit; when such a unit is
// unallocated in an image with a backing file nothing is changed and a
// driver.FillError asks for the range to be written whole with the
// chain's bytes around it (on a version 2 image with a backing file every
// zero is written as data).
func (im *image) WriteZeroes(off, n int64, unmap bool) error {
	return im.zeroOrDiscard(off, n, unmap, false)
}

// Discard deallocates the whole clusters (subclusters) of [off, off+n):
// they become unallocated, reading from the backing file again, or zeros
// without one. Partial clusters are left alone.
func (im *image) Discard(off, n int64) error {
	return im.zeroOrDiscard(off, n, true, true)
}

func (im *image) zeroOrDiscard(off, n int64, unmap, discard bool) error {
	if err := im.beginWrite(off); err != nil {
		return err
	}
	im.opMu.RLock()
	defer im.opMu.RUnlock()
	im.drainCompressor()
	if err := im.cwErr(); err != nil {
		return err
	}
	size := im.Size()
	if err := driver.CheckRange(im.name, off, n, size); err != nil {
		return err
	}
	end := off + n
	if !discard {
		// Partial units are written as bytes: those needing the backing
		// chain make the container write the range itself (FillError).
		if start, stop, err := im.fillRange(off, end, size); err != nil {
			return err
		} else if start != off || stop != end {
			return driver.NeedFill(im.name, start, stop)
		}
	}
	// A range reaching the end of the disk covers the last partial cluster.
	unitEnd := func(x int64) int64 {
		if x == size {
			return (x + im.scSize - 1) &^ (im.scSize - 1)
		}
		return x
	}
	hasZeroFlag := im.hdr.version >= 3
	v2Base := !hasZeroFlag && !im.backed()
	if !discard && !hasZeroFlag && !v2Base {
		// Version 2 over a backing file: zeros must be written.
		return im.writeZeroBytes(off, n)
	}
	span := im.l2Span()
	for pos := off; pos < end; {
		l1i := pos / span
		cend := min(end, (l1i+1)*span)
		// Unit-aligned part.
		lo := (pos + im.scSize - 1) &^ (im.scSize - 1)
		hi := unitEnd(cend) &^ (im.scSize - 1)
		if cend < end {
			hi = cend
		}
		if lo >= hi {
			if !discard {
				if err := im.writeZeroBytes(pos, cend-pos); err != nil {
					return err
				}
			}
			pos = cend
			continue
		}
		if !discard && lo > pos {
			if err := im.writeZeroBytes(pos, lo-pos); err != nil {
				return err
			}
		}
		rest, err := im.zeroUnits(l1i, lo, hi, unmap, discard, v2Base)
		if err != nil {
			return err
		}
		if !discard {
			// Units that could not be zeroed by metadata (compressed
			// clusters with partial subcluster ranges).
			for _, r := range rest {
				if err := im.writeZeroBytes(r.lo, r.hi-r.lo); err != nil {
					return err
				}
			}
			if t := min(hi, cend); t < cend {
				if err := im.writeZeroBytes(t, cend-t); err != nil {
					return err
				}
			}
		}
		pos = cend
	}
	return nil
}

// writeZeroBytes writes zeros through the normal write path.
func (im *image) writeZeroBytes(off, n int64) error {
	for n > 0 {
		span := im.l2Span()
		c := min(n, driver.ZeroChunk, span-off%span)
		if err := im.writeChunk(driver.Zeros(c), off); err != nil {
			return err
		}
		off += c
		n -= c
	}
	return nil
}

// zeroUnits zeroes (or discards) the unit-aligned range [lo, hi) inside the
// L2 table l1i by changing L2 entries. It returns the ranges it could not
// handle that way.
func (im *image) zeroUnits(l1i, lo, hi int64, unmap, discard, v2Base bool) ([]span, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	defer im.shrinkCaches()
	l2off, err := im.l2Offset(l1i)
	if err != nil {
		return nil, err
	}
	noParent := !im.backed()
	if l2off == 0 && (discard || noParent) {
		return nil, nil // unallocated already reads as wanted
	}
	t, err := im.l2ForWrite(l1i)
	if err != nil {
		return nil, err
	}
	var rest []span
	for v := lo &^ (im.cs - 1); v < hi; v += im.cs {
		ci := (v >> im.cbits) & (im.l2n - 1)
		a, b := max(lo, v)-v, min(hi, v+im.cs)-v
		e, bm := im.entry(t.buf, ci)
		full := a == 0 && b >= im.cs || v+b >= im.size && a == 0
		if !full && !im.ext {
			if !discard {
				rest = append(rest, span{v + a, v + b})
			}
			continue
		}
		if !full && e&oflagCompressed != 0 {
			if !discard {
				rest = append(rest, span{v + a, v + b})
			}
			continue
		}
		o := int64(e & offMask)
		hasHost := e&oflagCompressed == 0 && (o != 0 || (im.extData && e&oflagCopied != 0))
		if hasHost && o%im.cs != 0 {
			return nil, driver.Corruptf(im.name, v, "L2 entry %#x for guest offset %d is not cluster aligned", e, v)
		}
		if !full {
			// Extended L2, part of the subclusters.
			var mask uint64
			for s := a >> im.scBits; s < b>>im.scBits; s++ {
				mask |= 1 << s
			}
			nbm := bm &^ (mask | mask<<32)
			if !discard {
				nbm |= mask << 32
			}
			if im.rawData && hasHost {
				if err := im.zeroDataFile(v+a, b-a, unmap); err != nil {
					return nil, err
				}
			}
			if nbm != bm {
				im.setEntry(t.buf, ci, e, nbm)
				t.dirty = true
			}
			continue
		}
		// A whole cluster.
		var ne, nbm uint64
		keep := !discard && !unmap && !v2Base && hasHost && (e&oflagCopied != 0 || im.extData)
		switch {
		case keep && im.ext:
			ne, nbm = e, allZeroBits
		case keep:
			ne = uint64(o) | oflagCopied | oflagZero
		case discard || v2Base:
			ne, nbm = 0, 0
		case im.ext:
			ne, nbm = 0, allZeroBits
		default:
			ne = oflagZero
		}
		if !discard && noParent && !keep && e == 0 && bm&allAllocBits == 0 {
			// Unallocated in a base image: reads zeros already; keep any
			// zero bits as they are.
			continue
		}
		if ne == e && nbm == bm {
			continue
		}
		if im.rawData && hasHost {
			if err := im.zeroDataFile(v, im.cs, unmap); err != nil {
				return nil, err
			}
		}
		im.setEntry(t.buf, ci, ne, nbm)
		t.dirty = true
		if !keep && !im.extData {
			switch {
			case e&oflagCompressed != 0:
				if err := im.releaseCompressed(e &^ (oflagCompressed | oflagCopied)); err != nil {
					return nil, err
				}
			case hasHost:
				if err := im.addRef(o>>im.cbits, -1, 0); err != nil {
					return nil, err
				}
			}
		}
	}
	return rest, nil
}

// zeroDataFile zeroes a range of a raw external data file so that it stays
// a consistent raw image.
func (im *image) zeroDataFile(off, n int64, unmap bool) error {
	if !unmap {
		if z, ok := im.df.(driver.ZeroRanger); ok {
			if err := z.ZeroRange(off, n); err == nil {
				im.dataDirty.Store(true)
				return nil
			}
		}
	}
	if err := im.df.PunchHole(off, n); err != nil {
		return err
	}
	im.dataDirty.Store(true)
	return nil
}

// MakeEmpty makes every cluster of the active image unallocated, so that
// reads fall through to the backing file again and the host clusters are
// freed (qemu's make-empty after a commit). Internal snapshots keep their
// clusters.
func (im *image) MakeEmpty() error {
	size := im.Size()
	if size == 0 {
		return nil
	}
	return im.Discard(0, size)
}
