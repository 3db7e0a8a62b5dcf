package qcow

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math"

	"github.com/vdisk/vdisk/driver"
)

const (
	magic      = 'Q'<<24 | 'F'<<16 | 'I'<<8 | 0xfb
	version    = 1
	headerSize = 48

	cryptNone = 0
	cryptAES  = 1

	minClusterBits = 9
	maxClusterBits = 16
	minL2Bits      = 6 // 512-byte tables
	maxL2Bits      = 13

	// maxBackingName is the longest backing file name qemu accepts.
	maxBackingName = 1023
	// maxL1Entries is qemu's bound (INT_MAX / 8).
	maxL1Entries = math.MaxInt32 / 8

	flagCompressed = uint64(1) << 63
)

// header is the on-disk header.
type header struct {
	backingOff  uint64
	backingLen  uint32
	mtime       uint32
	size        uint64 // bytes, as recorded
	clusterBits uint8
	l2Bits      uint8
	crypt       uint32
	l1Off       uint64
}

func (h *header) encode() []byte {
	b := make([]byte, headerSize)
	be := binary.BigEndian
	be.PutUint32(b[0:], magic)
	be.PutUint32(b[4:], version)
	be.PutUint64(b[8:], h.backingOff)
	be.PutUint32(b[16:], h.backingLen)
	be.PutUint32(b[20:], h.mtime)
	be.PutUint64(b[24:], h.size)
	b[32] = h.clusterBits
	b[33] = h.l2Bits
	be.PutUint32(b[36:], h.crypt)
	be.PutUint64(b[40:], h.l1Off)
	return b
}

func decodeHeader(b []byte) *header {
	be := binary.BigEndian
	return &header{
		backingOff:  be.Uint64(b[8:]),
		backingLen:  be.Uint32(b[16:]),
		mtime:       be.Uint32(b[20:]),
		size:        be.Uint64(b[24:]),
		clusterBits: b[32],
		l2Bits:      b[33],
		crypt:       be.Uint32(b[36:]),
		l1Off:       be.Uint64(b[40:]),
	}
}

// l1Entries is the number of L1 entries the header's size needs.
func (h *header) l1Entries() uint64 {
	shift := uint(h.clusterBits) + uint(h.l2Bits)
	return (h.size + (1 << shift) - 1) >> shift
}

// layout is what an open image derives from its header.
type layout struct {
	cb      uint   // cluster bits
	cs      int64  // cluster size
	l2Bits  uint   // entries per L2 table = 1 << l2Bits
	l2Bytes int64  // bytes per L2 table
	l1Off   int64  // file offset of the L1 table
	l1Len   int64  // L1 entries
	size    int64  // virtual size (header size rounded down to sectors)
	offMask uint64 // offset bits of a compressed entry
	metaEnd int64  // end of the header, backing name and L1 table
}

