package vdi

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"sync/atomic"

	"github.com/vdisk/vdisk/driver"
)

// WriteZeroes makes [off, off+n) read as zeros. With unmap, whole blocks
// become zero blocks and their data blocks are given back (the file
// shrinks); without it, allocated blocks are zero-filled in place. Fixed
// images are always zero-filled in place. Free blocks of a base image and
// zero blocks read zeros already; whole free blocks of a differencing
// image become zero blocks. Where the range covers only part of a free
// block of a differencing image (whose rest must keep showing the layers
// below), nothing is written and a *driver.FillError is returned, as from
// WriteAt; the container then writes those parts itself.
func (im *image) WriteZeroes(off, n int64, unmap bool) error {
	return im.zeroRange(off, n, false, unmap)
}

// Discard deallocates the whole blocks of [off, off+n): they become free
// blocks (reading through to the parent in a differencing image, zeros in
// a base image), zero blocks included, and the file shrinks by their data
// blocks. Parts of blocks are left as they are. A fixed image cannot free
// blocks: Discard returns ErrUnsupported.
func (im *image) Discard(off, n int64) error {
	return im.zeroRange(off, n, true, true)
}

func (im *image) zeroRange(off, n int64, discard, unmap bool) error {
	if err := im.writable(off); err != nil {
		return err
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := driver.CheckRange(im.name, off, n, im.Size()); err != nil {
		return err
	}
	im.meta.Lock()
	typ := im.hdr.typ
	im.meta.Unlock()
	if typ == typeFixed {
		if discard {
			return driver.Unsupportedf(im.name, "a fixed VDI image cannot discard blocks")
		}
		unmap = false
	}
	if n == 0 {
		return nil
	}
	diff := typ == typeDiff
	if !discard {
		if err := im.needFill(off, off+n, diff); err != nil {
			return err
		}
	}
	im.touch()
	target := uint32(entZero)
	if discard {
		target = entFree
	}
	freed := false
	for end := off + n; off < end; {
		b, in := off/im.bs, off%im.bs
		bl := im.blockLen(b)
		m := min(end-off, bl-in)
		e := im.entry(b)
		whole := in == 0 && m == bl
		switch {
		case discard && !whole:
			// Parts of blocks are left as they are.
		case discard:
			if e != entFree {
				if err := im.setEntry(b, entFree); err != nil {
					return err
				}
				freed = freed || allocated(e)
			}
		case allocated(e) && whole && unmap:
			if err := im.setEntry(b, target); err != nil {
				return err
			}
			freed = true
		case allocated(e) && unmap:
			// Zero the range; a block left all zero becomes a zero block
			// (not a free one: the rest of it must keep reading zeros).
			buf := im.bufs.Get()
			err := im.readData(buf[:bl], im.dataOff(e))
			if err == nil {
				clear(buf[in : in+m])
				if driver.IsZero(buf[:bl]) {
					if err = im.setEntry(b, entZero); err == nil {
						freed = true
					}
				} else {
					_, err = im.f.WriteAt(buf[in:in+m], im.dataOff(e)+in)
				}
			}
			im.bufs.Put(buf)
			if err != nil {
				return driver.WithFile(err, "write zeroes", im.name)
			}
		case allocated(e):
			if _, err := im.f.WriteAt(driver.Zeros(m), im.dataOff(e)+in); err != nil {
				return driver.WithFile(err, "write zeroes", im.name)
			}
		case e == entZero || (e == entFree && !diff):
			// Reads zeros already.
		case whole:
			if err := im.setEntry(b, entZero); err != nil {
				return err
			}
		default:
			// Part of a free block of a differencing image: needFill
			// turned the request away before anything was written.
			return driver.Corruptf(im.name, off, "internal error: partial zeroing of free block %d of a differencing image without a fill", b)
		}
		off += m
	}
	if !freed {
		return nil
	}
	// The entries that freed data blocks must be durable before pack moves
	// other blocks into their places.
	if err := im.f.Sync(); err != nil {
		return driver.WithFile(err, "sync", im.name)
	}
	return im.pack(nil, nil)
}

// mapScan is what a walk over the block map found.
type mapScan struct {
	count    uint32     // allocated entries
	maxIdx   int64      // highest data block index starting inside the file, -1 if none
	pastEOF  []int64    // blocks whose data block starts at or after the end of the file
	partial  []int64    // blocks whose data block ends past the end of the file
	tooLarge []int64    // blocks whose index is not below the block count (qemu's rule)
	dups     [][2]int64 // (block, earlier block) pairs sharing a data block
	slots    int64      // data block positions the file holds (the last may be partial)
	used     int64      // distinct positions referenced
}

// scan walks the block map against a file of fileSize bytes. dups asks for
// the cross-link search (a bitmap over the file's data blocks, or a sort
// where the file is sparse and huge).
func (im *image) scan(fileSize int64, dups bool) mapScan {
	sc := mapScan{maxIdx: -1}
	if fileSize > im.offData {
		sc.slots = (fileSize - im.offData + im.tbs - 1) / im.tbs
	}
	nblocks := int64(len(im.bmap))
	for b := range im.bmap {
		e := im.entry(int64(b))
		if !allocated(e) {
			continue
		}
		sc.count++
		if im.dataOff(e) >= fileSize {
			sc.pastEOF = append(sc.pastEOF, int64(b))
			continue
		}
		if im.slotOff(e)+im.tbs > fileSize {
			sc.partial = append(sc.partial, int64(b))
		}
		if int64(e) >= nblocks {
			sc.tooLarge = append(sc.tooLarge, int64(b))
		}
		sc.maxIdx = max(sc.maxIdx, int64(e))
	}
	if !dups {
		return sc
	}
	if sc.slots <= 8*nblocks+(1<<16) {
		owner := make(map[uint32]int64) // only for reporting the earlier block
		seen := make([]uint64, (sc.slots+63)/64)
		for b := range im.bmap {
			e := im.entry(int64(b))
			if !allocated(e) || int64(e) >= sc.slots || im.dataOff(e) >= fileSize {
				continue
			}
			w, bit := e/64, uint64(1)<<(e%64)
			if seen[w]&bit != 0 {
				sc.dups = append(sc.dups, [2]int64{int64(b), owner[e]})
				continue
			}
			seen[w] |= bit
			sc.used++
			if len(owner) < 1<<16 {
				owner[e] = int64(b)
			}
		}
		return sc
	}
	pairs := make([]uint64, 0, sc.count)
	for b := range im.bmap {
		e := im.entry(int64(b))
		if allocated(e) && im.dataOff(e) < fileSize {
			pairs = append(pairs, uint64(e)<<32|uint64(b))
		}
	}
	slices.Sort(pairs)
	for i, pr := range pairs {
		if i > 0 && pr>>32 == pairs[i-1]>>32 {
			first := i - 1
			for first > 0 && pairs[first-1]>>32 == pr>>32 {
				first--
			}
			sc.dups = append(sc.dups, [2]int64{int64(pr & 0xFFFFFFFF), int64(pairs[first] & 0xFFFFFFFF)})
			continue
		}
		sc.used++
	}
	return sc
}

// pack moves data blocks from the end of the data area into the holes
// left by freed blocks, so that the referenced indices are exactly
// 0..count-1, and truncates the file after them. The caller holds mu
// exclusively, and the entry changes that made the holes are durable.
// ctx (may be nil) stops the moves early: nothing is repointed then, and
// the copies already made sit in unreferenced holes. progress (may be nil)
// gets the moves done out of the moves needed.
//
// Crash safety: the copies go into unreferenced holes and are synced
// before any entry points at them; the entries are synced before the file
// is truncated. Every intermediate state reads the same content; one
// interrupted early leaves holes (leaks) that the next pack or check -r
// removes.
func (im *image) pack(ctx context.Context, progress driver.Progress) error {
	fileSize, err := im.f.Size()
	if err != nil {
		return driver.WithFile(err, "stat", im.name)
	}
	sc := im.scan(fileSize, true)
	if len(sc.pastEOF) > 0 || len(sc.dups) > 0 {
		return driver.Corruptf(im.name, -1, "the block map is inconsistent (%d entries past the end of the file, %d cross-linked); run check -r all",
			len(sc.pastEOF), len(sc.dups))
	}
	count := sc.count
	used := make([]uint64, (int64(count)+63)/64)
	type src struct{ idx, b uint32 }
	var srcs []src
	for b := range im.bmap {
		e := im.entry(int64(b))
		if !allocated(e) {
			continue
		}
		if e < count {
			used[e/64] |= 1 << (e % 64)
		} else {
			srcs = append(srcs, src{e, uint32(b)})
		}
	}
	// Move the highest blocks first: the file shrinks from its end.
	slices.SortFunc(srcs, func(a, b src) int { return int(b.idx) - int(a.idx) })
	holes := make([]uint32, 0, len(srcs))
	for i := uint32(0); i < count && len(holes) < len(srcs); i++ {
		if used[i/64]&(1<<(i%64)) == 0 {
			holes = append(holes, i)
		}
	}
	if len(holes) != len(srcs) {
		return driver.Corruptf(im.name, -1, "internal error: %d holes for %d blocks to move", len(holes), len(srcs))
	}
	total := int64(len(srcs))
	if progress != nil {
		progress(0, total)
	}
	if len(srcs) > 0 {
		buf := im.bufs.Get()
		for i, s := range srcs {
			if ctx != nil {
				if err := ctx.Err(); err != nil {
					im.bufs.Put(buf)
					return err
				}
			}
			if err := im.readData(buf, im.slotOff(s.idx)); err != nil {
				im.bufs.Put(buf)
				return err
			}
			if _, err := im.f.WriteAt(buf, im.slotOff(holes[i])); err != nil {
				im.bufs.Put(buf)
				return driver.WithFile(err, "move block", im.name)
			}
			if progress != nil && int64(i+1) < total {
				progress(int64(i+1), total)
			}
		}
		im.bufs.Put(buf)
		if err := im.f.Sync(); err != nil {
			return driver.WithFile(err, "sync", im.name)
		}
	}
	// Every moved entry is repointed in one write (with the header): the
	// count does not change, and no moment shows some moved and not others.
	im.meta.Lock()
	lo, hi := int64(len(im.bmap)), int64(0)
	old := make([]uint32, len(srcs))
	for i, s := range srcs {
		old[i] = atomic.SwapUint32(&im.bmap[s.b], holes[i])
		lo, hi = min(lo, int64(s.b)), max(hi, int64(s.b)+1)
	}
	err = im.writeMapLocked(lo, hi)
	if err != nil {
		for i, s := range srcs {
			atomic.StoreUint32(&im.bmap[s.b], old[i])
		}
		im.meta.Unlock()
		return err
	}
	im.count, im.cursor, im.hiRef, im.spare = count, count, count, nil
	im.meta.Unlock()
	if err := im.f.Sync(); err != nil {
		return driver.WithFile(err, "sync", im.name)
	}
	if want := im.slotOff(count); fileSize != want {
		if err := im.f.Truncate(want); err != nil {
			return driver.WithFile(err, "truncate", im.name)
		}
		if err := im.f.Sync(); err != nil {
			return driver.WithFile(err, "sync", im.name)
		}
	}
	if progress != nil {
		progress(total, total)
	}
	return nil
}

// Compact packs the data area: the data blocks after the holes that freed
// blocks left (discarded, unmapped, or leaked by an interrupted operation)
// move into them, the map entries follow, and the file is truncated after
// the last data block. Finding the blocks worth freeing (all zeros, or
// equal to the layers below) is the container's job: it discards them
// before calling Compact. A kill at any point leaves an image that opens
// and reads the same. Fixed images are not compacted.
func (im *image) Compact(ctx context.Context, progress driver.Progress) error {
	if err := im.writable(-1); err != nil {
		return err
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	im.meta.Lock()
	typ := im.hdr.typ
	im.meta.Unlock()
	if typ == typeFixed {
		return driver.Unsupportedf(im.name, "a fixed VDI image cannot be compacted")
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	// Moving blocks changes nothing the image reads: the modification UUID
	// stays.
	return im.pack(ctx, progress)
}

// Resize changes the virtual size. Growing extends the block map; when the
// map would run into the data area, the data blocks in the way are moved
// to the end of the file first. Shrinking is refused unless the cut-off
// range holds no data (free, zero, or all-zero blocks). Fixed and version 0
// images cannot be resized (as in VirtualBox).
func (im *image) Resize(ctx context.Context, size int64, prealloc string) error {
	if err := im.writable(-1); err != nil {
		return err
	}
	if prealloc != "" && prealloc != "off" {
		return driver.Unsupportedf(im.name, "VDI resize does not support preallocation=%s", prealloc)
	}
	if size < 0 {
		return driver.OptionErrorf("negative size %d", size)
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	im.meta.Lock()
	typ, major := im.hdr.typ, im.hdr.major()
	im.meta.Unlock()
	if typ == typeFixed {
		return driver.Unsupportedf(im.name, "a fixed VDI image cannot be resized")
	}
	if major == 0 {
		return driver.Unsupportedf(im.name, "a version 0 VDI image cannot be resized")
	}
	size = (size + sectorSize - 1) &^ (sectorSize - 1)
	old := im.Size()
	if size == old {
		return nil
	}
	nb := (size + im.bs - 1) / im.bs
	if nb > maxBlocks {
		return driver.OptionErrorf("size %d is too large for VDI with %d-byte blocks (at most %d blocks)", size, im.bs, maxBlocks)
	}
	im.touch()
	if size > old {
		return im.grow(ctx, size, nb)
	}
	return im.shrink(size, nb)
}

func (im *image) grow(ctx context.Context, size, nb int64) error {
	oldNB := int64(len(im.bmap))
	if nb <= oldNB {
		return im.commitSize(size, nb, nil, im.offData)
	}
	newMapEnd := im.offBlocks + 4*nb
	if newMapEnd <= im.offData {
		// The map has room: mark the new blocks free, then publish them.
		raw := bytes.Repeat([]byte{0xFF}, int(4*(nb-oldNB)))
		if _, err := im.f.WriteAt(raw, im.offBlocks+4*oldNB); err != nil {
			return driver.WithFile(err, "write block map", im.name)
		}
		if err := im.f.Sync(); err != nil {
			return driver.WithFile(err, "sync", im.name)
		}
		return im.commitSize(size, nb, im.grownMap(nb, 0), im.offData)
	}
	// Make the data area dense, then move the blocks in the way.
	if err := im.pack(nil, nil); err != nil {
		return err
	}
	count := im.count
	k := (newMapEnd - im.offData + im.tbs - 1) / im.tbs
	newOffData := im.offData + k*im.tbs
	if newOffData > 0xFFFFFFFF {
		return driver.OptionErrorf("size %d is too large for this VDI image: its block map would not fit below 4 GiB", size)
	}
	m := min(k, int64(count))
	base := max(int64(count), k)
	if m > 0 {
		owner := make([]int64, m)
		for b := range im.bmap {
			if e := im.entry(int64(b)); allocated(e) && int64(e) < m {
				owner[e] = int64(b)
			}
		}
		buf := im.bufs.Get()
		for j := range m {
			if err := ctx.Err(); err != nil {
				im.bufs.Put(buf)
				return err
			}
			if err := im.readData(buf, im.slotOff(uint32(j))); err != nil {
				im.bufs.Put(buf)
				return err
			}
			if _, err := im.f.WriteAt(buf, im.slotOff(uint32(base+j))); err != nil {
				im.bufs.Put(buf)
				return driver.WithFile(err, "move block", im.name)
			}
		}
		im.bufs.Put(buf)
		if err := im.f.Sync(); err != nil {
			return driver.WithFile(err, "sync", im.name)
		}
		// Point the moved blocks at their copies (still in the old
		// numbering); the blocks in the way are then unreferenced.
		for j := range m {
			if err := im.setEntry(owner[j], uint32(base+j)); err != nil {
				return err
			}
		}
		if err := im.f.Sync(); err != nil {
			return driver.WithFile(err, "sync", im.name)
		}
	}
	// Commit: the renumbered and extended map and the header with the new
	// data offset, block count and size, in one write (commitSize), then
	// synced.
	if fs, err := im.f.Size(); err != nil {
		return driver.WithFile(err, "stat", im.name)
	} else if fs < newOffData {
		if err := im.f.Truncate(newOffData); err != nil {
			return driver.WithFile(err, "extend", im.name)
		}
	}
	return im.commitSize(size, nb, im.grownMap(nb, uint32(k)), newOffData)
}

// grownMap returns the block map extended to nb free-padded entries, with
// the data block indices lowered by shift.
func (im *image) grownMap(nb int64, shift uint32) []uint32 {
	nm := make([]uint32, nb)
	for i := range nm {
		nm[i] = entFree
	}
	for b := range im.bmap {
		e := im.entry(int64(b))
		if allocated(e) {
			e -= shift
		}
		nm[b] = e
	}
	return nm
}

// commitSize writes the header with the new size, block count and data
// offset, syncs, and switches the image to them (nm: the new map, written
// with the header in one write; or nil to keep a prefix of the current
// one). The caller holds mu exclusively.
func (im *image) commitSize(size, nb int64, nm []uint32, offData int64) error {
	im.meta.Lock()
	shift := uint32((offData - im.offData) / im.tbs)
	oldHdr, oldMap, oldSpan := im.hdr, im.bmap, im.span
	oldHi, oldCursor := im.hiRef, im.cursor
	im.hdr.diskSize = uint64(size)
	im.hdr.blocks = uint32(nb)
	im.hdr.offData = uint32(offData)
	im.hiRef -= min(im.hiRef, shift)
	im.cursor = max(im.cursor-min(im.cursor, shift), im.hiRef)
	im.hdrDirty = true
	im.span = nil // the map's length changes
	var err error
	if nm != nil {
		im.bmap = nm
		err = im.writeMapLocked(0, nb)
	} else {
		im.bmap = im.bmap[:nb]
		err = im.writeHeaderLocked(false)
	}
	if err != nil {
		im.hdr, im.bmap, im.span = oldHdr, oldMap, oldSpan
		im.hiRef, im.cursor = oldHi, oldCursor
		im.meta.Unlock()
		return err
	}
	im.meta.Unlock()
	if err := im.f.Sync(); err != nil {
		return driver.WithFile(err, "sync", im.name)
	}
	im.offData = offData
	im.size.Store(size)
	return nil
}

func (im *image) shrink(size, nb int64) error {
	old := im.Size()
	buf := im.bufs.Get()
	defer im.bufs.Put(buf)
	for off := size; off < old; {
		b, in := off/im.bs, off%im.bs
		bl := im.blockLen(b)
		if e := im.entry(b); allocated(e) {
			if err := im.readData(buf[:bl-in], im.dataOff(e)+in); err != nil {
				return err
			}
			if !driver.IsZero(buf[:bl-in]) {
				return driver.OptionErrorf("cannot shrink %s to %d bytes: block %d (from %d) holds data in the range that would be cut off",
					im.name, size, b, b*im.bs)
			}
		}
		off = (b + 1) * im.bs
	}
	// Zero (not free) blocks: until the header is written, the cut range
	// must keep reading zeros, also over a parent.
	freed := false
	for b := nb; b < int64(len(im.bmap)); b++ {
		if allocated(im.entry(b)) {
			if err := im.setEntry(b, entZero); err != nil {
				return err
			}
			freed = true
		}
	}
	if freed {
		if err := im.f.Sync(); err != nil {
			return driver.WithFile(err, "sync", im.name)
		}
		if err := im.pack(nil, nil); err != nil {
			return err
		}
	}
	return im.commitSize(size, nb, nil, im.offData)
}

// Check verifies the block map against the file and the header, as
// VirtualBox's repair and qemu-img check do: entries pointing past the end
// of the file, indices not below the block count, data blocks referenced
// twice (cross-links), and an allocated block count the map does not
// match are corruptions; data blocks no entry references are leaks.
// RepairAll frees entries past the end (extends the file for a block cut
// short), frees the later of cross-linked entries, and packs the data area
// (which renumbers and fixes the count); RepairLeaks packs when that is safe.
func (im *image) Check(ctx context.Context, mode driver.RepairMode) (*driver.CheckResult, error) {
	if mode != driver.RepairNone {
		if im.ro {
			return nil, driver.Errorf(driver.ErrReadOnly, im.name, -1, "image opened read-only")
		}
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if !im.ro {
		im.meta.Lock()
		err := im.writeHeaderLocked(false)
		im.meta.Unlock()
		if err != nil {
			return nil, err
		}
	}
	res := &driver.CheckResult{}
	before, err := im.inspect(nil)
	if err != nil {
		return nil, err
	}
	if mode != driver.RepairNone && (before.corruptions > 0 || before.leaks > 0) {
		if err := im.repair(ctx, mode, before); err != nil {
			return nil, err
		}
	}
	after := before
	if mode != driver.RepairNone {
		if after, err = im.inspect(nil); err != nil {
			return nil, err
		}
		res.CorruptionsFixed = max(0, before.corruptions-after.corruptions)
		res.LeaksFixed = max(0, before.leaks-after.leaks)
		if after.corruptions == 0 {
			im.meta.Lock()
			im.broken = ""
			im.meta.Unlock()
		}
	}
	res.Corruptions = after.corruptions
	res.Leaks = after.leaks
	res.Messages = before.msgs
	if mode != driver.RepairNone && (res.CorruptionsFixed > 0 || res.LeaksFixed > 0) {
		for _, m := range after.msgs {
			res.Messages = append(res.Messages, "after repair: "+m)
		}
	}
	res.AllocatedClusters = int64(after.sc.count)
	res.TotalClusters = int64(len(im.bmap))
	res.ImageEndOffset = after.fileSize
	return res, nil
}

type inspection struct {
	sc          mapScan
	fileSize    int64
	corruptions int
	leaks       int
	msgs        []string
}

func (im *image) inspect(_ context.Context) (inspection, error) {
	fileSize, err := im.f.Size()
	if err != nil {
		return inspection{}, driver.WithFile(err, "stat", im.name)
	}
	sc := im.scan(fileSize, true)
	in := inspection{sc: sc, fileSize: fileSize}
	msg := func(format string, args ...any) { in.msgs = append(in.msgs, fmt.Sprintf(format, args...)) }
	for _, b := range sc.pastEOF {
		msg("ERROR: block %d points to data block %d, past the end of the file", b, im.entry(b))
	}
	for _, b := range sc.partial {
		msg("ERROR: block %d points to data block %d, which the end of the file cuts short", b, im.entry(b))
	}
	for _, b := range sc.tooLarge {
		msg("ERROR: block index %d too large, is %d", b, im.entry(b))
	}
	for _, d := range sc.dups {
		msg("ERROR: block %d uses data block %d, also used by block %d", d[0], im.entry(d[0]), d[1])
	}
	in.corruptions = len(sc.pastEOF) + len(sc.partial) + len(sc.tooLarge) + len(sc.dups)
	im.meta.Lock()
	hdrAlloc := im.hdr.allocated
	im.meta.Unlock()
	switch {
	case hdrAlloc != sc.count:
		msg("ERROR: allocated blocks mismatch: the block map has %d, the header says %d", sc.count, hdrAlloc)
		in.corruptions++
	case int64(hdrAlloc) <= sc.maxIdx:
		// Holes below the last data block in use: what a discard leaves
		// until pack fills them (or a kill in between). The data reads
		// right, and qemu-img check (which compares only the count) calls
		// it clean, but a writer trusting the count (VirtualBox, qemu)
		// would allocate over a data block in use: the holes are counted
		// as leaks below, which check -r leaks packs away.
		msg("Leaked data blocks below data block %d, which is in use: the allocated block count %d does not cover it until they are packed (check -r leaks)", sc.maxIdx, hdrAlloc)
	}
	if l := sc.slots - sc.used; l > 0 {
		in.leaks = int(l)
		msg("Leaked data blocks: %d of the %d in the file are not referenced", l, sc.slots)
	}
	return in, nil
}

func (im *image) repair(ctx context.Context, mode driver.RepairMode, in inspection) error {
	blocking := len(in.sc.pastEOF) + len(in.sc.dups)
	if mode == driver.RepairLeaks && blocking > 0 {
		return nil // packing needs a consistent map
	}
	if mode == driver.RepairAll {
		for _, b := range in.sc.pastEOF {
			if err := im.setEntry(b, entFree); err != nil {
				return err
			}
		}
		for _, d := range in.sc.dups {
			if err := im.setEntry(d[0], entFree); err != nil {
				return err
			}
		}
		var end int64
		for _, b := range in.sc.partial {
			end = max(end, im.slotOff(im.entry(b))+im.tbs)
		}
		if end > in.fileSize {
			if err := im.f.Truncate(end); err != nil {
				return driver.WithFile(err, "extend", im.name)
			}
		}
		if err := im.f.Sync(); err != nil {
			return driver.WithFile(err, "sync", im.name)
		}
	}
	return im.pack(nil, nil)
}
