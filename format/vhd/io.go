package vhd

import (
	"github.com/vdisk/vdisk/driver"
)

// checkAccess checks [off, off+n) against the disk's size, which it
// returns.
func (im *image) checkAccess(off, n int64) (int64, error) {
	im.mu.Lock()
	size := im.size
	im.mu.Unlock()
	return size, driver.CheckRange(im.name, off, n, size)
}

func (im *image) readOnlyErr(off int64) error {
	return driver.Errorf(driver.ErrReadOnly, im.name, off, "image opened read-only")
}

func (im *image) badErr(b int64) error {
	return im.corrupt(im.batOff+4*b, "block %d's table entry %#x points outside the data area or into another block", b, im.bat[b])
}

// blockView is what one block holds for a range of its sectors, copied
// under the lock.
type blockView struct {
	alloc bool
	data  int64 // file offset of the block's data
	full  bool
	bits  []byte // bits of sectors base.., when !full
	base  int64
}

// viewLocked describes block b for sectors [s0, s1).
func (im *image) viewLocked(b, s0, s1 int64) (blockView, error) {
	if im.isBad(b) {
		return blockView{}, im.badErr(b)
	}
	e := im.bat[b]
	if e == batUnused {
		return blockView{}, nil
	}
	v := blockView{alloc: true, data: int64(e)*sectorSize + im.bmSize}
	full, bm, err := im.bitmapLocked(b)
	if err != nil {
		return v, err
	}
	if full {
		v.full = true
		return v, nil
	}
	v.base = s0 &^ 7
	v.bits = append([]byte(nil), bm.bits[s0/8:(s1+7)/8]...)
	return v, nil
}

func (im *image) view(b, s0, s1 int64) (blockView, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.viewLocked(b, s0, s1)
}

func (v *blockView) set(s int64) bool {
	if v.full {
		return true
	}
	i := s - v.base
	return v.bits[i/8]&(0x80>>(i%8)) != 0
}

// run returns whether sector s is set and how many sectors from s up to
// limit share that state.
func (v *blockView) run(s, limit int64) (bool, int64) {
	st := v.set(s)
	if v.full {
		return true, limit - s
	}
	e := s + 1
	for e < limit {
		i := e - v.base
		if i%8 == 0 && e+8 <= limit {
			c := v.bits[i/8]
			if st && c == 0xFF || !st && c == 0 {
				e += 8
				continue
			}
		}
		if v.set(e) != st {
			break
		}
		e++
	}
	return st, e - s
}

// sectorSet reports whether the image holds disk sector s (its block is
// allocated and the sector's bitmap bit set).
func (im *image) sectorSet(s int64) (bool, error) {
	b, i := s/im.spb, s%im.spb
	v, err := im.view(b, i, i+1)
	if err != nil || !v.alloc {
		return false, err
	}
	return v.set(i), nil
}

// needFill is the copy-on-write rule of a differencing image: a write of
// [off, off+n) that covers only part of its first or last sector, where
// that sector is not held by this image, needs the sector's other bytes
// from the chain below. It returns the *driver.FillError asking for the
// request rounded out to those sectors (a bound whose sector is held, or
// that is sector-aligned, stays at the request's edge), or nil. Whole
// sectors never need a fill: the sector bitmaps record them one by one.
// A dynamic or fixed image records no parent and never asks.
func (im *image) needFill(off, n int64) error {
	if im.kind != diskDiff || n <= 0 {
		return nil
	}
	end := off + n
	start, stop := off, end
	if off%sectorSize != 0 {
		set, err := im.sectorSet(off / sectorSize)
		if err != nil {
			return err
		}
		if !set {
			start = off - off%sectorSize
		}
	}
	if end%sectorSize != 0 {
		set, err := im.sectorSet(end / sectorSize)
		if err != nil {
			return err
		}
		if !set {
			stop = roundUp(end, sectorSize)
		}
	}
	if start != off || stop != end {
		return driver.NeedFill(im.name, start, stop)
	}
	return nil
}

