package vdi

import (
	"bytes"
	"encoding/binary"
	"fmt"

	"github.com/vdisk/vdisk/driver"
)

// On-disk layout constants (all fields little-endian).
const (
	preHeaderSize = 72         // 64 bytes of text, signature, version
	sigOffset     = 64         // u32 signature in the pre-header
	verOffset     = 68         // u32 version (major << 16 | minor)
	signature     = 0xBEDA107F // VDI image signature
	version11     = 0x00010001 // the version we create

	hdrV0Size     = 348 // header of version 0.x
	hdrV1Size     = 384 // header of version 1.x without the LCHS geometry
	hdrV1PlusSize = 400 // header of version 1.1 with the LCHS geometry

	commentSize = 256
	sectorSize  = 512

	// Image types.
	typeNormal = 1 // dynamic base image
	typeFixed  = 2 // preallocated base image
	typeUndo   = 3 // read as a dynamic image
	typeDiff   = 4 // differencing image

	// flagZeroExpand is the only image flag VirtualBox defines.
	flagZeroExpand = 1

	// Block map entries at or above entZero are not data block indices.
	entFree = 0xFFFFFFFF // unallocated: falls through to the parent
	entZero = 0xFFFFFFFE // reads as zeros

	defaultBlockSize = 1 << 20
	minBlockSize     = 512
	maxBlockSize     = 64 << 20
	// maxBlockExtra bounds the per-block extra data (VirtualBox itself
	// always creates 0).
	maxBlockExtra = 1 << 20
	// maxBlocks bounds the block map (2 GiB of entries, as qemu does).
	maxBlocks = (1<<31 - sectorSize) / 4
)

// fileInfoText is the human-readable text of the pre-header VirtualBox
// writes; it is for eyes only.
const fileInfoText = "<<< Oracle VM VirtualBox Disk Image >>>\n"

// geometry is the on-disk VDIDISKGEOMETRY: C/H/S and sector size.
type geometry struct {
	c, h, s, sectorSize uint32
}

func (g geometry) set() bool { return g.c > 0 && g.h > 0 && g.s > 0 }

func (g geometry) chs() driver.CHS { return driver.CHS{Cylinders: g.c, Heads: g.h, Sectors: g.s} }

// header is the pre-header and header of any version, decoded.
type header struct {
	text    [64]byte
	version uint32
	// size is cbHeader for version 1 (384 or 400, or more from a future
	// writer); hdrV0Size for version 0 (which does not record it).
	size       uint32
	typ        uint32
	flags      uint32
	comment    [commentSize]byte
	offBlocks  uint32
	offData    uint32
	legacy     geometry
	dummy      uint32
	diskSize   uint64
	blockSize  uint32
	blockExtra uint32
	blocks     uint32
	allocated  uint32
	// UUIDs in RFC 4122 byte order (the file stores the first three fields
	// little-endian, as VirtualBox's RTUUID does).
	uuid, modUUID, parentUUID, parentModUUID UUID
	lchs                                     geometry
}

func (h *header) major() uint32 { return h.version >> 16 }

// hasLCHS reports whether the header has room for the LCHS geometry.
func (h *header) hasLCHS() bool { return h.major() == 1 && h.size >= hdrV1PlusSize }

// bodySize is the size of the header body (after the pre-header) we read
// and write.
func (h *header) bodySize() int {
	switch {
	case h.major() == 0:
		return hdrV0Size
	case h.size >= hdrV1PlusSize:
		return hdrV1PlusSize
	}
	return hdrV1Size
}

// diskUUID converts between the file's byte order and RFC 4122 order (the
// conversion is its own inverse).
func diskUUID(b []byte) UUID {
	var u UUID
	u[0], u[1], u[2], u[3] = b[3], b[2], b[1], b[0]
	u[4], u[5] = b[5], b[4]
	u[6], u[7] = b[7], b[6]
	copy(u[8:], b[8:16])
	return u
}

func putDiskUUID(b []byte, u UUID) {
	d := diskUUID(u[:])
	copy(b, d[:])
}

func getGeom(b []byte) geometry {
	le := binary.LittleEndian
	return geometry{le.Uint32(b), le.Uint32(b[4:]), le.Uint32(b[8:]), le.Uint32(b[12:])}
}

func putGeom(b []byte, g geometry) {
	le := binary.LittleEndian
	le.PutUint32(b, g.c)
	le.PutUint32(b[4:], g.h)
	le.PutUint32(b[8:], g.s)
	le.PutUint32(b[12:], g.sectorSize)
}

