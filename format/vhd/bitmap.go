package vhd

import "github.com/vdisk/vdisk/driver"

// Sector bitmaps. Every block of a dynamic or differencing image starts
// with a bitmap of one bit per sector, most significant bit first; a set
// bit means the sector holds data in this image, a clear bit that it reads
// as zeros (dynamic) or from the parent (differencing).
//
// The cache knows, per block, whether its bitmap is all ones (the common
// case: qemu and vdisk set every bit when they allocate a block of a
// dynamic image) and keeps the other bitmaps in a bounded map. Bits set by
// writes are written back on Flush (or when evicted), after the data they
// describe; a bitmap is never read from disk while it has unwritten bits.

const (
	bmUnknown uint8 = iota
	bmFull
	bmPartial
)

type bitmap struct {
	bits   []byte // bmBytes
	lo, hi int64  // dirty byte range [lo, hi); hi == 0: clean
}

type bmCache struct {
	state []uint8
	m     map[uint32]*bitmap
	max   int
}

// maxBitmapCache bounds the memory of cached partial bitmaps.
const maxBitmapCache = 32 << 20

func (c *bmCache) init(im *image) {
	c.state = make([]uint8, len(im.bat))
	c.m = make(map[uint32]*bitmap)
	c.max = max(64, int(maxBitmapCache/max(im.bmBytes, 1)))
}

func (im *image) bitIsSet(bits []byte, s int64) bool {
	return bits[s/8]&(0x80>>(s%8)) != 0
}

func (im *image) isFull(bits []byte) bool {
	n := im.spb
	for i := int64(0); i < n/8; i++ {
		if bits[i] != 0xFF {
			return false
		}
	}
	if r := n % 8; r != 0 {
		m := byte(0xFF << (8 - r))
		if bits[n/8]&m != m {
			return false
		}
	}
	return true
}

// bitmapLocked returns block b's bitmap: full, or its bits (the cache's
// slice; callers copy what they keep past the lock). The block must be
// allocated and good.
func (im *image) bitmapLocked(b int64) (full bool, bm *bitmap, err error) {
	switch im.bms.state[b] {
	case bmFull:
		if bm := im.bms.m[uint32(b)]; bm != nil {
			return true, bm, nil // full but not yet written back
		}
		return true, nil, nil
	case bmPartial:
		if bm := im.bms.m[uint32(b)]; bm != nil {
			return false, bm, nil
		}
	}
	bits := make([]byte, im.bmBytes)
	if err := driver.ReadFullAt(im.f, bits, int64(im.bat[b])*sectorSize); err != nil {
		return false, nil, driver.WithFile(err, "read bitmap", im.name)
	}
	if im.isFull(bits) {
		im.bms.state[b] = bmFull
		return true, nil, nil
	}
	im.bms.state[b] = bmPartial
	bm = &bitmap{bits: bits}
	if err := im.cachePutLocked(uint32(b), bm); err != nil {
		return false, nil, err
	}
	return false, bm, nil
}

func (im *image) cachePutLocked(b uint32, bm *bitmap) error {
	if len(im.bms.m) >= im.bms.max {
		// Evict one entry, preferring a clean one.
		var victim uint32
		var vbm *bitmap
		for k, v := range im.bms.m {
			victim, vbm = k, v
			if v.hi == 0 {
				break
			}
		}
		if vbm != nil {
			if err := im.writeBitmapLocked(victim, vbm); err != nil {
				return err
			}
			delete(im.bms.m, victim)
		}
	}
	im.bms.m[b] = bm
	return nil
}

func (im *image) writeBitmapLocked(b uint32, bm *bitmap) error {
	if bm.hi == 0 {
		return nil
	}
	pos := int64(im.bat[b]) * sectorSize
	if _, err := im.f.WriteAt(bm.bits[bm.lo:bm.hi], pos+bm.lo); err != nil {
		return driver.WithFile(err, "write bitmap", im.name)
	}
	bm.lo, bm.hi = 0, 0
	if im.bms.state[b] == bmFull {
		delete(im.bms.m, b)
	}
	return nil
}

// setBitsLocked sets the bits of sectors [s0, s1) of block b (allocated,
// bitmap already loaded by the caller's path) and schedules the write-back.
func (im *image) setBitsLocked(b int64, s0, s1 int64) error {
	full, bm, err := im.bitmapLocked(b)
	if err != nil || (full && bm == nil) {
		return err
	}
	changed := false
	for s := s0; s < s1; {
		i := s / 8
		if s%8 == 0 && s+8 <= s1 {
			if bm.bits[i] != 0xFF {
				bm.bits[i] = 0xFF
				bm.touch(i)
				changed = true
			}
			s += 8
			continue
		}
		m := byte(0x80 >> (s % 8))
		if bm.bits[i]&m == 0 {
			bm.bits[i] |= m
			bm.touch(i)
			changed = true
		}
		s++
	}
	if changed && im.isFull(bm.bits) {
		im.bms.state[b] = bmFull // stays in the map until written back
	}
	return nil
}

func (bm *bitmap) touch(i int64) {
	if bm.hi == 0 {
		bm.lo, bm.hi = i, i+1
		return
	}
	bm.lo = min(bm.lo, i)
	bm.hi = max(bm.hi, i+1)
}

func (im *image) flushBitmapsLocked() error {
	if im.bms.m == nil {
		return nil
	}
	for b, bm := range im.bms.m {
		if err := im.writeBitmapLocked(b, bm); err != nil {
			return err
		}
	}
	return nil
}

// dropBitmapLocked forgets block b's bitmap (its block was freed or moved
// after a write-back).
func (im *image) dropBitmapLocked(b int64) {
	delete(im.bms.m, uint32(b))
	im.bms.state[b] = bmUnknown
}
