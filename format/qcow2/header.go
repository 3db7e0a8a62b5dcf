package qcow2

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"strings"

	"github.com/vdisk/vdisk/driver"
)

const (
	qcowMagic = 0x514649fb

	minClusterBits = 9
	maxClusterBits = 21

	// Implementation limits (the same as qemu's, so that every image qemu
	// can open opens here and vice versa).
	maxL1Bytes          = 32 << 20
	maxRefTableBytes    = 8 << 20
	maxSnapshots        = 65536
	maxSnapshotTable    = 1024 * maxSnapshots
	maxSnapshotExtra    = 1024
	maxBitmaps          = 65535
	maxBitmapDirSize    = 1024 * maxBitmaps
	maxBackingNameLen   = 1023
	maxDataFileNameLen  = 4096
	maxHostOffset       = 1<<56 - 1
	v2HeaderLen         = 72
	v3HeaderLen         = 104
	ourV3HeaderLen      = 112 // with compression_type and padding
	l1EntrySize         = 8
	refTableEntrySize   = 8
	subclustersPerClust = 32
)

// Entry bits.
const (
	oflagCopied     = uint64(1) << 63
	oflagCompressed = uint64(1) << 62
	oflagZero       = uint64(1)
	// offMask selects bits 9-55 of L1/L2 entries (host cluster offsets).
	offMask = uint64(0x00fffffffffffe00)
	// refTableOffMask selects bits 9-63 of refcount table entries.
	refTableOffMask = ^uint64(0x1ff)
	// l1ReservedMask: bits 1-8 and 56-62 of an L1 entry must be zero.
	l1ReservedMask = uint64(0x7f000000000001fe)
	// l2ReservedMask: bits 1-8 and 56-61 of a standard L2 entry.
	l2ReservedMask = uint64(0x3f000000000001fe)
	allAllocBits   = uint64(0xffffffff)
	allZeroBits    = uint64(0xffffffff) << 32
)

// Feature bits.
const (
	incompatDirty       = uint64(1) << 0
	incompatCorrupt     = uint64(1) << 1
	incompatDataFile    = uint64(1) << 2
	incompatCompression = uint64(1) << 3
	incompatExtL2       = uint64(1) << 4
	incompatKnown       = incompatDirty | incompatCorrupt | incompatDataFile | incompatCompression | incompatExtL2

	compatLazyRefcounts = uint64(1) << 0

	autoclearBitmaps     = uint64(1) << 0
	autoclearDataFileRaw = uint64(1) << 1
	autoclearKnown       = autoclearBitmaps | autoclearDataFileRaw
)

// Header extension types.
const (
	extEnd          = 0x00000000
	extBackingFmt   = 0xe2792aca
	extFeatureTable = 0x6803f857
	extBitmaps      = 0x23852875
	extCrypto       = 0x0537be77
	extDataFile     = 0x44415441
)

// Compression types.
const (
	compressionZlib = 0
	compressionZstd = 1
)

// feature is one entry of the feature name table.
type feature struct {
	typ  uint8 // 0 incompatible, 1 compatible, 2 autoclear
	bit  uint8
	name string
}

// ourFeatures is the feature name table we write.
var ourFeatures = []feature{
	{0, 0, "dirty bit"},
	{0, 1, "corrupt bit"},
	{0, 2, "external data file"},
	{0, 3, "compression type"},
	{0, 4, "extended L2 entries"},
	{1, 0, "lazy refcounts"},
	{2, 0, "bitmaps"},
	{2, 1, "raw external data"},
}

// unknownExt is a header extension we do not interpret; it is preserved.
type unknownExt struct {
	typ  uint32
	data []byte
}

// bitmapExt is the bitmaps header extension.
type bitmapExt struct {
	nbBitmaps uint32
	dirSize   uint64
	dirOffset uint64
}

