package vhdx

import (
	"encoding/binary"
	"errors"
	"io"
	"sort"

	"github.com/vdisk/vdisk/driver"
)

func leU64(b []byte) uint64 { return binary.LittleEndian.Uint64(b) }

func sortSlice(n int, less func(a, b int) bool, swap func(a, b int)) {
	sort.Sort(sorter{n, less, swap})
}

type sorter struct {
	n    int
	less func(a, b int) bool
	swap func(a, b int)
}

func (s sorter) Len() int           { return s.n }
func (s sorter) Less(a, b int) bool { return s.less(a, b) }
func (s sorter) Swap(a, b int)      { s.swap(a, b) }

const sectorsPerChunk = 1 << 23

func (im *image) readOnlyErr(off int64) error {
	return driver.Errorf(driver.ErrReadOnly, im.name, off, "image opened read-only")
}

func (im *image) badErr(idx int64) error {
	return im.corrupt(im.batOff+8*idx, "%s", im.bad[idx])
}

// blockEntryLocked returns block b's state and file offset.
func (im *image) blockEntryLocked(b int64) (uint64, int64, error) {
	i := im.payloadIndex(b)
	if why := im.bad[i]; why != "" {
		return 0, 0, im.badErr(i)
	}
	e := im.bat[i]
	return e & 7, int64(e >> 20 << 20), nil
}

// bitmapLocked returns chunk c's sector bitmap (loading it), or nil when
// the chunk has none.
func (im *image) bitmapLocked(c int64) ([]byte, error) {
	if bm, ok := im.bitmaps[c]; ok {
		return bm, nil
	}
	i := im.bitmapIndex(c)
	if why := im.bad[i]; why != "" {
		return nil, im.badErr(i)
	}
	e := im.bat[i]
	if e&7 != stBitmapOK {
		return nil, nil
	}
	bm := make([]byte, mib)
	if err := readFull(im.r, bm, int64(e>>20<<20)); err != nil {
		return nil, err
	}
	im.bitmaps[c] = bm
	return bm, nil
}

// sectorBitRun reports whether logical sector s (of the disk) is set in
// its chunk's bitmap and how many sectors from s, up to limit, share that.
func sectorBitRun(bm []byte, s, limit int64) (bool, int64) {
	base := s / sectorsPerChunk * sectorsPerChunk
	bit := func(x int64) bool {
		i := x - base
		return bm[i/8]&(1<<(i%8)) != 0
	}
	st := bit(s)
	e := s + 1
	for e < limit {
		i := e - base
		if i%8 == 0 && e+8 <= limit {
			c := bm[i/8]
			if st && c == 0xFF || !st && c == 0 {
				e += 8
				continue
			}
		}
		if bit(e) != st {
			break
		}
		e++
	}
	return st, e - s
}

// setBits sets (or clears) the bits of sectors [s0, s1) of one chunk.
func setBits(bm []byte, base, s0, s1 int64, v bool) {
	for s := s0; s < s1; s++ {
		i := s - base
		if i%8 == 0 && s+8 <= s1 {
			if v {
				bm[i/8] = 0xFF
			} else {
				bm[i/8] = 0
			}
			s += 7
			continue
		}
		if v {
			bm[i/8] |= 1 << (i % 8)
		} else {
			bm[i/8] &^= 1 << (i % 8)
		}
	}
}

// runLocked describes the run at pos, at most n bytes and not past pos's
// block: its state, file offset of Data (or -1) and length.
func (im *image) runLocked(pos, n int64) (driver.State, int64, int64, error) {
	bs := im.p.blockSize
	b, in := pos/bs, pos%bs
	c := min(n, bs-in)
	st, foff, err := im.blockEntryLocked(b)
	if err != nil {
		return 0, 0, 0, err
	}
	switch st {
	case stZero:
		return driver.Zero, -1, c, nil
	case stFull:
		return driver.Data, foff + in, c, nil
	case stPartial:
		if !im.p.hasParent {
			return driver.Data, foff + in, c, nil
		}
		bm, err := im.bitmapLocked(b / im.chunkRatio)
		if err != nil {
			return 0, 0, 0, err
		}
		if bm == nil {
			return 0, 0, 0, im.corrupt(im.batOff+8*im.payloadIndex(b), "block %d is partially present but its sector bitmap is missing", b)
		}
		lss := im.p.logicalSector
		s := pos / lss
		set, ns := sectorBitRun(bm, s, (pos+c+lss-1)/lss)
		l := min(c, (s+ns)*lss-pos)
		if set {
			return driver.Data, foff + in, l, nil
		}
		return driver.Unallocated, -1, l, nil
	}
	return driver.Unallocated, -1, c, nil
}

