package vdi

import (
	"github.com/vdisk/vdisk/driver"
)

// writable fails for read-only images and images that need repair.
func (im *image) writable(off int64) error {
	if im.ro {
		return driver.Errorf(driver.ErrReadOnly, im.name, off, "image opened read-only")
	}
	im.meta.Lock()
	broken := im.broken
	im.meta.Unlock()
	if broken != "" {
		return driver.Corruptf(im.name, -1, "the image must be repaired before it is written: %s (run check -r all)", broken)
	}
	return nil
}

// touch gives the image a new modification UUID on the first change of an
// open-for-write session, as VirtualBox does, so that differencing images
// made on top of it can tell it changed. The header reaches the file with
// the next header write (at the latest on Flush).
func (im *image) touch() {
	if im.modDone.Load() {
		return
	}
	im.meta.Lock()
	if !im.modDone.Load() {
		im.hdr.modUUID = newUUID()
		im.hdrDirty = true
		im.modDone.Store(true)
	}
	im.meta.Unlock()
}

// WriteAt writes p at off. Allocated blocks are written in place (blocks
// contiguous in the file with one write); a write into a free or zero block
// allocates a new block at the end of the data area, filling the rest of
// the block with zeros, then points the block map entry at it.
//
// In a differencing image, a write covering only part of a free block
// writes nothing and returns a *driver.FillError asking for the whole
// partially covered free blocks at its ends (and everything between): the
// rest of such a block must keep reading what the layers below show, which
// the container reads and writes back with the data (copy-on-write). A
// base image's free blocks read zeros, and zero blocks are the image's
// own: both are filled with zeros here.
func (im *image) WriteAt(p []byte, off int64) (int, error) {
	if err := im.writable(off); err != nil {
		return 0, err
	}
	im.mu.RLock()
	defer im.mu.RUnlock()
	if err := driver.CheckRange(im.name, off, int64(len(p)), im.Size()); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	// The type is read once: the check and the write agree on it.
	diff := im.isDiff()
	if err := im.needFill(off, off+int64(len(p)), diff); err != nil {
		return 0, err
	}
	im.touch()
	if err := im.write(p, off, diff); err != nil {
		return 0, err
	}
	return len(p), nil
}

// needFill returns the *driver.FillError for a write of [off, end) (off <
// end) into a differencing image (diff: isDiff's answer) whose first or
// last block is free and only partly covered, or nil when the write can go
// ahead. The caller holds mu; the container's range lock keeps the two
// entries from changing until the write is done.
func (im *image) needFill(off, end int64, diff bool) error {
	if !diff {
		return nil
	}
	start, stop := off, end
	if hb := off / im.bs; im.partialFree(hb, off, end) {
		start = hb * im.bs
	}
	if tb := (end - 1) / im.bs; im.partialFree(tb, off, end) {
		stop = tb*im.bs + im.blockLen(tb)
	}
	if start == off && stop == end {
		return nil
	}
	return driver.NeedFill(im.name, start, stop)
}

// partialFree reports whether block b is free and [off, end) covers only
// part of it.
func (im *image) partialFree(b, off, end int64) bool {
	if im.entry(b) != entFree {
		return false
	}
	lo := b * im.bs
	return off > lo || end < lo+im.blockLen(b)
}

// write does WriteAt's work; the caller holds mu (shared or exclusive) and
// has checked the request with needFill (diff: the image type it used).
func (im *image) write(p []byte, off int64, diff bool) error {
	freeZero := !diff
	for len(p) > 0 {
		b, in := off/im.bs, off%im.bs
		e := im.entry(b)
		var n int64
		if allocated(e) {
			n = min(int64(len(p)), im.bs-in)
			fo := im.dataOff(e) + in
			for n < int64(len(p)) {
				ne := im.entry((off + n) / im.bs)
				if !allocated(ne) || im.dataOff(ne) != fo+n {
					break
				}
				n += min(int64(len(p))-n, im.bs)
			}
			if _, err := im.f.WriteAt(p[:n], fo); err != nil {
				return driver.WithFile(err, "write", im.name)
			}
		} else {
			var err error
			if n, err = im.writeNew(p, off, freeZero); err != nil {
				return err
			}
		}
		p, off = p[n:], off+n
	}
	return nil
}

// writeNew writes a prefix of p at off, where off's block is not
// allocated, and returns the length written. It allocates the run of
// following unallocated blocks p covers in one go.
func (im *image) writeNew(p []byte, off int64, freeZero bool) (int64, error) {
	b, in := off/im.bs, off%im.bs
	bl := im.blockLen(b)
	n := min(int64(len(p)), bl-in)
	e := im.entry(b)
	if driver.IsZero(p[:n]) {
		if e == entZero || (e == entFree && freeZero) {
			return n, nil // reads zeros already
		}
		if in == 0 && n == bl {
			return n, im.setEntry(b, entZero)
		}
	}
	k := int64(1)
	for n < int64(len(p)) {
		nb := b + k
		if allocated(im.entry(nb)) {
			break
		}
		m := min(int64(len(p))-n, im.blockLen(nb))
		if driver.IsZero(p[n : n+m]) {
			break // the next round may need no allocation for it
		}
		n += m
		k++
	}
	return n, im.allocRun(b, k, in, p[:n], freeZero)
}