// readHeader reads and decodes the pre-header and header of f (fileSize
// bytes long) without validating the header's values.
func readHeader(f driver.File, name string, fileSize int64) (*header, error) {
	if fileSize < preHeaderSize {
		return nil, driver.Corruptf(name, 0, "file of %d bytes is too small for a VDI pre-header", fileSize)
	}
	buf := make([]byte, preHeaderSize+hdrV1PlusSize)
	n := min(int64(len(buf)), fileSize)
	if err := driver.ReadFullAt(f, buf[:n], 0); err != nil {
		return nil, driver.WithFile(err, "read header", name)
	}
	le := binary.LittleEndian
	if le.Uint32(buf[sigOffset:]) != signature {
		return nil, driver.Corruptf(name, sigOffset, "bad VDI signature 0x%08x (want 0x%08x)", le.Uint32(buf[sigOffset:]), uint32(signature))
	}
	h := &header{version: le.Uint32(buf[verOffset:])}
	copy(h.text[:], buf[:64])
	b := buf[preHeaderSize:n]
	switch h.major() {
	case 0:
		if len(b) < hdrV0Size {
			return nil, driver.Corruptf(name, preHeaderSize, "file too small for a version %d.%d VDI header", h.major(), h.version&0xffff)
		}
		h.size = hdrV0Size
		h.typ = le.Uint32(b[0:])
		h.flags = le.Uint32(b[4:])
		copy(h.comment[:], b[8:264])
		h.legacy = getGeom(b[264:])
		h.diskSize = le.Uint64(b[280:])
		h.blockSize = le.Uint32(b[288:])
		h.blocks = le.Uint32(b[292:])
		h.allocated = le.Uint32(b[296:])
		h.uuid = diskUUID(b[300:])
		h.modUUID = diskUUID(b[316:])
		h.parentUUID = diskUUID(b[332:])
		h.offBlocks = preHeaderSize + hdrV0Size
		// offData is derived from the block count; computed in 64 bits by
		// the validator, stored here only when it fits.
		if end := uint64(h.offBlocks) + uint64(h.blocks)*4; end <= 0xFFFFFFFF {
			h.offData = uint32(end)
		} else {
			h.offData = 0xFFFFFFFF
		}
	case 1:
		if len(b) < hdrV1Size {
			return nil, driver.Corruptf(name, preHeaderSize, "file too small for a version 1 VDI header")
		}
		h.size = le.Uint32(b[0:])
		if h.size < hdrV1Size {
			return nil, driver.Corruptf(name, preHeaderSize, "VDI header size %d is smaller than %d", h.size, hdrV1Size)
		}
		if h.size >= hdrV1PlusSize && len(b) < hdrV1PlusSize {
			return nil, driver.Corruptf(name, preHeaderSize, "file too small for a %d-byte VDI header", h.size)
		}
		h.typ = le.Uint32(b[4:])
		h.flags = le.Uint32(b[8:])
		copy(h.comment[:], b[12:268])
		h.offBlocks = le.Uint32(b[268:])
		h.offData = le.Uint32(b[272:])
		h.legacy = getGeom(b[276:])
		h.dummy = le.Uint32(b[292:])
		h.diskSize = le.Uint64(b[296:])
		h.blockSize = le.Uint32(b[304:])
		h.blockExtra = le.Uint32(b[308:])
		h.blocks = le.Uint32(b[312:])
		h.allocated = le.Uint32(b[316:])
		h.uuid = diskUUID(b[320:])
		h.modUUID = diskUUID(b[336:])
		h.parentUUID = diskUUID(b[352:])
		h.parentModUUID = diskUUID(b[368:])
		if h.size >= hdrV1PlusSize {
			h.lchs = getGeom(b[384:])
		}
	default:
		return nil, driver.Unsupportedf(name, "VDI version %d.%d is not supported (only 0.x and 1.x)", h.major(), h.version&0xffff)
	}
	return h, nil
}

// validate bounds every field against the format's limits and the file
// size, before anything is allocated from them.
func (h *header) validate(name string, fileSize int64) error {
	c := func(off int64, format string, args ...any) error { return driver.Corruptf(name, off, format, args...) }
	v1 := h.major() == 1
	// Offsets of the fields, for error messages.
	fo := func(v0, v1off int64) int64 {
		if v1 {
			return preHeaderSize + v1off
		}
		return preHeaderSize + v0
	}
	if h.typ < typeNormal || h.typ > typeDiff {
		return c(fo(0, 4), "invalid VDI image type %d", h.typ)
	}
	if h.flags&^flagZeroExpand != 0 {
		return c(fo(4, 8), "unknown VDI image flags 0x%x", h.flags)
	}
	bs := uint64(h.blockSize)
	if bs < minBlockSize || bs > maxBlockSize || bs&(bs-1) != 0 {
		return c(fo(288, 304), "invalid block size %d (a power of two from %d to %d)", h.blockSize, minBlockSize, maxBlockSize)
	}
	if x := uint64(h.blockExtra); x != 0 && (x&(x-1) != 0 || x > maxBlockExtra) {
		return c(fo(0, 308), "invalid extra block data size %d (0 or a power of two up to %d)", h.blockExtra, maxBlockExtra)
	}
	if h.blocks > maxBlocks {
		return c(fo(292, 312), "block count %d exceeds the limit of %d", h.blocks, maxBlocks)
	}
	if h.diskSize > uint64(h.blocks)*bs {
		return c(fo(280, 296), "disk size %d is larger than the %d blocks of %d bytes the block map covers", h.diskSize, h.blocks, h.blockSize)
	}
	if h.allocated > h.blocks {
		return c(fo(296, 316), "%d blocks allocated out of %d", h.allocated, h.blocks)
	}
	minBlocksOff := uint64(preHeaderSize + hdrV1Size)
	if !v1 {
		minBlocksOff = preHeaderSize + hdrV0Size
	}
	if uint64(h.offBlocks) < minBlocksOff {
		return c(fo(0, 268), "block map offset %d overlaps the header", h.offBlocks)
	}
	if h.size >= hdrV1PlusSize && uint64(h.offBlocks) < preHeaderSize+hdrV1PlusSize {
		return c(fo(0, 268), "block map offset %d overlaps the %d-byte header", h.offBlocks, h.size)
	}
	mapEnd := uint64(h.offBlocks) + uint64(h.blocks)*4
	if !v1 && mapEnd > 0xFFFFFFFF {
		return c(fo(292, 312), "block map of %d entries does not fit a version 0 image", h.blocks)
	}
	if uint64(h.offData) < mapEnd {
		return c(fo(0, 272), "data offset %d overlaps the block map (which ends at %d)", h.offData, mapEnd)
	}
	if int64(h.offData) > fileSize {
		return c(fo(0, 272), "data offset %d is past the end of the %d-byte file", h.offData, fileSize)
	}
	if h.typ == typeDiff && h.parentUUID == nilUUID {
		return c(fo(332, 352), "differencing image without a parent UUID")
	}
	return nil
}

