package vhdx

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"hash/crc32"
	"strings"
	"unicode/utf16"
)

const (
	kib = 1 << 10
	mib = 1 << 20

	ftiSignature  = "vhdxfile"
	hdrSignature  = "head"
	rgnSignature  = "regi"
	metaSignature = "metadata"

	header1Off = 64 * kib
	header2Off = 128 * kib
	region1Off = 192 * kib
	region2Off = 256 * kib
	headerSize = 4 * kib  // bytes of a header covered by its checksum
	regionSize = 64 * kib // bytes of a region table covered by its checksum
	headerArea = 1 * mib  // the header section: FTI, headers, region tables

	maxRegionEntries = 2047
	maxMetaEntries   = 2047
	metaTableSize    = 64 * kib

	minBlockSize = 1 * mib
	maxBlockSize = 256 * mib
	// maxDiskSize is the largest virtual size the specification allows.
	maxDiskSize = 64 << 40
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// checksum is the CRC-32C of b with the 4 bytes at off taken as zero.
func checksum(b []byte, off int) uint32 {
	var zero [4]byte
	c := crc32.Update(0, castagnoli, b[:off])
	c = crc32.Update(c, castagnoli, zero[:])
	return crc32.Update(c, castagnoli, b[off+4:])
}

// guid is an MS-GUID as stored: the first three fields little-endian.
type guid [16]byte

func (g guid) isZero() bool { return g == guid{} }

// String formats g the usual way (lower case, no braces).
func (g guid) String() string {
	var b [16]byte
	binary.BigEndian.PutUint32(b[0:], binary.LittleEndian.Uint32(g[0:]))
	binary.BigEndian.PutUint16(b[4:], binary.LittleEndian.Uint16(g[4:]))
	binary.BigEndian.PutUint16(b[6:], binary.LittleEndian.Uint16(g[6:]))
	copy(b[8:], g[8:])
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

// parseGUID reads "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", with or without
// braces.
func parseGUID(s string) (guid, error) {
	var g guid
	t := strings.TrimSuffix(strings.TrimPrefix(strings.TrimSpace(s), "{"), "}")
	if len(t) != 36 || t[8] != '-' || t[13] != '-' || t[18] != '-' || t[23] != '-' {
		return g, fmt.Errorf("%q is not a GUID", s)
	}
	b, err := hex.DecodeString(t[0:8] + t[9:13] + t[14:18] + t[19:23] + t[24:36])
	if err != nil {
		return g, fmt.Errorf("%q is not a GUID", s)
	}
	binary.LittleEndian.PutUint32(g[0:], binary.BigEndian.Uint32(b[0:]))
	binary.LittleEndian.PutUint16(g[4:], binary.BigEndian.Uint16(b[4:]))
	binary.LittleEndian.PutUint16(g[6:], binary.BigEndian.Uint16(b[6:]))
	copy(g[8:], b[8:])
	return g, nil
}

func mustGUID(s string) guid {
	g, err := parseGUID(s)
	if err != nil {
		panic(err)
	}
	return g
}

// newGUID is a random (version 4) GUID.
func newGUID() guid {
	var g guid
	if _, err := rand.Read(g[:]); err != nil {
		panic(err)
	}
	g[7] = g[7]&0x0f | 0x40 // version, in the little-endian third field
	g[8] = g[8]&0x3f | 0x80
	return g
}

// Region and metadata item identifiers of [MS-VHDX].
var (
	guidBAT       = mustGUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
	guidMetadata  = mustGUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
	guidFileParam = mustGUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
	guidDiskSize  = mustGUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
	guidPage83    = mustGUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
	guidLogical   = mustGUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
	guidPhysical  = mustGUID("CDA348C7-445D-4471-9CC9-E9885251C556")
	guidParentLoc = mustGUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
	// guidVHDXLocator is the locator type of a VHDX parent.
	guidVHDXLocator = mustGUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")
)

// header is one of the two 4 KiB headers.
type header struct {
	seq         uint64
	fileWrite   guid
	dataWrite   guid
	logGUID     guid
	logVersion  uint16
	version     uint16
	logLength   uint32
	logOffset   uint64
	checksumOK  bool
	signatureOK bool
}

func parseHeader(b []byte) header {
	var h header
	h.signatureOK = string(b[0:4]) == hdrSignature
	h.checksumOK = binary.LittleEndian.Uint32(b[4:]) == checksum(b[:headerSize], 4)
	h.seq = binary.LittleEndian.Uint64(b[8:])
	copy(h.fileWrite[:], b[16:32])
	copy(h.dataWrite[:], b[32:48])
	copy(h.logGUID[:], b[48:64])
	h.logVersion = binary.LittleEndian.Uint16(b[64:])
	h.version = binary.LittleEndian.Uint16(b[66:])
	h.logLength = binary.LittleEndian.Uint32(b[68:])
	h.logOffset = binary.LittleEndian.Uint64(b[72:])
	return h
}

func (h *header) marshal() []byte {
	b := make([]byte, headerSize)
	copy(b, hdrSignature)
	binary.LittleEndian.PutUint64(b[8:], h.seq)
	copy(b[16:], h.fileWrite[:])
	copy(b[32:], h.dataWrite[:])
	copy(b[48:], h.logGUID[:])
	binary.LittleEndian.PutUint16(b[64:], h.logVersion)
	binary.LittleEndian.PutUint16(b[66:], h.version)
	binary.LittleEndian.PutUint32(b[68:], h.logLength)
	binary.LittleEndian.PutUint64(b[72:], h.logOffset)
	binary.LittleEndian.PutUint32(b[4:], checksum(b, 4))
	return b
}

// regionEntry is one entry of the region table.
type regionEntry struct {
	id       guid
	off      uint64
	length   uint32
	required bool
}

// parseRegionTable decodes a 64 KiB region table; ok is false for a bad
// signature, checksum or entry count.
func parseRegionTable(b []byte) (ents []regionEntry, why string) {
	if string(b[0:4]) != rgnSignature {
		return nil, "bad region table signature"
	}
	if binary.LittleEndian.Uint32(b[4:]) != checksum(b[:regionSize], 4) {
		return nil, "region table checksum mismatch"
	}
	n := binary.LittleEndian.Uint32(b[8:])
	if n > maxRegionEntries {
		return nil, fmt.Sprintf("region table has %d entries (at most %d)", n, maxRegionEntries)
	}
	for i := uint32(0); i < n; i++ {
		e := b[16+32*i:]
		var r regionEntry
		copy(r.id[:], e[:16])
		r.off = binary.LittleEndian.Uint64(e[16:])
		r.length = binary.LittleEndian.Uint32(e[24:])
		r.required = binary.LittleEndian.Uint32(e[28:])&1 != 0
		ents = append(ents, r)
	}
	return ents, ""
}

func marshalRegionTable(ents []regionEntry) []byte {
	b := make([]byte, regionSize)
	copy(b, rgnSignature)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(ents)))
	for i, r := range ents {
		e := b[16+32*i:]
		copy(e, r.id[:])
		binary.LittleEndian.PutUint64(e[16:], r.off)
		binary.LittleEndian.PutUint32(e[24:], r.length)
		if r.required {
			binary.LittleEndian.PutUint32(e[28:], 1)
		}
	}
	binary.LittleEndian.PutUint32(b[4:], checksum(b, 4))
	return b
}

// encodeUTF16 encodes s as UTF-16LE.
func encodeUTF16(s string) []byte {
	u := utf16.Encode([]rune(s))
	b := make([]byte, 2*len(u))
	for i, c := range u {
		binary.LittleEndian.PutUint16(b[2*i:], c)
	}
	return b
}

// decodeUTF16 decodes UTF-16LE, stopping at a NUL.
func decodeUTF16(b []byte) (string, error) {
	if len(b)%2 != 0 {
		return "", fmt.Errorf("odd length %d for UTF-16", len(b))
	}
	u := make([]uint16, 0, len(b)/2)
	for i := 0; i+1 < len(b); i += 2 {
		c := binary.LittleEndian.Uint16(b[i:])
		if c == 0 {
			break
		}
		u = append(u, c)
	}
	return string(utf16.Decode(u)), nil
}

func roundUp(n, a int64) int64 { return (n + a - 1) / a * a }