// allocRun allocates k consecutive data blocks for blocks b..b+k-1 and
// writes data (starting at byte in of block b) into them: the data first,
// then the map entries with the header's count (one write, see mapio.go).
// Allocations run one at a time (alloc), so no entry ever points past a
// data block index not yet in use.
func (im *image) allocRun(b, k, in int64, data []byte, freeZero bool) error {
	im.alloc.Lock()
	defer im.alloc.Unlock()
	first, err := im.reserve(k)
	if err != nil {
		return err
	}
	var bufs [][]byte
	defer func() {
		for _, buf := range bufs {
			im.bufs.Put(buf)
		}
	}()
	// Full blocks without extra data are written straight from data; runs
	// of them are contiguous in the file and in data.
	pendStart, pendEnd, pendOff := int64(0), int64(0), int64(-1)
	flush := func() error {
		if pendOff < 0 {
			return nil
		}
		_, err := im.f.WriteAt(data[pendStart:pendEnd], pendOff)
		pendOff = -1
		return err
	}
	pos := int64(0)
	for j := int64(0); j < k && err == nil; j++ {
		blk := b + j
		bl := im.blockLen(blk)
		lo := int64(0)
		if j == 0 {
			lo = in
		}
		m := min(int64(len(data))-pos, bl-lo)
		slot := first + uint32(j)
		if lo == 0 && m == im.bs && im.extra == 0 {
			fo := im.slotOff(slot)
			if pendOff >= 0 && pendOff+(pendEnd-pendStart) == fo && pendEnd == pos {
				pendEnd = pos + m
			} else {
				if err = flush(); err != nil {
					break
				}
				pendStart, pendEnd, pendOff = pos, pos+m, fo
			}
		} else {
			if err = flush(); err != nil {
				break
			}
			buf := im.bufs.Get()
			bufs = append(bufs, buf)
			if err = im.fillBlock(buf, blk, lo == 0 && m == bl, freeZero); err != nil {
				break
			}
			copy(buf[im.extra+lo:], data[pos:pos+m])
			_, err = im.f.WriteAt(buf, im.slotOff(slot))
		}
		pos += m
	}
	if err == nil {
		err = flush()
	}
	if err != nil {
		im.release(first, k)
		return driver.WithFile(err, "write", im.name)
	}
	return im.commit(b, first, k)
}

// fillBlock prepares the file image of block b before new data is copied
// in: zeros. A partly written free block of a differencing image would
// need the parent's content, which the driver never reads: needFill turned
// such writes away, so meeting one here is an internal error.
func (im *image) fillBlock(buf []byte, b int64, full, freeZero bool) error {
	clear(buf)
	if full || freeZero || im.entry(b) != entFree {
		return nil
	}
	return driver.Corruptf(im.name, b*im.bs, "internal error: partial write into free block %d of a differencing image without a fill", b)
}

// reserve takes k consecutive data block indices.
func (im *image) reserve(k int64) (uint32, error) {
	im.meta.Lock()
	defer im.meta.Unlock()
	if k == 1 && len(im.spare) > 0 {
		s := im.spare[len(im.spare)-1]
		im.spare = im.spare[:len(im.spare)-1]
		return s, nil
	}
	if int64(im.cursor)+k >= entZero || im.slotOff(im.cursor)+k*im.tbs < 0 {
		return 0, driver.Errorf(driver.ErrUnsupported, im.name, -1, "no data block index left to allocate")
	}
	s := im.cursor
	im.cursor += uint32(k)
	return s, nil
}

// release gives back indices whose data write failed; they were never
// referenced, so they can be reused as they are.
func (im *image) release(first uint32, k int64) {
	im.meta.Lock()
	defer im.meta.Unlock()
	if im.cursor == first+uint32(k) {
		im.cursor = first
		return
	}
	for j := range uint32(k) {
		im.spare = append(im.spare, first+j)
	}
}

// commit points blocks b..b+k-1 at data block indices first..first+k-1,
// with the header's count in the same write.
func (im *image) commit(b int64, first uint32, k int64) error {
	vals := make([]uint32, k)
	for j := range vals {
		vals[j] = first + uint32(j)
	}
	im.meta.Lock()
	defer im.meta.Unlock()
	if err := im.setEntriesLocked(b, vals); err != nil {
		for j := range uint32(k) {
			im.spare = append(im.spare, first+j)
		}
		return err
	}
	return nil
}

// setEntry writes block b's map entry with the header (one write) and
// keeps the counts. A data block index it stops referencing becomes a
// hole for pack to fill.
func (im *image) setEntry(b int64, v uint32) error {
	im.meta.Lock()
	defer im.meta.Unlock()
	return im.setEntriesLocked(b, []uint32{v})
}

// holes lists the data block indices below the highest one in use that no
// entry references (what an interrupted pack leaves), highest first, so
// that allocations fill the lowest first.
func (im *image) holes(sc mapScan) []uint32 {
	if sc.maxIdx < 0 || int64(sc.count) > sc.maxIdx || sc.maxIdx >= int64(len(im.bmap)) {
		return nil
	}
	used := make([]uint64, sc.maxIdx/64+1)
	for b := range im.bmap {
		if e := im.entry(int64(b)); allocated(e) && int64(e) <= sc.maxIdx {
			used[e/64] |= 1 << (e % 64)
		}
	}
	var hs []uint32
	for i := sc.maxIdx - 1; i >= 0; i-- {
		if used[i/64]&(1<<(i%64)) == 0 {
			hs = append(hs, uint32(i))
		}
	}
	return hs
}