// readHeader reads and validates the header of a file of fileSize bytes
// and returns it with the layout and the backing file name.
func readHeader(f io.ReaderAt, name string, fileSize int64) (*header, *layout, string, error) {
	if fileSize < headerSize {
		return nil, nil, "", driver.Corruptf(name, 0, "file of %d bytes is too small for a qcow header (%d bytes)", fileSize, headerSize)
	}
	b := make([]byte, headerSize)
	if err := driver.ReadFullAt(f, b, 0); err != nil {
		return nil, nil, "", driver.WithFile(err, "read header", name)
	}
	be := binary.BigEndian
	if m := be.Uint32(b); m != magic {
		return nil, nil, "", driver.Corruptf(name, 0, "bad magic %#08x: not a qcow image", m)
	}
	if v := be.Uint32(b[4:]); v != version {
		hint := ""
		if v == 2 || v == 3 {
			hint = " (use the qcow2 format)"
		}
		return nil, nil, "", driver.Unsupportedf(name, "qcow version %d is not qcow version 1%s", v, hint)
	}
	h := decodeHeader(b)
	if h.size <= 1 {
		return nil, nil, "", driver.Corruptf(name, 24, "image size %d is too small (must be at least 2 bytes)", h.size)
	}
	if h.clusterBits < minClusterBits || h.clusterBits > maxClusterBits {
		return nil, nil, "", driver.Corruptf(name, 32, "cluster_bits %d out of range (cluster size must be between 512 and 64k)", h.clusterBits)
	}
	if h.l2Bits < minL2Bits || h.l2Bits > maxL2Bits {
		return nil, nil, "", driver.Corruptf(name, 33, "l2_bits %d out of range (L2 table size must be between 512 and 64k)", h.l2Bits)
	}
	switch h.crypt {
	case cryptNone:
	case cryptAES:
		return nil, nil, "", driver.Unsupportedf(name, "AES-encrypted qcow images are not supported (qemu refuses them in system emulators too; decrypt with qemu-img convert)")
	default:
		return nil, nil, "", driver.Corruptf(name, 36, "invalid encryption method %d", h.crypt)
	}
	shift := uint(h.clusterBits) + uint(h.l2Bits)
	if h.size > math.MaxInt64-(1<<shift) {
		return nil, nil, "", driver.Corruptf(name, 24, "image size %d is too large", h.size)
	}
	l1n := h.l1Entries()
	if l1n > maxL1Entries {
		return nil, nil, "", driver.Corruptf(name, 24, "image size %d needs %d L1 entries, more than qemu allows (%d)", h.size, l1n, maxL1Entries)
	}
	lo := &layout{
		cb:      uint(h.clusterBits),
		cs:      1 << h.clusterBits,
		l2Bits:  uint(h.l2Bits),
		l2Bytes: 8 << h.l2Bits,
		l1Off:   int64(h.l1Off),
		l1Len:   int64(l1n),
		size:    int64(h.size &^ 511),
		offMask: 1<<(63-uint(h.clusterBits)) - 1,
	}
	l1Bytes := lo.l1Len * 8
	if h.l1Off > uint64(fileSize) || l1Bytes > fileSize-lo.l1Off {
		return nil, nil, "", driver.Corruptf(name, 40, "L1 table of %d entries at offset %d extends past the end of the %d-byte file", lo.l1Len, h.l1Off, fileSize)
	}
	if l1Bytes > 0 && lo.l1Off < headerSize {
		return nil, nil, "", driver.Corruptf(name, 40, "L1 table at offset %d overlaps the header", h.l1Off)
	}
	lo.metaEnd = max(headerSize, lo.l1Off+l1Bytes)
	var backing string
	if h.backingOff != 0 && h.backingLen > 0 {
		if h.backingLen > maxBackingName {
			return nil, nil, "", driver.Corruptf(name, 16, "backing file name of %d bytes is too long (at most %d)", h.backingLen, maxBackingName)
		}
		if h.backingOff > uint64(fileSize) || int64(h.backingLen) > fileSize-int64(h.backingOff) {
			return nil, nil, "", driver.Corruptf(name, 8, "backing file name at offset %d (%d bytes) extends past the end of the file", h.backingOff, h.backingLen)
		}
		nb := make([]byte, h.backingLen)
		if err := driver.ReadFullAt(f, nb, int64(h.backingOff)); err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) {
				return nil, nil, "", driver.Corruptf(name, int64(h.backingOff), "backing file name cut short by the end of the file")
			}
			return nil, nil, "", driver.WithFile(err, "read backing file name", name)
		}
		// qemu reads the name as a C string.
		if i := bytes.IndexByte(nb, 0); i >= 0 {
			nb = nb[:i]
		}
		backing = string(nb)
		lo.metaEnd = max(lo.metaEnd, int64(h.backingOff)+int64(h.backingLen))
	}
	return h, lo, backing, nil
}

// entries per L2 table.
func (lo *layout) l2Len() int64 { return 1 << lo.l2Bits }

// l2Span is the number of virtual bytes one L2 table maps.
func (lo *layout) l2Span() int64 { return lo.cs << lo.l2Bits }

// clusterLen is the number of bytes of cluster c inside the virtual disk.
func (lo *layout) clusterLen(c int64) int64 { return min(lo.cs, lo.size-c*lo.cs) }

// compressed decodes a compressed L2 entry: the stream's file offset and
// length.
func (lo *layout) compressed(e uint64) (off, n int64) {
	return int64(e & lo.offMask), int64((e >> (63 - lo.cb)) & uint64(lo.cs-1))
}

// compressedEntry encodes a compressed L2 entry.
func (lo *layout) compressedEntry(off, n int64) uint64 {
	return flagCompressed | uint64(n)<<(63-lo.cb) | uint64(off)
}
