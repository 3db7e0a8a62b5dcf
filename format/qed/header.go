package qed

import (
	"encoding/binary"
	"io"
	"math"
	"math/bits"

	"github.com/vdisk/vdisk/driver"
)

const (
	magic = 0x00444551 // "QED\0" little-endian

	headerLen = 64 // the fixed fields

	minClusterSize     = 4 << 10
	maxClusterSize     = 64 << 20
	defaultClusterSize = 64 << 10
	minTableSize       = 1
	maxTableSize       = 16
	defaultTableSize   = 4

	featBacking    = 1
	featNeedCheck  = 2
	featRawNoProbe = 4
	knownFeatures  = featBacking | featNeedCheck | featRawNoProbe

	// knownAutoclear is the autoclear feature bits we maintain (none).
	knownAutoclear = 0

	// zeroEntry is the L2 entry of a zero cluster.
	zeroEntry = 1

	// maxBackingName bounds the recorded backing file name (qemu keeps
	// it in a PATH_MAX buffer).
	maxBackingName = 4095
)

type header struct {
	clusterSize uint32
	tableSize   uint32
	headerSize  uint32
	features    uint64
	compat      uint64
	autoclear   uint64
	l1Offset    uint64
	imageSize   uint64
	backOff     uint32
	backSize    uint32

	backing string // the recorded backing file name
}

func (h *header) encode() []byte {
	b := make([]byte, headerLen)
	le := binary.LittleEndian
	le.PutUint32(b[0:], magic)
	le.PutUint32(b[4:], h.clusterSize)
	le.PutUint32(b[8:], h.tableSize)
	le.PutUint32(b[12:], h.headerSize)
	le.PutUint64(b[16:], h.features)
	le.PutUint64(b[24:], h.compat)
	le.PutUint64(b[32:], h.autoclear)
	le.PutUint64(b[40:], h.l1Offset)
	le.PutUint64(b[48:], h.imageSize)
	le.PutUint32(b[56:], h.backOff)
	le.PutUint32(b[60:], h.backSize)
	return b
}

func decodeHeader(b []byte) header {
	le := binary.LittleEndian
	return header{
		clusterSize: le.Uint32(b[4:]),
		tableSize:   le.Uint32(b[8:]),
		headerSize:  le.Uint32(b[12:]),
		features:    le.Uint64(b[16:]),
		compat:      le.Uint64(b[24:]),
		autoclear:   le.Uint64(b[32:]),
		l1Offset:    le.Uint64(b[40:]),
		imageSize:   le.Uint64(b[48:]),
		backOff:     le.Uint32(b[56:]),
		backSize:    le.Uint32(b[60:]),
	}
}

func validClusterSize(cs int64) bool {
	return cs >= minClusterSize && cs <= maxClusterSize && cs&(cs-1) == 0
}

func validTableSize(ts int64) bool {
	return ts >= minTableSize && ts <= maxTableSize && ts&(ts-1) == 0
}

// maxImageSize is cluster_size * entries^2, saturated at the largest
// multiple of 512 in an int64 (qemu computes it in 64 bits and wraps for
// the largest geometries; no image can be larger than an int64 anyway).
func maxImageSize(cs, ts int64) int64 {
	entries := uint64(cs * ts / 8)
	hi, lo := bits.Mul64(entries, entries)
	if hi != 0 {
		return math.MaxInt64 &^ 511
	}
	hi, lo = bits.Mul64(lo, uint64(cs))
	if hi != 0 || lo > math.MaxInt64 {
		return math.MaxInt64 &^ 511
	}
	return int64(lo)
}

// readHeader reads and validates the header of a file of fileSize bytes:
// every field is checked against the format's limits and the file size
// before it is used.
func readHeader(r io.ReaderAt, name string, fileSize int64) (*header, error) {
	if fileSize < headerLen {
		return nil, driver.Corruptf(name, 0, "file of %d bytes is too small for a QED header", fileSize)
	}
	b := make([]byte, headerLen)
	if err := driver.ReadFullAt(r, b, 0); err != nil {
		return nil, driver.WithFile(err, "read header", name)
	}
	if binary.LittleEndian.Uint32(b) != magic {
		return nil, driver.Corruptf(name, 0, "bad magic %#x: not a QED image", binary.LittleEndian.Uint32(b))
	}
	h := decodeHeader(b)
	if f := h.features &^ knownFeatures; f != 0 {
		return nil, driver.Unsupportedf(name, "QED image uses unknown feature bits %#x", f)
	}
	cs, ts := int64(h.clusterSize), int64(h.tableSize)
	if !validClusterSize(cs) {
		return nil, driver.Corruptf(name, 4, "cluster size %d is not a power of two from %d to %d", cs, minClusterSize, maxClusterSize)
	}
	if !validTableSize(ts) {
		return nil, driver.Corruptf(name, 8, "table size %d clusters is not a power of two from %d to %d", ts, minTableSize, maxTableSize)
	}
	hdrBytes := int64(h.headerSize) * cs // at most 2^58: no overflow
	if h.headerSize == 0 || hdrBytes > fileSize {
		return nil, driver.Corruptf(name, 12, "header size of %d clusters does not fit the %d-byte file", h.headerSize, fileSize)
	}
	if h.imageSize%512 != 0 {
		return nil, driver.Corruptf(name, 48, "image size %d is not a multiple of 512", h.imageSize)
	}
	if mx := maxImageSize(cs, ts); h.imageSize > uint64(mx) {
		return nil, driver.Corruptf(name, 48, "image size %d exceeds the maximum of %d for %d-byte clusters and %d-cluster tables", h.imageSize, mx, cs, ts)
	}
	limit := fileSize &^ (cs - 1)
	if !validTable(int64(h.headerSize), cs, ts, limit, h.l1Offset) {
		return nil, driver.Corruptf(name, 40, "L1 table offset %d is misaligned, inside the header or past the end of the %d-byte file", h.l1Offset, fileSize)
	}
	if h.features&featBacking != 0 {
		end := uint64(h.backOff) + uint64(h.backSize)
		if h.backOff < headerLen || end > uint64(hdrBytes) {
			return nil, driver.Corruptf(name, 56, "backing file name at %d (%d bytes) lies outside the %d-byte header", h.backOff, h.backSize, hdrBytes)
		}
		if h.backSize == 0 || h.backSize > maxBackingName {
			return nil, driver.Corruptf(name, 60, "backing file name of %d bytes (1 to %d allowed)", h.backSize, maxBackingName)
		}
		nb := make([]byte, h.backSize)
		if err := driver.ReadFullAt(r, nb, int64(h.backOff)); err != nil {
			return nil, driver.Corruptf(name, int64(h.backOff), "backing file name cut short by the end of the file")
		}
		h.backing = string(nb)
	}
	return &h, nil
}

// validTable reports whether a table of ts clusters at off lies, aligned,
// between the header (hdrClusters) and limit.
func validTable(hdrClusters, cs, ts, limit int64, off uint64) bool {
	if off&uint64(cs-1) != 0 || off < uint64(hdrClusters*cs) || off > uint64(limit) {
		return false
	}
	return int64(off)+ts*cs <= limit
}
