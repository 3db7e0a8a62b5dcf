package vhdx

import (
	"context"
	"encoding/binary"

	"github.com/vdisk/vdisk/driver"
)

// Resize changes the virtual disk size through the log (the size item,
// the BAT and, when the BAT moves, the region tables are committed in one
// entry).
//
// Growing adds NOT_PRESENT entries (fixed images: allocated, ZERO); when
// the BAT region cannot hold them, the whole BAT is written to new space
// first and the region tables are switched to it by the commit, after
// which the old BAT region is free space.
//
// Shrinking drops what lies past the new end, as qemu-img resize --shrink
// does for the formats it shrinks (the resize command asks for --shrink
// before it gets here): the blocks and sector bitmaps wholly past the new
// end are freed (their BAT entries NOT_PRESENT, committed with the new
// size in one log entry), and the file is cut where its last used space
// ends. The part of a block cut in two past the new end stays in the file
// and is zeroed by a later grow.
func (im *image) Resize(ctx context.Context, size int64, prealloc string) error {
	if im.ro {
		return im.readOnlyErr(-1)
	}
	if prealloc != "" && prealloc != "off" {
		return driver.Unsupportedf(im.name, "preallocation=%s on resize", prealloc)
	}
	if size <= 0 {
		return driver.OptionErrorf("VHDX disk size must be at least one sector, not %d", size)
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	size = roundUp(size, im.p.logicalSector)
	if size == im.p.diskSize {
		return nil
	}
	if size > maxDiskSize {
		return driver.OptionErrorf("VHDX disk size %d is larger than 64 TiB", size)
	}
	sizeOff, err := im.metaItemOffLocked(guidDiskSize, 8)
	if err != nil {
		return err
	}
	shrink := size < im.p.diskSize
	if err := im.startSessionLocked(); err != nil {
		return err
	}
	if shrink {
		im.shrinkLocked(size)
	} else if err := im.growLocked(size); err != nil {
		return err
	}
	if err := im.setBytesLocked(sizeOff, u64le(uint64(size))); err != nil {
		return err
	}
	im.p.diskSize = size
	if err := im.commitLocked(); err != nil {
		return err
	}
	if shrink {
		return im.trimTailLocked()
	}
	return nil
}

// metaItemOffLocked is the file offset of a metadata item of at least n
// bytes.
func (im *image) metaItemOffLocked(id guid, n uint32) (int64, error) {
	for _, m := range im.metaEnt {
		if m.id == id && m.length >= n {
			return im.metaOff + int64(m.off), nil
		}
	}
	return 0, im.corrupt(im.metaOff, "the metadata has no %s item", id)
}

// freeEntryLocked makes BAT entry i NOT_PRESENT, freeing its space once
// committed. The space of an unusable entry (pointing into metadata or
// another block) is not its own and stays as it is.
func (im *image) freeEntryLocked(i int64) {
	e := im.bat[i]
	if e == 0 {
		return
	}
	if off := int64(e >> 20 << 20); off != 0 && im.bad[i] == "" {
		size := im.p.blockSize
		if im.isBitmapIndex(i) {
			size = mib
		}
		im.punch = append(im.punch, span{off, off + size})
	}
	im.setEntryLocked(i, stNotPresent, 0)
	delete(im.bad, i)
}

func (im *image) shrinkLocked(size int64) {
	bs := im.p.blockSize
	nb := (size + bs - 1) / bs
	for b := nb; b < im.nBlocks; b++ {
		im.freeEntryLocked(im.payloadIndex(b))
	}
	total := batEntries(nb, im.chunkRatio, im.p.hasParent)
	for i := total; i < int64(len(im.bat)); i++ {
		im.freeEntryLocked(i)
	}
	// Chunks past the new end lose their sector bitmaps.
	for c := range im.bitmaps {
		if im.bitmapIndex(c) >= total {
			delete(im.bitmaps, c)
			delete(im.dirtyBM, c)
		}
	}
	im.bat = im.bat[:total]
	im.nBlocks = nb
}

func (im *image) growLocked(size int64) error {
	bs := im.p.blockSize
	nb := (size + bs - 1) / bs
	total := batEntries(nb, im.chunkRatio, im.p.hasParent)
	// What this image still holds past the old end of its last block
	// must read zeros in the grown range.
	if last := im.nBlocks - 1; last >= 0 && im.p.diskSize%bs != 0 {
		st, foff, err := im.blockEntryLocked(last)
		if err == nil && (st == stFull || st == stPartial) && foff != 0 {
			tail := im.p.diskSize % bs
			if err := writeZeros(im.f, foff+tail, bs-tail); err != nil {
				return err
			}
		}
	}
	old := int64(len(im.bat))
	im.bat = append(im.bat, make([]uint64, total-old)...)
	for i := old; i < total; i++ {
		im.dirtyBAT[i*8/logSector] = true
	}
	for b := im.nBlocks; b < nb; b++ {
		if im.p.leaveAllocated {
			off, err := im.allocLocked(bs)
			if err != nil {
				return err
			}
			im.setEntryLocked(im.payloadIndex(b), stZero, off)
		}
	}
	im.nBlocks = nb
	if total*8 > im.batLen {
		return im.moveBATLocked()
	}
	return nil
}

// moveBATLocked writes the whole BAT into new space (free, so nothing
// committed points at it) and points the region tables at it; the commit
// switches both copies in one log entry, and frees the old region.
func (im *image) moveBATLocked() error {
	n := roundUp(int64(len(im.bat))*8, mib)
	if n > 1<<32-mib {
		return driver.Unsupportedf(im.name, "a BAT of %d bytes does not fit a region table entry", n)
	}
	off, err := im.takeFreeLocked(n, im.fileEnd, false)
	if err != nil {
		return err
	}
	if off < 0 {
		off = im.fileEnd
		im.fileEnd += n
	}
	buf := make([]byte, min(n, mib))
	for pos := int64(0); pos < n; pos += int64(len(buf)) {
		clear(buf)
		for k := int64(0); k < int64(len(buf))/8; k++ {
			if i := pos/8 + k; i < int64(len(im.bat)) {
				binary.LittleEndian.PutUint64(buf[8*k:], im.bat[i])
			}
		}
		if _, err := im.f.WriteAt(buf, off+pos); err != nil {
			return err
		}
	}
	ents := append([]regionEntry(nil), im.regions...)
	for i := range ents {
		if ents[i].id == guidBAT {
			ents[i].off, ents[i].length = uint64(off), uint32(n)
		}
	}
	tbl := marshalRegionTable(ents)
	for _, r := range []int64{region1Off, region2Off} {
		if err := im.setBytesLocked(r, tbl); err != nil {
			return err
		}
	}
	im.punch = append(im.punch, span{im.batOff, im.batOff + im.batLen})
	im.batOff, im.batLen, im.regions = off, n, ents
	// Every entry is in the new region already.
	im.dirtyBAT = map[int64]bool{}
	return nil
}

// usedEndLocked is where the last space something refers to ends.
func (im *image) usedEndLocked() int64 {
	end := int64(headerArea)
	for _, u := range im.usedSpansLocked() {
		end = max(end, u.end)
	}
	return end
}

// trimTailLocked cuts the file where its used space ends, once everything
// is committed. The log is closed first (a header with a zero log GUID,
// after a sync): a log entry recording the longer file would otherwise
// make the cut file look truncated to a replay.
func (im *image) trimTailLocked() error {
	end := im.usedEndLocked()
	fsize, err := im.f.Size()
	if err != nil || end >= fsize {
		return err
	}
	if err := im.endSessionLocked(true); err != nil {
		return err
	}
	if err := im.f.Sync(); err != nil {
		return err
	}
	if err := im.f.Truncate(end); err != nil {
		return err
	}
	if err := im.f.Sync(); err != nil {
		return err
	}
	im.fileEnd = roundUp(end, mib)
	kept := im.free[:0]
	for _, s := range im.free {
		if s.off < im.fileEnd {
			s.end = min(s.end, im.fileEnd)
			kept = append(kept, s)
		}
	}
	im.free = kept
	return nil
}
