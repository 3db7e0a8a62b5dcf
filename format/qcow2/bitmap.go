package qcow2

import (
	"encoding/binary"

	"github.com/vdisk/vdisk/driver"
)

const (
	bitmapInUse = 1 << 0
	bitmapAuto  = 1 << 1
)

// bitmapInfo is one entry of the bitmap directory. Bitmaps are kept as they
// are; their clusters are accounted for by the refcount checks.
type bitmapInfo struct {
	tableOffset uint64
	tableSize   uint32
	flags       uint32
	typ         uint8
	granBits    uint8
	name        string
}

// loadBitmaps parses the bitmap directory.
func (im *image) loadBitmaps() error {
	b := im.hdr.bitmaps
	if b == nil {
		return nil
	}
	dir := make([]byte, b.dirSize)
	if err := driver.ReadFullAt(im.f, dir, int64(b.dirOffset)); err != nil {
		return driver.Corruptf(im.name, int64(b.dirOffset), "cannot read the bitmap directory: %v", err)
	}
	fsize := im.fileEnd
	off := int64(0)
	for i := uint32(0); i < b.nbBitmaps; i++ {
		at := int64(b.dirOffset) + off
		if off+24 > int64(len(dir)) {
			return driver.Corruptf(im.name, at, "bitmap directory entry %d runs past the directory", i)
		}
		e := dir[off:]
		bm := bitmapInfo{
			tableOffset: be64(e),
			tableSize:   be32(e[8:]),
			flags:       be32(e[12:]),
			typ:         e[16],
			granBits:    e[17],
		}
		nameLen := int64(uint16(e[18])<<8 | uint16(e[19]))
		extra := int64(be32(e[20:]))
		if nameLen == 0 || nameLen > 1023 || extra > 1<<20 {
			return driver.Corruptf(im.name, at, "bitmap directory entry %d has an invalid name or extra data size", i)
		}
		entLen := bitmapDirEntrySize(int(nameLen), int(extra))
		if off+24+extra+nameLen > int64(len(dir)) {
			return driver.Corruptf(im.name, at, "bitmap directory entry %d runs past the directory", i)
		}
		bm.name = string(e[24+extra : 24+extra+nameLen])
		if bm.granBits > 63 {
			return driver.Corruptf(im.name, at, "bitmap %q has granularity bits %d", bm.name, bm.granBits)
		}
		if bm.tableSize > 0 {
			if err := im.checkTable("bitmap table of "+bm.name, -1, bm.tableOffset, int64(bm.tableSize)*8, fsize); err != nil {
				return err
			}
		}
		im.bitmaps = append(im.bitmaps, bm)
		off += entLen
	}
	return nil
}

// hasAutoBitmap reports whether some bitmap is enabled (tracks writes).
func (im *image) hasAutoBitmap() bool {
	for _, b := range im.bitmaps {
		if b.flags&bitmapAuto != 0 {
			return true
		}
	}
	return false
}

// bitmapTable reads the table of bitmap b.
func (im *image) bitmapTable(b *bitmapInfo) ([]uint64, error) {
	raw := make([]byte, int64(b.tableSize)*8)
	if err := driver.ReadFullAt(im.f, raw, int64(b.tableOffset)); err != nil {
		return nil, driver.Corruptf(im.name, int64(b.tableOffset), "cannot read the table of bitmap %q: %v", b.name, err)
	}
	out := make([]uint64, b.tableSize)
	for i := range out {
		out[i] = be64(raw[i*8:])
	}
	return out, nil
}

// markBitmapsInUse sets the in-use flag of every enabled bitmap before the
// first write: we do not update bitmaps, so they stop being consistent.
// Disabled bitmaps do not track writes and stay valid. Callers hold mu.
func (im *image) markBitmapsInUse() error {
	b := im.hdr.bitmaps
	if b == nil || im.hdr.autoclear&autoclearBitmaps == 0 || !im.hasAutoBitmap() {
		return nil
	}
	dir := make([]byte, b.dirSize)
	if err := driver.ReadFullAt(im.f, dir, int64(b.dirOffset)); err != nil {
		return err
	}
	off := int64(0)
	changed := false
	for i := range im.bitmaps {
		e := dir[off:]
		nameLen := int64(uint16(e[18])<<8 | uint16(e[19]))
		extra := int64(be32(e[20:]))
		if fl := be32(e[12:]); fl&bitmapAuto != 0 && fl&bitmapInUse == 0 {
			binary.BigEndian.PutUint32(e[12:], fl|bitmapInUse)
			im.bitmaps[i].flags = fl | bitmapInUse
			changed = true
		}
		off += bitmapDirEntrySize(int(nameLen), int(extra))
	}
	if !changed {
		return nil
	}
	if _, err := im.f.WriteAt(dir, int64(b.dirOffset)); err != nil {
		return err
	}
	return im.f.Sync()
}

// bitmapDirEntrySize is the size of a bitmap directory entry: 24 bytes of
// fields, the extra data and the name, padded to 8 bytes.
func bitmapDirEntrySize(nameLen, extra int) int64 {
	return (24 + int64(extra) + int64(nameLen) + 7) &^ 7
}

// PersistentBitmaps lists the image's bitmaps (driver.BitmapLister).
func (im *image) PersistentBitmaps() ([]driver.Bitmap, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	out := make([]driver.Bitmap, 0, len(im.bitmaps))
	for _, b := range im.bitmaps {
		out = append(out, driver.Bitmap{Name: b.name, Granularity: int64(1) << b.granBits, Size: im.size})
	}
	return out, nil
}