func (im *image) Status(off, n int64) (driver.Extent, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := driver.CheckRange(im.name, off, n, im.p.diskSize); err != nil || n == 0 {
		if err == nil {
			err = driver.Errorf(driver.ErrOutOfRange, im.name, off, "empty status request")
		}
		return driver.Extent{}, err
	}
	ext := driver.Extent{Offset: -1}
	for pos, end := off, off+n; pos < end; {
		st, foff, l, err := im.runLocked(pos, end-pos)
		if err != nil {
			if pos == off {
				return driver.Extent{}, err
			}
			break
		}
		if pos == off {
			ext.State, ext.Offset, ext.Length = st, foff, l
		} else if st == ext.State && (st != driver.Data || foff == ext.Offset+ext.Length) {
			ext.Length += l
		} else {
			break
		}
		pos += l
		if (pos % im.p.blockSize) != 0 {
			break // the run ended inside a block
		}
	}
	return ext, nil
}

func (im *image) ReadAt(p []byte, off int64) (int, error) {
	im.mu.Lock()
	size := im.p.diskSize
	im.mu.Unlock()
	if err := driver.CheckRange(im.name, off, int64(len(p)), size); err != nil {
		return 0, err
	}
	done := int64(0)
	for done < int64(len(p)) {
		pos := off + done
		im.mu.Lock()
		st, foff, l, err := im.runLocked(pos, int64(len(p))-done)
		im.mu.Unlock()
		if err != nil {
			return int(done), err
		}
		chunk := p[done : done+l]
		if st == driver.Data {
			if err := readData(im.r, chunk, foff); err != nil {
				return int(done), driver.WithFile(err, "read", im.name)
			}
		} else {
			clear(chunk)
		}
		done += l
	}
	return len(p), nil
}

// blockLen is the number of disk bytes block b covers (the last block may
// be cut by the disk's end).
func (im *image) blockLen(b int64) int64 {
	return min(im.p.blockSize, im.p.diskSize-b*im.p.blockSize)
}

// heldLocked reports whether the image holds logical sector s itself
// (data, or a zero block it composes).
func (im *image) heldLocked(s int64) (bool, error) {
	pos := s * im.p.logicalSector
	st, _, _, err := im.runLocked(pos, 1)
	return st != driver.Unallocated, err
}

// needFill is the copy-on-write rule of a differencing image: a write
// covering part of its first or last logical sector, where the image does
// not hold that sector, asks for the request rounded out to that sector.
// Whole sectors never need a fill: the sector bitmap records them.
func (im *image) needFill(off, n int64) error {
	if !im.p.hasParent || n <= 0 {
		return nil
	}
	lss := im.p.logicalSector
	end := off + n
	start, stop := off, end
	im.mu.Lock()
	defer im.mu.Unlock()
	if off%lss != 0 {
		h, err := im.heldLocked(off / lss)
		if err != nil {
			return err
		}
		if !h {
			start = off - off%lss
		}
	}
	if end%lss != 0 {
		h, err := im.heldLocked(end / lss)
		if err != nil {
			return err
		}
		if !h {
			stop = roundUp(end, lss)
		}
	}
	if start != off || stop != end {
		return driver.NeedFill(im.name, start, stop)
	}
	return nil
}