// header is the parsed image header with its extensions.
type header struct {
	version         uint32
	backingOffset   uint64
	backingSize     uint32
	clusterBits     uint32
	size            uint64
	cryptMethod     uint32
	l1Size          uint32
	l1Offset        uint64
	refTableOffset  uint64
	refTableClust   uint32
	nbSnapshots     uint32
	snapshotsOffset uint64
	incompat        uint64
	compat          uint64
	autoclear       uint64
	refcountOrder   uint32
	headerLen       uint32
	compressionType uint8
	// extraFields holds header bytes past the fields we know (offset 105
	// up to headerLen), preserved on rewrite.
	extraFields []byte

	backingFile   string
	backingFmt    string
	hasBackingFmt bool
	dataFile      string
	hasDataFile   bool
	features      []feature
	bitmaps       *bitmapExt
	hasCrypto     bool
	// cryptoOff and cryptoLen locate the LUKS header (the full disk
	// encryption header pointer extension).
	cryptoOff, cryptoLen uint64
	unknown              []unknownExt
}

func be32(b []byte) uint32 { return binary.BigEndian.Uint32(b) }
func be64(b []byte) uint64 { return binary.BigEndian.Uint64(b) }

// featureName names a feature bit from the image's table, or generically.
func (h *header) featureName(typ uint8, bit int) string {
	for _, f := range h.features {
		if f.typ == typ && int(f.bit) == bit {
			return f.name
		}
	}
	return fmt.Sprintf("unknown feature bit %d", bit)
}

// parseHeader decodes the first cluster of an image. buf holds at least the
// first min(cluster, file size) bytes, fileSize is the image file's size.
// Everything is validated against the file size before use.
func parseHeader(name string, buf []byte, fileSize int64) (*header, error) {
	if len(buf) < v2HeaderLen {
		return nil, driver.Corruptf(name, 0, "file too short for a qcow2 header (%d bytes)", len(buf))
	}
	if be32(buf) != qcowMagic {
		return nil, driver.Corruptf(name, 0, "not a qcow2 image (bad magic)")
	}
	h := &header{
		version:         be32(buf[4:]),
		backingOffset:   be64(buf[8:]),
		backingSize:     be32(buf[16:]),
		clusterBits:     be32(buf[20:]),
		size:            be64(buf[24:]),
		cryptMethod:     be32(buf[32:]),
		l1Size:          be32(buf[36:]),
		l1Offset:        be64(buf[40:]),
		refTableOffset:  be64(buf[48:]),
		refTableClust:   be32(buf[56:]),
		nbSnapshots:     be32(buf[60:]),
		snapshotsOffset: be64(buf[64:]),
	}
	if h.version != 2 && h.version != 3 {
		return nil, driver.Unsupportedf(name, "qcow2 version %d (only versions 2 and 3 exist)", h.version)
	}
	if h.clusterBits < minClusterBits || h.clusterBits > maxClusterBits {
		return nil, driver.Corruptf(name, 20, "cluster_bits %d out of range [%d, %d]", h.clusterBits, minClusterBits, maxClusterBits)
	}
	cs := int64(1) << h.clusterBits
	if int64(len(buf)) > cs {
		buf = buf[:cs]
	}
	h.refcountOrder = 4
	h.headerLen = v2HeaderLen
	if h.version == 3 {
		if len(buf) < v3HeaderLen {
			return nil, driver.Corruptf(name, 0, "file too short for a version 3 header")
		}
		h.incompat = be64(buf[72:])
		h.compat = be64(buf[80:])
		h.autoclear = be64(buf[88:])
		h.refcountOrder = be32(buf[96:])
		h.headerLen = be32(buf[100:])
		if h.headerLen < v3HeaderLen || h.headerLen%8 != 0 {
			return nil, driver.Corruptf(name, 100, "invalid header_length %d (at least %d and a multiple of 8)", h.headerLen, v3HeaderLen)
		}
		if int64(h.headerLen) > cs || int(h.headerLen) > len(buf) {
			return nil, driver.Corruptf(name, 100, "header_length %d exceeds the first cluster", h.headerLen)
		}
		if h.headerLen > v3HeaderLen {
			h.compressionType = buf[104]
			if h.headerLen > 105 {
				h.extraFields = append([]byte(nil), buf[105:h.headerLen]...)
			}
		}
	}
	if h.refcountOrder > 6 {
		return nil, driver.Corruptf(name, 96, "refcount_order %d exceeds 6", h.refcountOrder)
	}
	// Header extensions (also present in version 2 images).
	if err := h.parseExtensions(name, buf, cs); err != nil {
		return nil, err
	}
	if unk := h.incompat &^ incompatKnown; unk != 0 {
		var names []string
		for b := 0; b < 64; b++ {
			if unk&(1<<b) != 0 {
				names = append(names, fmt.Sprintf("%q (bit %d)", h.featureName(0, b), b))
			}
		}
		return nil, driver.Unsupportedf(name, "image uses unsupported incompatible features: %s", strings.Join(names, ", "))
	}
	if err := h.checkCrypto(name, fileSize); err != nil {
		return nil, err
	}
	if h.incompat&incompatCompression != 0 {
		if h.headerLen <= 104 || h.compressionType == 0 {
			return nil, driver.Corruptf(name, 104, "compression type bit set but no compression type in the header")
		}
	} else if h.compressionType != 0 {
		return nil, driver.Corruptf(name, 104, "compression type %d without the compression type feature bit", h.compressionType)
	}
	if h.compressionType > compressionZstd {
		return nil, driver.Unsupportedf(name, "unknown compression type %d", h.compressionType)
	}
	if h.incompat&incompatExtL2 != 0 && h.clusterBits < 14 {
		return nil, driver.Corruptf(name, 20, "extended L2 entries need clusters of at least 16 KiB (cluster_bits %d)", h.clusterBits)
	}
	if h.autoclear&autoclearDataFileRaw != 0 && h.incompat&incompatDataFile == 0 {
		return nil, driver.Corruptf(name, 88, "raw external data bit set without an external data file")
	}
	if h.hasDataFile && h.incompat&incompatDataFile == 0 {
		// qemu ignores the name then; so do we.
		h.hasDataFile, h.dataFile = false, ""
	}
	// Backing file name.
	if h.backingOffset != 0 {
		if h.backingSize > maxBackingNameLen || h.backingOffset > uint64(cs) || uint64(h.backingSize) > uint64(cs)-h.backingOffset {
			return nil, driver.Corruptf(name, 8, "backing file name (offset %d, %d bytes) does not fit in the first cluster", h.backingOffset, h.backingSize)
		}
		end := h.backingOffset + uint64(h.backingSize)
		if end > uint64(len(buf)) {
			return nil, driver.Corruptf(name, 8, "backing file name past the end of the file")
		}
		h.backingFile = string(buf[h.backingOffset:end])
		if h.backingFile == "" {
			h.backingOffset = 0
		}
	}
	if h.incompat&incompatDataFile != 0 && h.backingFile != "" && h.autoclear&autoclearDataFileRaw != 0 {
		return nil, driver.Corruptf(name, 88, "a raw external data file cannot have a backing file")
	}
	return h, nil
}