func (im *image) ReadAt(p []byte, off int64) (int, error) {
	if _, err := im.checkAccess(off, int64(len(p))); err != nil {
		return 0, err
	}
	if im.kind == diskFixed {
		if err := driver.ReadFullAt(im.f, p, off); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		b, in := pos/im.bs, pos%im.bs
		c := min(int64(len(p)-done), im.bs-in)
		chunk := p[done : done+int(c)]
		if err := im.readBlock(chunk, b, in); err != nil {
			return done, err
		}
		done += int(c)
	}
	return done, nil
}

func (im *image) readBlock(p []byte, b, in int64) error {
	end := in + int64(len(p))
	s0, s1 := in/sectorSize, (end+sectorSize-1)/sectorSize
	v, err := im.view(b, s0, s1)
	if err != nil {
		return err
	}
	if !v.alloc {
		clear(p) // not held here: zeros (the container reads the parent)
		return nil
	}
	if v.full {
		return driver.ReadFullAt(im.f, p, v.data+in)
	}
	for x := in; x < end; {
		s := x / sectorSize
		set, ns := v.run(s, s1)
		re := min((s+ns)*sectorSize, end)
		sub := p[x-in : re-in]
		if set {
			if err := driver.ReadFullAt(im.f, sub, v.data+x); err != nil {
				return err
			}
		} else {
			clear(sub)
		}
		x = re
	}
	return nil
}

func (im *image) Status(off, n int64) (driver.Extent, error) {
	size, err := im.checkAccess(off, n)
	if err != nil {
		return driver.Extent{}, err
	}
	if im.kind == diskFixed {
		return im.fixedStatus(off, n, size)
	}
	b, in := off/im.bs, off%im.bs
	c := min(n, im.bs-in)
	s0, s1 := in/sectorSize, (in+c+sectorSize-1)/sectorSize
	im.mu.Lock()
	v, err := im.viewLocked(b, s0, s1)
	if err == nil && !v.alloc {
		// Merge following unallocated blocks.
		for nb := b + 1; c < n && nb < int64(len(im.bat)) && im.bat[nb] == batUnused && !im.isBad(nb); nb++ {
			c = min(n, c+im.bs)
		}
	}
	im.mu.Unlock()
	if err != nil {
		return driver.Extent{}, err
	}
	if !v.alloc {
		return driver.Extent{State: driver.Unallocated, Length: c, Offset: -1}, nil
	}
	set, ns := v.run(s0, s1)
	l := min((s0+ns)*sectorSize-in, c)
	if set {
		return driver.Extent{State: driver.Data, Length: l, Offset: v.data + in}, nil
	}
	return driver.Extent{State: driver.Unallocated, Length: l, Offset: -1}, nil
}

// fixedStatus is a fixed image's status for [off, off+n) inside its size:
// its data area is a raw file, its holes read zeros. The runs are cached
// (writes, zeroes and resizes keep the cache coherent).
func (im *image) fixedStatus(off, n, size int64) (driver.Extent, error) {
	hs, ok := im.f.(driver.HoleSeeker)
	if !ok {
		return driver.Extent{State: driver.Data, Length: n, Offset: off}, nil
	}
	r, err := im.holes.Find(hs, off, size)
	if err != nil {
		return driver.Extent{}, err
	}
	st := driver.Zero
	if r.Data {
		st = driver.Data
	}
	return driver.Extent{State: st, Length: min(n, r.End-off), Offset: off}, nil
}

func (im *image) WriteAt(p []byte, off int64) (int, error) {
	if im.ro {
		return 0, im.readOnlyErr(off)
	}
	if _, err := im.checkAccess(off, int64(len(p))); err != nil {
		return 0, err
	}
	if im.kind == diskFixed {
		n, err := im.f.WriteAt(p, off)
		im.holes.Changed(off, int64(n), true)
		return n, err
	}
	// Decided before anything is written: a fill request must leave the
	// image unchanged.
	if err := im.needFill(off, int64(len(p))); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		b, in := pos/im.bs, pos%im.bs
		c := min(int64(len(p)-done), im.bs-in)
		if err := im.writeBlock(b, in, p[done:done+int(c)]); err != nil {
			return done, err
		}
		done += int(c)
	}
	return done, nil
}