// encodeBody encodes the header body (what follows the pre-header) in the
// header's own version and size.
func (h *header) encodeBody() []byte {
	b := make([]byte, h.bodySize())
	le := binary.LittleEndian
	if h.major() == 0 {
		le.PutUint32(b[0:], h.typ)
		le.PutUint32(b[4:], h.flags)
		copy(b[8:264], h.comment[:])
		putGeom(b[264:], h.legacy)
		le.PutUint64(b[280:], h.diskSize)
		le.PutUint32(b[288:], h.blockSize)
		le.PutUint32(b[292:], h.blocks)
		le.PutUint32(b[296:], h.allocated)
		putDiskUUID(b[300:], h.uuid)
		putDiskUUID(b[316:], h.modUUID)
		putDiskUUID(b[332:], h.parentUUID)
		return b
	}
	le.PutUint32(b[0:], h.size)
	le.PutUint32(b[4:], h.typ)
	le.PutUint32(b[8:], h.flags)
	copy(b[12:268], h.comment[:])
	le.PutUint32(b[268:], h.offBlocks)
	le.PutUint32(b[272:], h.offData)
	putGeom(b[276:], h.legacy)
	le.PutUint32(b[292:], h.dummy)
	le.PutUint64(b[296:], h.diskSize)
	le.PutUint32(b[304:], h.blockSize)
	le.PutUint32(b[308:], h.blockExtra)
	le.PutUint32(b[312:], h.blocks)
	le.PutUint32(b[316:], h.allocated)
	putDiskUUID(b[320:], h.uuid)
	putDiskUUID(b[336:], h.modUUID)
	putDiskUUID(b[352:], h.parentUUID)
	putDiskUUID(b[368:], h.parentModUUID)
	if len(b) >= hdrV1PlusSize {
		putGeom(b[384:], h.lchs)
	}
	return b
}

// encodePre encodes the pre-header.
func (h *header) encodePre() []byte {
	b := make([]byte, preHeaderSize)
	copy(b, h.text[:])
	binary.LittleEndian.PutUint32(b[sigOffset:], signature)
	binary.LittleEndian.PutUint32(b[verOffset:], h.version)
	return b
}

// commentString returns the comment up to its NUL (at most 255 bytes, as
// VirtualBox treats an unterminated comment).
func (h *header) commentString() string {
	c := h.comment[:commentSize-1]
	if i := bytes.IndexByte(c, 0); i >= 0 {
		c = c[:i]
	}
	return string(c)
}

func (h *header) setComment(s string) error {
	if len(s) >= commentSize {
		return driver.OptionErrorf("VDI comment of %d bytes is too long (at most %d)", len(s), commentSize-1)
	}
	if bytes.IndexByte([]byte(s), 0) >= 0 {
		return driver.OptionErrorf("VDI comment contains a NUL byte")
	}
	clear(h.comment[:])
	copy(h.comment[:], s)
	return nil
}

func (h *header) typeName() string {
	switch h.typ {
	case typeNormal:
		return "dynamic"
	case typeFixed:
		return "fixed"
	case typeUndo:
		return "undo"
	case typeDiff:
		return "diff"
	}
	return fmt.Sprintf("type-%d", h.typ)
}

// uuidString formats u, or "" for the nil UUID (not recorded).
func uuidString(u UUID) string {
	if u == nilUUID {
		return ""
	}
	return u.String()
}

// parseUUID parses s ("" is the nil UUID).
func parseUUID(s string) (UUID, error) {
	if s == "" {
		return nilUUID, nil
	}
	u, err := parseUUIDText(s)
	if err != nil {
		return nilUUID, driver.OptionErrorf("invalid UUID %q: %v", s, err)
	}
	return u, nil
}