func (h *header) parseExtensions(name string, buf []byte, cs int64) error {
	off := int64(h.headerLen)
	end := int64(len(buf))
	if h.backingOffset != 0 && int64(h.backingOffset) < end && int64(h.backingOffset) >= off {
		end = int64(h.backingOffset)
	}
	seen := map[uint32]bool{}
	for off+8 <= end {
		typ := be32(buf[off:])
		n := int64(be32(buf[off+4:]))
		if typ == extEnd {
			return nil
		}
		if n > end-off-8 {
			return driver.Corruptf(name, off, "header extension 0x%08x of %d bytes runs past the header area", typ, n)
		}
		data := buf[off+8 : off+8+n]
		if seen[typ] && typ != 0 {
			return driver.Corruptf(name, off, "duplicate header extension 0x%08x", typ)
		}
		seen[typ] = true
		switch typ {
		case extBackingFmt:
			if n > 1023 {
				return driver.Corruptf(name, off, "backing format name too long (%d bytes)", n)
			}
			h.backingFmt, h.hasBackingFmt = cstring(data), true
		case extFeatureTable:
			for i := int64(0); i+48 <= n; i += 48 {
				h.features = append(h.features, feature{typ: data[i], bit: data[i+1], name: cstring(data[i+2 : i+48])})
			}
		case extBitmaps:
			if n < 24 {
				return driver.Corruptf(name, off, "bitmaps extension too short (%d bytes)", n)
			}
			h.bitmaps = &bitmapExt{nbBitmaps: be32(data), dirSize: be64(data[8:]), dirOffset: be64(data[16:])}
			if be32(data[4:]) != 0 {
				return driver.Corruptf(name, off, "reserved field of the bitmaps extension is not zero")
			}
		case extCrypto:
			if n < 16 {
				return driver.Corruptf(name, off, "encryption header pointer extension too short (%d bytes)", n)
			}
			h.hasCrypto = true
			h.cryptoOff, h.cryptoLen = be64(data), be64(data[8:])
		case extDataFile:
			if n > maxDataFileNameLen {
				return driver.Corruptf(name, off, "external data file name too long (%d bytes)", n)
			}
			h.dataFile, h.hasDataFile = cstring(data), true
		default:
			h.unknown = append(h.unknown, unknownExt{typ: typ, data: append([]byte(nil), data...)})
		}
		off += 8 + (n+7)&^7
	}
	return nil
}