// writeBlock writes p at byte in of block b.
func (im *image) writeBlock(b, in int64, p []byte) error {
	end := in + int64(len(p))
	s0, s1 := in/sectorSize, (end+sectorSize-1)/sectorSize
	im.mu.Lock()
	v, err := im.viewLocked(b, s0, s1)
	im.mu.Unlock()
	if err != nil {
		return err
	}
	if !v.alloc {
		return im.allocWrite(b, in, p)
	}
	allSet := v.full
	if !allSet {
		allSet = true
		for s := s0; s < s1; s++ {
			if !v.set(s) {
				allSet = false
				break
			}
		}
	}
	if allSet {
		_, err := im.f.WriteAt(p, v.data+in)
		return err
	}
	// Partial sectors whose bit is clear: in a differencing image their
	// other bytes are the parent's, which the container supplies (needFill
	// asked before anything was written; this is its safety net). In a
	// dynamic image they read zeros.
	headPart := in%sectorSize != 0
	tailPart := end%sectorSize != 0
	if (headPart && !v.set(s0)) || (tailPart && !v.set(s1-1)) {
		if im.kind == diskDiff {
			return im.fillErr(b, in, end, headPart && !v.set(s0), tailPart && !v.set(s1-1))
		}
		buf := make([]byte, (s1-s0)*sectorSize)
		if headPart && v.set(s0) {
			if err := driver.ReadFullAt(im.f, buf[:sectorSize], v.data+s0*sectorSize); err != nil {
				return err
			}
		}
		if tailPart && v.set(s1-1) && (s1-1 != s0 || !headPart) {
			if err := driver.ReadFullAt(im.f, buf[len(buf)-sectorSize:], v.data+(s1-1)*sectorSize); err != nil {
				return err
			}
		}
		copy(buf[in-s0*sectorSize:], p)
		if _, err := im.f.WriteAt(buf, v.data+s0*sectorSize); err != nil {
			return err
		}
	} else if _, err := im.f.WriteAt(p, v.data+in); err != nil {
		return err
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.setBitsLocked(b, s0, s1)
}

// allocWrite allocates block b and writes p at byte in of it.
func (im *image) allocWrite(b, in int64, p []byte) error {
	end := in + int64(len(p))
	s0, s1 := in/sectorSize, (end+sectorSize-1)/sectorSize
	bm := make([]byte, im.bmSize)
	if im.kind == diskDiff {
		// Only the sectors written become this image's; the rest keep
		// showing the parent. A partial sector would need the parent's
		// bytes (needFill asked for them before anything was written).
		headPart, tailPart := in%sectorSize != 0, end%sectorSize != 0
		if headPart || tailPart {
			return im.fillErr(b, in, end, headPart, tailPart)
		}
		for s := s0; s < s1; s++ {
			bm[s/8] |= 0x80 >> (s % 8)
		}
	} else {
		// As qemu does: every bit set, the data area reads zeros where
		// nothing was written. qemu ignores bitmaps, so this keeps both
		// readers in agreement.
		for i := range bm {
			bm[i] = 0xFF
		}
	}
	return im.allocBlock(b, bm, p, in)
}

// fillErr is needFill's answer for bytes [in, end) of block b whose head
// and/or tail sector is partly written and not held.
func (im *image) fillErr(b, in, end int64, head, tail bool) error {
	start, stop := b*im.bs+in, b*im.bs+end
	if head {
		start -= in % sectorSize
	}
	if tail {
		stop = b*im.bs + roundUp(end, sectorSize)
	}
	return driver.NeedFill(im.name, start, stop)
}

// allocBlock appends a block for b with bitmap bm, writes data at byte
// dataOff of it (if any) and then points the BAT entry at it.
func (im *image) allocBlock(b int64, bm, data []byte, dataOff int64) error {
	_, err := im.allocBlockWith(b, bm, func(pos int64) (int64, error) {
		if len(data) == 0 {
			return 0, nil
		}
		n, err := im.f.WriteAt(data, pos+dataOff)
		return int64(n), err
	})
	return err
}

// allocBlockWith appends a block for b, calls fill with the file offset of
// its data area to store what it holds and returns fill's count, then
// writes bitmap bm and points the BAT entry at the block. Where fill
// fails, nothing points at the block: the image reads as before.
func (im *image) allocBlockWith(b int64, bm []byte, fill func(dataPos int64) (int64, error)) (int64, error) {
	im.mu.Lock()
	pos, from, err := im.reserveLocked()
	if err == nil {
		im.inflight++
	}
	im.mu.Unlock()
	if err != nil {
		return 0, err
	}
	got, err := fill(pos + im.bmSize)
	if err != nil {
		im.mu.Lock()
		im.inflight--
		if got == 0 {
			im.unreserveLocked(pos, from)
		}
		im.mu.Unlock()
		return got, err
	}
	// The bitmap goes after the data: nothing points at the block yet, so
	// a crash before the entry is written leaves the image as it was.
	if _, werr := im.f.WriteAt(blockHead(bm, pos, from), from); werr != nil {
		im.mu.Lock()
		im.inflight--
		im.mu.Unlock()
		return got, werr
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	im.inflight--
	if err := im.setEntryLocked(b, uint32(pos/sectorSize)); err != nil {
		return got, err
	}
	bits := bm[:im.bmBytes]
	if im.isFull(bits) {
		im.bms.state[b] = bmFull
	} else {
		im.bms.state[b] = bmPartial
		if err := im.cachePutLocked(uint32(b), &bitmap{bits: append([]byte(nil), bits...)}); err != nil {
			return got, err
		}
	}
	return got, nil
}

// dataAlign is the alignment of a new block's data area: the bitmap goes
// right before it, the space in front of the bitmap stays unused. Data on
// the file system's block grid can be shared by reflinks (a convert of
// the image to raw clones it) and a page-sized read touches one page.
const dataAlign = 4096

// reserveLocked takes the space for one more block at the end of the data
// and moves the footer behind it (the new footer is written first, so the
// file always ends with a valid footer). It returns where the block
// starts and where the space taken starts (from: the old footer's
// place), which is before the block when the block is aligned
// (dataAlign). The caller overwrites the old footer, with the block's
// bitmap or with the zeros in front of it.
func (im *image) reserveLocked() (pos, from int64, err error) {
	rs := im.bmSize + im.bs
	from = im.end
	pad := im.alignBlock(from) - from
	if (from+pad)/sectorSize > batUnused-1 {
		return 0, 0, driver.Errorf(driver.ErrUnsupported, im.name, from, "the VHD file cannot grow past 2 TiB (its block table holds 32-bit sector numbers)")
	}
	if _, err := im.appendLocked(pad + rs); err != nil {
		return 0, 0, err
	}
	return from + pad, from, nil
}

// alignBlock is the first place at or after off for a block whose data
// is aligned (dataAlign).
func (im *image) alignBlock(off int64) int64 {
	return roundUp(off+im.bmSize, dataAlign) - im.bmSize
}

// blockHead is what allocBlockWith writes in front of a new block's data:
// zeros over the old footer's place in front of the block (from), then
// bitmap bm.
func blockHead(bm []byte, pos, from int64) []byte {
	if from >= pos {
		return bm
	}
	head := make([]byte, pos-from+int64(len(bm)))
	copy(head[pos-from:], bm)
	return head
}

// unreserveLocked gives back the block reserved at pos (its space taken
// from from) when nothing was written into it (a kernel copy refused
// before copying: copy offload then reads and writes) and no block was
// reserved after it: the footer is written at from again and the file
// ends there. Otherwise the space stays unused: a gap in the file that
// nothing points at, not an error.
func (im *image) unreserveLocked(pos, from int64) {
	if im.end != pos+im.bmSize+im.bs {
		return
	}
	if _, err := im.f.WriteAt(im.ftRaw, from); err != nil {
		return
	}
	if err := im.f.Truncate(from + footerSize); err != nil {
		return // the file keeps the new footer; the gap stays
	}
	im.end = from
	im.fileSize = from + footerSize
}

// appendLocked takes n bytes at the end of the data and moves the footer
// behind them (the new footer is written first, so the file always ends
// with a valid footer). Space leaked by an interrupted allocation is
// dropped first, so that the new bytes read zeros. It returns where the n
// bytes start.
func (im *image) appendLocked(n int64) (int64, error) {
	pos := im.end
	if im.fileSize > pos+footerSize {
		if err := im.f.Truncate(pos + footerSize); err != nil {
			return 0, err
		}
		im.fileSize = pos + footerSize
	}
	if _, err := im.f.WriteAt(im.ftRaw, pos+n); err != nil {
		return 0, err
	}
	im.end = pos + n
	im.fileSize = max(im.fileSize, im.end+footerSize)
	return pos, nil
}

func (im *image) setEntryLocked(b int64, v uint32) error {
	var buf [4]byte
	be.PutUint32(buf[:], v)
	if _, err := im.f.WriteAt(buf[:], im.batOff+4*b); err != nil {
		return err
	}
	im.bat[b] = v
	return nil
}

// freeBlockLocked unmaps block b and punches its old space.
func (im *image) freeBlockLocked(b int64) error {
	e := im.bat[b]
	if e == batUnused {
		return nil
	}
	if err := im.setEntryLocked(b, batUnused); err != nil {
		return err
	}
	im.dropBitmapLocked(b)
	pos := int64(e) * sectorSize
	if pos+im.bmSize+im.bs == im.end {
		im.tailFreed = true // the file shrinks on the next flush
	}
	return im.f.PunchHole(pos, im.bmSize+im.bs)
}

// trimTailLocked shrinks the file when blocks at its end were freed: once
// the cleared table entries are durable, the footer moves down behind the
// last block still in use.
func (im *image) trimTailLocked() error {
	if !im.tailFreed || im.kind == diskFixed || im.inflight > 0 {
		return nil // (with blocks being allocated, on a later flush)
	}
	im.tailFreed = false
	rs := im.bmSize + im.bs
	end := im.metaEnd
	for _, e := range im.bat {
		if e == batUnused {
			continue
		}
		if p := int64(e) * sectorSize; p+rs <= im.fileSize {
			end = max(end, p+rs)
		}
	}
	if end >= im.end {
		return nil
	}
	if err := im.f.Sync(); err != nil {
		return err
	}
	return im.cutLocked(end)
}

// cutLocked ends the data at end: the footer is written there and the
// file cut behind it.
func (im *image) cutLocked(end int64) error {
	if _, err := im.f.WriteAt(im.ftRaw, end); err != nil {
		return err
	}
	if err := im.f.Truncate(end + footerSize); err != nil {
		return err
	}
	im.end, im.fileSize = end, end+footerSize
	return nil
}

// blockSpan is the part of the disk block b covers.
func (im *image) blockSpan(b int64) int64 {
	return min(im.bs, im.size-b*im.bs)
}

// zeroFile makes [off, off+n) of the file read zeros.
func (im *image) zeroFile(off, n int64, unmap bool) error {
	if unmap {
		return im.f.PunchHole(off, n)
	}
	if z, ok := im.f.(driver.ZeroRanger); ok {
		return z.ZeroRange(off, n)
	}
	return driver.WriteZeros(im.f, off, n)
}

// WriteZeroes makes the range read zeros. In a dynamic image unallocated
// blocks read zeros already and are left alone; whole allocated blocks are
// unmapped with unmap, otherwise zeroed in place. A differencing image does
// not know what its parent holds, so its zeros shadow the parent: whole
// blocks become blocks with every bit set and zero (sparse) data, partial
// ones get zeros written over the sectors with their bits set. A partial
// sector not held by a differencing image asks for a fill first (see
// needFill), with nothing changed.
func (im *image) WriteZeroes(off, n int64, unmap bool) error {
	if im.ro {
		return im.readOnlyErr(off)
	}
	if _, err := im.checkAccess(off, n); err != nil {
		return err
	}
	if im.kind == diskFixed {
		defer im.holes.Changed(off, n, false) // (even on failure: it may have got halfway)
		if unmap {
			return im.f.PunchHole(off, n)
		}
		if z, ok := im.f.(driver.ZeroRanger); ok {
			return z.ZeroRange(off, n)
		}
		return driver.ErrUnsupported
	}
	if err := im.needFill(off, n); err != nil {
		return err
	}
	end := off + n
	for off < end {
		b, in := off/im.bs, off%im.bs
		c := min(end-off, im.bs-in)
		if err := im.zeroBlock(b, in, c, unmap); err != nil {
			return err
		}
		off += c
	}
	return nil
}

func (im *image) zeroBlock(b, in, c int64, unmap bool) error {
	whole := in == 0 && c == im.blockSpan(b)
	im.mu.Lock()
	if im.isBad(b) {
		im.mu.Unlock()
		return im.badErr(b)
	}
	e := im.bat[b]
	im.mu.Unlock()
	alloc := e != batUnused
	// Without this image the range reads zeros only in a dynamic image.
	pz := im.kind != diskDiff
	switch {
	case !alloc && pz:
		return nil
	case whole && alloc && pz && unmap:
		im.mu.Lock()
		defer im.mu.Unlock()
		return im.freeBlockLocked(b)
	case whole && alloc:
		data := int64(e)*sectorSize + im.bmSize
		if err := im.zeroFile(data, im.bs, unmap); err != nil {
			return err
		}
		im.mu.Lock()
		defer im.mu.Unlock()
		return im.setBitsLocked(b, 0, im.spb)
	case whole:
		bm := make([]byte, im.bmSize)
		for i := range bm {
			bm[i] = 0xFF
		}
		return im.allocBlock(b, bm, nil, 0)
	case !alloc && in%sectorSize == 0 && c%sectorSize == 0:
		// A differencing image: a new block holding just these sectors,
		// whose fresh data area reads zeros.
		bm := make([]byte, im.bmSize)
		for s := in / sectorSize; s < (in+c)/sectorSize; s++ {
			bm[s/8] |= 0x80 >> (s % 8)
		}
		return im.allocBlock(b, bm, nil, 0)
	}
	for c > 0 {
		k := min(c, driver.ZeroChunk)
		if err := im.writeBlock(b, in, driver.Zeros(k)); err != nil {
			return err
		}
		in += k
		c -= k
	}
	return nil
}

// Discard unmaps every whole block inside the range (its BAT entry becomes
// free, so it is Unallocated: a dynamic image reads zeros there, a
// differencing one shows the parent again) and punches its space out of
// the file; Compact later fills the hole. Partial blocks are left as they
// are. A block whose table entry is corrupt fails with ErrCorrupt (check
// -r all repairs it). In a fixed image the range is punched out of the
// file (it reads zeros).
func (im *image) Discard(off, n int64) error {
	if im.ro {
		return im.readOnlyErr(off)
	}
	if _, err := im.checkAccess(off, n); err != nil {
		return err
	}
	if im.kind == diskFixed {
		defer im.holes.Changed(off, n, false)
		return im.f.PunchHole(off, n)
	}
	end := off + n
	for off < end {
		b, in := off/im.bs, off%im.bs
		c := min(end-off, im.bs-in)
		if in == 0 && c == im.blockSpan(b) {
			im.mu.Lock()
			var err error
			if im.isBad(b) {
				err = im.badErr(b)
			} else {
				err = im.freeBlockLocked(b)
			}
			im.mu.Unlock()
			if err != nil {
				return err
			}
		}
		off += c
	}
	return nil
}