// prepareWrite checks a modifying request and starts the write session.
func (im *image) prepareWrite(off, n int64) error {
	if im.ro {
		return im.readOnlyErr(off)
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := driver.CheckRange(im.name, off, n, im.p.diskSize); err != nil {
		return err
	}
	return im.startSessionLocked()
}

func (im *image) WriteAt(p []byte, off int64) (int, error) {
	if err := im.prepareWrite(off, int64(len(p))); err != nil {
		return 0, err
	}
	if err := im.needFill(off, int64(len(p))); err != nil {
		return 0, err
	}
	bs := im.p.blockSize
	for done := int64(0); done < int64(len(p)); {
		pos := off + done
		b, in := pos/bs, pos%bs
		c := min(int64(len(p))-done, bs-in)
		if err := im.writeBlock(p[done:done+c], 0, b, in); err != nil {
			return int(done), err
		}
		done += c
	}
	return len(p), nil
}

// setEntryLocked changes BAT entry i and marks its page dirty.
func (im *image) setEntryLocked(i int64, st uint64, off int64) {
	im.bat[i] = uint64(off) | st
	im.dirtyBAT[i*8/logSector] = true
}

// markBitsLocked sets (v) or clears the bits of the disk's sectors
// [s0, s1), all inside one chunk, allocating the chunk's bitmap block.
func (im *image) markBitsLocked(s0, s1 int64, v bool) error {
	c := s0 / sectorsPerChunk
	bm, err := im.bitmapLocked(c)
	if err != nil {
		return err
	}
	if bm == nil {
		off, err := im.allocLocked(mib)
		if err != nil {
			return err
		}
		bm = make([]byte, mib)
		im.setEntryLocked(im.bitmapIndex(c), stBitmapOK, off)
		im.bitmaps[c] = bm
	}
	setBits(bm, c*sectorsPerChunk, s0, s1, v)
	pages := im.dirtyBM[c]
	if pages == nil {
		pages = map[int64]bool{}
		im.dirtyBM[c] = pages
	}
	base := c * sectorsPerChunk
	for pg := (s0 - base) / 8 / logSector; pg <= (s1-1-base)/8/logSector; pg++ {
		pages[pg] = true
	}
	return nil
}

// writeBlock writes p at byte in of block b, or zn zero bytes when p is
// nil.
func (im *image) writeBlock(p []byte, zn, b, in int64) error {
	if p == nil {
		_, err := im.storeBlock(b, in, zn, nil)
		return err
	}
	_, err := im.storeBlock(b, in, int64(len(p)), func(foff int64) (int64, error) {
		n, err := im.f.WriteAt(p, foff)
		return int64(n), err
	})
	return err
}

// storeBlock stores n bytes at byte in of block b: put writes them at the
// file offset it is given and returns how many it stored (a copy may
// stop short where its source ends); a nil put stores zeros. It returns
// the bytes stored.
//
// The bytes go in outside mu. A new block's BAT entry is set once they
// are (storeNew), so a copy the storage refuses leaves no block behind.
// In a differencing image the sector bitmap bits of the stored sectors
// are set only once the bytes are in place: a store that fails leaves
// those sectors showing the parent, as they did.
func (im *image) storeBlock(b, in, n int64, put func(foff int64) (int64, error)) (int64, error) {
	zeros := put == nil
	lss := im.p.logicalSector
	bs := im.p.blockSize
	diskPos := b*bs + in
	s0 := diskPos / lss
	whole := in == 0 && n >= im.blockLen(b)
	im.mu.Lock()
	st, foff, err := im.blockEntryLocked(b)
	if err != nil {
		im.mu.Unlock()
		return 0, err
	}
	i := im.payloadIndex(b)
	setBits, fresh := false, false
	switch {
	case st == stFull || st == stPartial && !im.p.hasParent:
	case st == stPartial:
		setBits = true
	case st == stZero && foff != 0:
		// A preallocated zero block (qemu's fixed images): zero what the
		// write leaves out, then it is fully present. Under mu, so that a
		// concurrent write into the same block waits and then finds it
		// present instead of zeroing over these bytes.
		err := writeZeros(im.f, foff, in)
		if err == nil {
			err = writeZeros(im.f, foff+in+n, bs-in-n)
		}
		if err != nil {
			im.mu.Unlock()
			return 0, err
		}
		im.setEntryLocked(i, stFull, foff)
	default:
		if foff, err = im.allocLocked(bs); err != nil {
			im.mu.Unlock()
			return 0, err
		}
		fresh = true
		full := st == stZero || !im.p.hasParent || whole
		if !zeros {
			// The entry is set once the bytes are in: a copy the storage
			// refuses before copying gives the space back, and the block
			// reads as before. The container's range lock (the block is
			// its unit) keeps other writes to this block out meanwhile.
			im.mu.Unlock()
			return im.storeNew(b, in, n, foff, full, put)
		}
		if err := im.publishLocked(b, foff, full); err != nil {
			im.mu.Unlock()
			return 0, err
		}
		if full {
			im.mu.Unlock()
			return n, nil // fresh space reads zeros
		}
		setBits = true
	}
	im.mu.Unlock()
	var got int64
	switch {
	case zeros && fresh:
		got = n // fresh space reads zeros
	case zeros:
		if err = writeZeros(im.f, foff+in, n); err == nil {
			got = n
		}
	default:
		got, err = put(foff + in)
		got = max(0, min(got, n))
	}
	if setBits && got > 0 {
		im.mu.Lock()
		berr := im.markBitsLocked(s0, (diskPos+got+lss-1)/lss, true)
		im.mu.Unlock()
		if err == nil {
			err = berr
		}
	}
	return got, err
}

// publishLocked points block b's entry at the new block at foff: fully
// present (full), or partly, its sector bits cleared so that the rest
// shows the parent (the caller sets the bits of what it stored).
func (im *image) publishLocked(b, foff int64, full bool) error {
	i := im.payloadIndex(b)
	if full {
		im.setEntryLocked(i, stFull, foff)
		return nil
	}
	bstart := b * im.p.blockSize / im.p.logicalSector
	if err := im.markBitsLocked(bstart, bstart+im.spb, false); err != nil {
		return err
	}
	im.setEntryLocked(i, stPartial, foff)
	return nil
}

// storeNew stores n bytes at byte in of the new block b at foff, which
// nothing points at yet, then points the entry at it. Where put stores
// nothing (a kernel copy refused before copying), the space is given
// back and the block reads as it did.
func (im *image) storeNew(b, in, n, foff int64, full bool, put func(foff int64) (int64, error)) (int64, error) {
	got, err := put(foff + in)
	got = max(0, min(got, n))
	im.mu.Lock()
	defer im.mu.Unlock()
	if got == 0 {
		// A refusal wrote nothing; after another error the space may
		// hold part of a write and is zeroed when it is used again.
		im.unallocLocked(foff, im.p.blockSize, err == nil || errors.Is(err, driver.ErrUnsupported))
		return 0, err
	}
	if perr := im.publishLocked(b, foff, full); perr != nil {
		im.unallocLocked(foff, im.p.blockSize, false) // holds the bytes: zeroed before reuse
		return 0, perr
	}
	if !full {
		lss := im.p.logicalSector
		diskPos := b*im.p.blockSize + in
		if berr := im.markBitsLocked(diskPos/lss, (diskPos+got+lss-1)/lss, true); berr != nil && err == nil {
			err = berr
		}
	}
	return got, err
}

// writeZeros writes n zero bytes at off.
func writeZeros(f driver.File, off, n int64) error {
	if n <= 0 {
		return nil
	}
	if z, ok := f.(driver.ZeroRanger); ok && n >= 64*kib {
		if err := z.ZeroRange(off, n); err == nil {
			return nil
		}
	}
	return driver.WriteZeros(f, off, n)
}

func (im *image) WriteZeroes(off, n int64, unmap bool) error {
	if err := im.prepareWrite(off, n); err != nil {
		return err
	}
	if err := im.needFill(off, n); err != nil {
		return err
	}
	bs := im.p.blockSize
	for pos, end := off, off+n; pos < end; {
		b, in := pos/bs, pos%bs
		c := min(end-pos, bs-in)
		if err := im.zeroBlock(b, in, c); err != nil {
			return err
		}
		pos += c
	}
	return nil
}

// zeroBlock makes [in, in+n) of block b read zeros.
func (im *image) zeroBlock(b, in, n int64) error {
	whole := in == 0 && n >= im.blockLen(b)
	im.mu.Lock()
	st, foff, err := im.blockEntryLocked(b)
	if err != nil {
		im.mu.Unlock()
		return err
	}
	i := im.payloadIndex(b)
	if whole {
		switch {
		case im.p.leaveAllocated && !im.p.hasParent && foff != 0:
			// Fixed images keep their blocks: a zero block with its space.
			im.setEntryLocked(i, stZero, foff)
		case st == stZero || !im.p.hasParent && (st == stNotPresent || st == stUndefined || st == stUnmapped):
		default:
			if foff != 0 {
				im.punch = append(im.punch, span{foff, foff + im.p.blockSize})
			}
			im.setEntryLocked(i, stZero, 0)
		}
		im.mu.Unlock()
		return nil
	}
	if st == stZero || !im.p.hasParent && (st == stNotPresent || st == stUndefined || st == stUnmapped) {
		im.mu.Unlock()
		return nil // reads zeros already
	}
	im.mu.Unlock()
	return im.writeBlock(nil, n, b, in)
}

func (im *image) Discard(off, n int64) error {
	if err := im.prepareWrite(off, n); err != nil {
		return err
	}
	bs := im.p.blockSize
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.p.leaveAllocated && !im.p.hasParent {
		return nil // a fixed image keeps its blocks
	}
	for b := (off + bs - 1) / bs; b*bs < off+n; b++ {
		if b*bs+im.blockLen(b) > off+n {
			break
		}
		st, foff, err := im.blockEntryLocked(b)
		if err != nil {
			return err
		}
		to := uint64(stUnmapped)
		if im.p.hasParent {
			to = stNotPresent
		}
		if st == to || st == stNotPresent {
			continue
		}
		if foff != 0 {
			im.punch = append(im.punch, span{foff, foff + bs})
		}
		im.setEntryLocked(im.payloadIndex(b), to, 0)
	}
	return nil
}

// dirtyPagesLocked collects the metadata pages to write through the log.
func (im *image) dirtyPagesLocked() []logWrite {
	var ws []logWrite
	for pg := range im.dirtyBAT {
		data := make([]byte, logSector)
		for k := int64(0); k < logSector/8; k++ {
			if i := pg*logSector/8 + k; i < int64(len(im.bat)) {
				binary.LittleEndian.PutUint64(data[8*k:], im.bat[i])
			}
		}
		ws = append(ws, logWrite{im.batOff + pg*logSector, data})
	}
	for c, pages := range im.dirtyBM {
		e := im.bat[im.bitmapIndex(c)]
		bm := im.bitmaps[c]
		if e&7 != stBitmapOK || bm == nil {
			continue
		}
		for pg := range pages {
			ws = append(ws, logWrite{int64(e>>20<<20) + pg*logSector, bm[pg*logSector : (pg+1)*logSector]})
		}
	}
	for off, pg := range im.dirtyPg {
		ws = append(ws, logWrite{off, pg})
	}

	sort.Slice(ws, func(a, b int) bool { return ws[a].off < ws[b].off })
	return ws
}

func (im *image) clearDirtyLocked() {
	im.dirtyBAT = map[int64]bool{}
	im.dirtyBM = map[int64]map[int64]bool{}
	im.dirtyPg = map[int64][]byte{}
}

// punchPendingLocked frees the space of blocks whose BAT entries no longer
// point at them (committed).
func (im *image) punchPendingLocked() error {
	for _, s := range im.punch {
		if err := im.zeroSpace(s.off, s.end-s.off); err != nil {
			return err
		}
		im.addFreeLocked(s, true)
	}
	im.punch = nil
	return nil
}

// pageLocked returns the 4 KiB metadata page at off (a region table or
// metadata region page) as the next commit will write it, marking it
// dirty: changes to it go through the log.
func (im *image) pageLocked(off int64) ([]byte, error) {
	if pg, ok := im.dirtyPg[off]; ok {
		return pg, nil
	}
	pg := make([]byte, logSector)
	if err := readFull(im.r, pg, off); err != nil {
		return nil, err
	}
	im.dirtyPg[off] = pg
	return pg, nil
}

// setBytesLocked changes metadata bytes at off (any length, crossing
// pages) through the log.
func (im *image) setBytesLocked(off int64, b []byte) error {
	for len(b) > 0 {
		po := off / logSector * logSector
		pg, err := im.pageLocked(po)
		if err != nil {
			return err
		}
		n := copy(pg[off-po:], b)
		b, off = b[n:], off+int64(n)
	}
	return nil
}

func putU64(b []byte, v uint64) { binary.LittleEndian.PutUint64(b, v) }

// readData reads block data; bytes past the end of the file read zeros
// (qemu's fixed images end with the disk's last byte, not the block's).
func readData(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == io.EOF {
		clear(p[n:])
		return nil
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return err
}