// cstring returns b up to its first NUL byte.
func cstring(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// encode serializes the header, its extensions and the backing file name
// into one cluster. withFeatures controls the feature name table (dropped
// when it does not fit, as qemu does with 512-byte clusters).
func (h *header) encode(cs int64) ([]byte, error) {
	for _, withFeatures := range []bool{true, false} {
		b, ok := h.encodeTry(cs, withFeatures)
		if ok {
			return b, nil
		}
	}
	return nil, driver.OptionErrorf("the qcow2 header with its extensions and backing file name does not fit in one %d-byte cluster", cs)
}

func (h *header) encodeTry(cs int64, withFeatures bool) ([]byte, bool) {
	var b []byte
	put32 := func(v uint32) { b = binary.BigEndian.AppendUint32(b, v) }
	put64 := func(v uint64) { b = binary.BigEndian.AppendUint64(b, v) }
	put32(qcowMagic)
	put32(h.version)
	put64(0) // backing offset, patched below
	put32(0) // backing size, patched below
	put32(h.clusterBits)
	put64(h.size)
	put32(h.cryptMethod)
	put32(h.l1Size)
	put64(h.l1Offset)
	put64(h.refTableOffset)
	put32(h.refTableClust)
	put32(h.nbSnapshots)
	put64(h.snapshotsOffset)
	if h.version >= 3 {
		hl := h.headerLen
		if hl < ourV3HeaderLen {
			hl = ourV3HeaderLen
		}
		put64(h.incompat)
		put64(h.compat)
		put64(h.autoclear)
		put32(h.refcountOrder)
		put32(hl)
		b = append(b, h.compressionType)
		b = append(b, h.extraFields...)
		for len(b) < int(hl) {
			b = append(b, 0)
		}
		b = b[:hl]
	}
	ext := func(typ uint32, data []byte) {
		put32(typ)
		put32(uint32(len(data)))
		b = append(b, data...)
		for len(b)%8 != 0 {
			b = append(b, 0)
		}
	}
	if h.hasBackingFmt && h.backingFile != "" {
		ext(extBackingFmt, []byte(h.backingFmt))
	}
	if h.hasDataFile {
		ext(extDataFile, []byte(h.dataFile))
	}
	if h.hasCrypto {
		d := make([]byte, 16)
		binary.BigEndian.PutUint64(d, h.cryptoOff)
		binary.BigEndian.PutUint64(d[8:], h.cryptoLen)
		ext(extCrypto, d)
	}
	if withFeatures && h.version >= 3 {
		var ft []byte
		for _, f := range ourFeatures {
			e := make([]byte, 48)
			e[0], e[1] = f.typ, f.bit
			copy(e[2:], f.name)
			ft = append(ft, e...)
		}
		ext(extFeatureTable, ft)
	}
	if h.bitmaps != nil {
		d := make([]byte, 24)
		binary.BigEndian.PutUint32(d, h.bitmaps.nbBitmaps)
		binary.BigEndian.PutUint64(d[8:], h.bitmaps.dirSize)
		binary.BigEndian.PutUint64(d[16:], h.bitmaps.dirOffset)
		ext(extBitmaps, d)
	}
	for _, u := range h.unknown {
		ext(u.typ, u.data)
	}
	put32(extEnd)
	put32(0)
	if h.backingFile != "" {
		binary.BigEndian.PutUint64(b[8:], uint64(len(b)))
		binary.BigEndian.PutUint32(b[16:], uint32(len(h.backingFile)))
		b = append(b, h.backingFile...)
	}
	if int64(len(b)) > cs {
		return nil, false
	}
	return b, true
}
