package vhdx

import "sort"

// freeSpan is space inside the file that no committed metadata points at:
// holes left by discards, shrinks, compaction and moved BATs. Blocks are
// allocated from it before the file grows.
type freeSpan struct {
	off, end int64
	// zero: the span is known to read zeros (it was punched this
	// session). Spans found on open may hold stale data (a crash between
	// a commit and its punch) and are punched when they are used.
	zero bool
}

// usedSpansLocked lists every span of the file something refers to: the
// header section, the log, every region (unknown ones too) and the space
// of every BAT entry with a file offset, whatever its state (unusable
// entries too: their space is never handed out again).
func (im *image) usedSpansLocked() []span {
	used := []span{{0, headerArea}}
	if im.logLen > 0 {
		used = append(used, span{im.logOff, im.logOff + im.logLen})
	}
	used = append(used, span{im.batOff, im.batOff + im.batLen}, span{im.metaOff, im.metaOff + im.metaLen})
	used = append(used, im.otherRegions...)
	for i, e := range im.bat {
		off := int64(e >> 20 << 20)
		if off == 0 {
			continue
		}
		size := im.p.blockSize
		if im.isBitmapIndex(int64(i)) {
			size = mib
		}
		used = append(used, span{off, off + size})
	}
	sort.Slice(used, func(a, b int) bool { return used[a].off < used[b].off })
	return used
}

func (im *image) isBitmapIndex(i int64) bool { return (i+1)%(im.chunkRatio+1) == 0 }

// rebuildFreeLocked finds the free space between the header section and
// the end of the file (1 MiB aligned, as blocks must be).
func (im *image) rebuildFreeLocked() {
	im.free = nil
	pos := int64(headerArea)
	for _, u := range im.usedSpansLocked() {
		if u.off > pos {
			im.addFreeLocked(span{roundUp(pos, mib), u.off / mib * mib}, false)
		}
		pos = max(pos, u.end)
	}
	if pos < im.fileEnd {
		im.addFreeLocked(span{roundUp(pos, mib), im.fileEnd}, false)
	}
}

// addFreeLocked returns s to the free list, merging neighbours (a merged
// span is zero only when both parts are).
func (im *image) addFreeLocked(s span, zero bool) {
	if s.end <= s.off {
		return
	}
	i := sort.Search(len(im.free), func(i int) bool { return im.free[i].off >= s.off })
	im.free = append(im.free, freeSpan{})
	copy(im.free[i+1:], im.free[i:])
	im.free[i] = freeSpan{s.off, s.end, zero}
	if i+1 < len(im.free) && im.free[i].end == im.free[i+1].off && im.free[i].zero == im.free[i+1].zero {
		im.free[i].end = im.free[i+1].end
		im.free = append(im.free[:i+1], im.free[i+2:]...)
	}
	if i > 0 && im.free[i-1].end == im.free[i].off && im.free[i-1].zero == im.free[i].zero {
		im.free[i-1].end = im.free[i].end
		im.free = append(im.free[:i], im.free[i+1:]...)
	}
}

// takeFreeLocked removes the first free span of at least n bytes below
// limit (its start plus n at most limit) and returns its offset, making
// the space read zeros first (zero) when it may hold stale data; -1 when
// there is none.
func (im *image) takeFreeLocked(n, limit int64, zero bool) (int64, error) {
	for i, s := range im.free {
		if s.off+n > limit {
			break
		}
		if s.end-s.off < n {
			continue
		}
		off := s.off
		if zero && !s.zero {
			if err := im.zeroSpace(off, n); err != nil {
				return -1, err
			}
		}
		if s.end-s.off == n {
			im.free = append(im.free[:i], im.free[i+1:]...)
		} else {
			im.free[i].off += n
		}
		return off, nil
	}
	return -1, nil
}

// zeroSpace makes free space read zeros: new blocks are assumed to (a
// partial write leaves the rest of the block as it reads, and a new
// sector bitmap block logs only its changed pages).
func (im *image) zeroSpace(off, n int64) error {
	if err := im.f.PunchHole(off, n); err == nil {
		return nil
	}
	return writeZeros(im.f, off, n)
}

// allocLocked reserves n bytes (a multiple of 1 MiB) for a block: the
// first free span that fits, else the end of the file. The space reads
// zeros. Reusing freed space is crash safe: the committed metadata no
// longer points at it, so writing there changes nothing a replay or a
// reader sees until the new BAT entry is committed.
func (im *image) allocLocked(n int64) (int64, error) {
	off, err := im.takeFreeLocked(n, im.fileEnd, true)
	if err != nil || off >= 0 {
		return off, err
	}
	off = im.fileEnd
	im.fileEnd += n
	return off, nil
}

// unallocLocked gives back n bytes that allocLocked handed out: the file
// end moves back when they are its last bytes and still read zeros
// (clean), else they are free space again.
func (im *image) unallocLocked(off, n int64, clean bool) {
	if clean && off+n == im.fileEnd {
		im.fileEnd = off
		return
	}
	im.addFreeLocked(span{off, off + n}, clean)
}
