package vdi

import (
	"encoding/binary"
	"errors"
	"io"
	"sync/atomic"

	"github.com/vdisk/vdisk/driver"
)

// maxSpanGap bounds the bytes between the header and the block map that
// the driver keeps in memory to write the header and the map in one go
// (VirtualBox leaves almost 1 MiB there).
const maxSpanGap = 2 << 20

// The header's allocated-block count is what qemu-img check and vdisk's
// Check compare with the block map, so it must match the map in the file
// at every moment a writer can be killed: between any two write(2) calls.
// Two writes (the entry, then the count, or the other way) always leave
// one moment where they disagree. So every change of map entries is
// written together with the header in a single write covering the header,
// whatever lies between it and the map (kept as read), and the map up to
// the last changed entry. Images we create put the map right after the
// header (as qemu does), so that write is small: the whole map of a
// 256 MiB image with 1 MiB blocks shares the first page with the header.
// Where the gap is larger than maxSpanGap, the entries are written first
// and the header right after them (the short window VirtualBox and qemu
// have too).

// buildSpanLocked makes im.span, the file's bytes from the end of the
// pre-header to the end of the block map; the caller holds meta and has
// mu held (shared by an allocation, exclusively by layout changes).
func (im *image) buildSpanLocked() error {
	body := im.hdr.encodeBody()
	gapLo := preHeaderSize + int64(len(body))
	if im.offBlocks < gapLo || im.offBlocks-gapLo > maxSpanGap {
		im.noSpan = true
		return nil
	}
	n := int64(len(im.bmap))
	sp := make([]byte, im.offBlocks-preHeaderSize+4*n)
	if gap := sp[gapLo-preHeaderSize : im.offBlocks-preHeaderSize]; len(gap) > 0 {
		if _, err := im.f.ReadAt(gap, gapLo); err != nil && !errors.Is(err, io.EOF) {
			return driver.WithFile(err, "read header gap", im.name)
		}
	}
	m := sp[im.offBlocks-preHeaderSize:]
	for i := range n {
		binary.LittleEndian.PutUint32(m[4*i:], im.entry(i))
	}
	im.span = sp
	return nil
}

// writeMapLocked writes the header (with the allocated count of the map
// as it is in memory) and the entries [lo, hi) of the block map, which
// the caller has already stored in im.bmap, in one write. The caller
// holds meta.
func (im *image) writeMapLocked(lo, hi int64) error {
	if hi <= lo {
		return im.writeHeaderLocked(true)
	}
	if im.span == nil && !im.noSpan {
		if err := im.buildSpanLocked(); err != nil {
			return err
		}
	}
	im.hdr.allocated = im.count
	if im.noSpan {
		raw := make([]byte, 4*(hi-lo))
		for i := lo; i < hi; i++ {
			binary.LittleEndian.PutUint32(raw[4*(i-lo):], im.entry(i))
		}
		if _, err := im.f.WriteAt(raw, im.offBlocks+4*lo); err != nil {
			return driver.WithFile(err, "write block map", im.name)
		}
		return im.writeHeaderLocked(true)
	}
	m := im.span[im.offBlocks-preHeaderSize:]
	for i := lo; i < hi; i++ {
		binary.LittleEndian.PutUint32(m[4*i:], im.entry(i))
	}
	copy(im.span, im.hdr.encodeBody())
	end := im.offBlocks - preHeaderSize + 4*hi
	if _, err := im.f.WriteAt(im.span[:end], preHeaderSize); err != nil {
		// What reached the file is unknown: build the copy again from
		// the file's own gap next time.
		im.span = nil
		return driver.WithFile(err, "write block map", im.name)
	}
	im.hdrDirty = false
	return nil
}

// setEntriesLocked stores vals as the entries of blocks b, b+1, ... and
// writes them with the header; the counts follow. On a failed write the
// entries and counts are restored. The caller holds meta.
func (im *image) setEntriesLocked(b int64, vals []uint32) error {
	old := make([]uint32, len(vals))
	count, hiRef := im.count, im.hiRef
	for j, v := range vals {
		o := atomic.SwapUint32(&im.bmap[b+int64(j)], v)
		old[j] = o
		if allocated(o) {
			im.count--
		}
		if allocated(v) {
			im.count++
			im.hiRef = max(im.hiRef, v+1)
		}
	}
	if err := im.writeMapLocked(b, b+int64(len(vals))); err != nil {
		for j, o := range old {
			atomic.StoreUint32(&im.bmap[b+int64(j)], o)
		}
		im.count, im.hiRef = count, hiRef
		return err
	}
	return nil
}
