package vhd

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"strings"
	"time"
	"unicode/utf16"
	"unicode/utf8"

	"github.com/vdisk/vdisk/driver"
)

// On-disk constants (Virtual Hard Disk Image Format Specification).
const (
	sectorSize   = 512
	footerSize   = 512
	headerSize   = 1024
	footerCookie = "conectix"
	headerCookie = "cxsparse"

	diskFixed   = 2
	diskDynamic = 3
	diskDiff    = 4

	formatVersion = 0x00010000
	featReserved  = 0x2 // "reserved, must always be set"

	batUnused = 0xFFFFFFFF
	noOffset  = 0xFFFFFFFFFFFFFFFF

	// Creator application of the images vdisk writes. qemu's open rule
	// does not list it, so qemu sizes them by their CHS geometry; vdisk
	// therefore always writes a current size equal to the geometry's size,
	// or the 65535/16/255 marker that makes every reader use current size.
	creatorApp     = "vdsk"
	creatorVersion = 0x00010000
	creatorOS      = "Wi2k"

	defaultBlockSize = 2 << 20
	// maxCreateEntries bounds the BAT of a new image (128 MiB; a 2040 GiB
	// disk of 64 KiB blocks).
	maxCreateEntries = 1 << 25
	minBlockSize     = 512
	maxBlockSize     = 256 << 20

	// maxSectors is qemu's limit on a VHD's virtual size (2040 GiB).
	maxSectors = 0xff000000
	// maxGeometry is the largest CHS product; a geometry of exactly
	// 65535/16/255 marks "use the current size" for qemu.
	chsMaxC     = 65535
	chsMaxH     = 16
	chsMaxS     = 255
	maxGeometry = chsMaxC * chsMaxH * chsMaxS

	// vhdEpoch is 2000-01-01 00:00:00 UTC, the origin of VHD time stamps.
	vhdEpoch = 946684800

	// Parent locator platform codes.
	platNone = 0
	platWi2r = 0x57693272 // "Wi2r", deprecated
	platWi2k = 0x5769326B // "Wi2k", deprecated
	platW2ru = 0x57327275 // "W2ru": relative Windows path, UTF-16LE
	platW2ku = 0x57326B75 // "W2ku": absolute Windows path, UTF-16LE
	platMac  = 0x4D616320 // "Mac ": Mac OS alias blob
	platMacX = 0x4D616358 // "MacX": file URL, UTF-8

	// maxLocatorLen bounds a parent locator's data (a 32767-character
	// Windows path in UTF-16).
	maxLocatorLen = 64 << 10
	// locatorSpace is what vdisk reserves per locator it writes (as
	// VirtualBox does: 512 UTF-16 units), so a later update usually fits.
	locatorSpace = 1024
	// parentNameUnits is the size of the header's parent name in UTF-16
	// units; one is kept for the terminator.
	parentNameUnits = 256
)

var be = binary.BigEndian

// checksum is the one's complement of the byte sum of b, skipping the four
// checksum bytes at skip.
func checksum(b []byte, skip int) uint32 {
	var s uint32
	for i, c := range b {
		if i >= skip && i < skip+4 {
			continue
		}
		s += uint32(c)
	}
	return ^s
}

// footer is the 512-byte hard disk footer.
type footer struct {
	features   uint32
	version    uint32
	dataOffset uint64
	timestamp  uint32
	creatorApp [4]byte
	creatorVer uint32
	creatorOS  [4]byte
	origSize   uint64
	curSize    uint64
	cyls       uint16
	heads      uint8
	spt        uint8
	diskType   uint32
	checksum   uint32 // as stored
	uuid       [16]byte
	savedState uint8
}

const footerChecksumOff = 64

// parseFooter decodes b (512 bytes). cookie says whether it starts with
// "conectix", sumOK whether its checksum matches.
func parseFooter(b []byte) (f footer, cookie, sumOK bool) {
	if len(b) < footerSize {
		return f, false, false
	}
	cookie = string(b[:8]) == footerCookie
	f.features = be.Uint32(b[8:])
	f.version = be.Uint32(b[12:])
	f.dataOffset = be.Uint64(b[16:])
	f.timestamp = be.Uint32(b[24:])
	copy(f.creatorApp[:], b[28:32])
	f.creatorVer = be.Uint32(b[32:])
	copy(f.creatorOS[:], b[36:40])
	f.origSize = be.Uint64(b[40:])
	f.curSize = be.Uint64(b[48:])
	f.cyls = be.Uint16(b[56:])
	f.heads = b[58]
	f.spt = b[59]
	f.diskType = be.Uint32(b[60:])
	f.checksum = be.Uint32(b[64:])
	copy(f.uuid[:], b[68:84])
	f.savedState = b[84]
	sumOK = checksum(b[:footerSize], footerChecksumOff) == f.checksum
	return f, cookie, sumOK
}

// marshal encodes f with a fresh checksum (which it also stores in f).
func (f *footer) marshal() []byte {
	b := make([]byte, footerSize)
	copy(b, footerCookie)
	be.PutUint32(b[8:], f.features)
	be.PutUint32(b[12:], f.version)
	be.PutUint64(b[16:], f.dataOffset)
	be.PutUint32(b[24:], f.timestamp)
	copy(b[28:32], f.creatorApp[:])
	be.PutUint32(b[32:], f.creatorVer)
	copy(b[36:40], f.creatorOS[:])
	be.PutUint64(b[40:], f.origSize)
	be.PutUint64(b[48:], f.curSize)
	be.PutUint16(b[56:], f.cyls)
	b[58] = f.heads
	b[59] = f.spt
	be.PutUint32(b[60:], f.diskType)
	copy(b[68:84], f.uuid[:])
	b[84] = f.savedState
	f.checksum = checksum(b, footerChecksumOff)
	be.PutUint32(b[64:], f.checksum)
	return b
}

func (f *footer) chs() driver.CHS {
	return driver.CHS{Cylinders: uint32(f.cyls), Heads: uint32(f.heads), Sectors: uint32(f.spt)}
}

func (f *footer) setCHS(g driver.CHS) {
	f.cyls, f.heads, f.spt = uint16(g.Cylinders), uint8(g.Heads), uint8(g.Sectors)
}

// locator is one parent locator entry of the dynamic disk header.
type locator struct {
	code   uint32
	space  uint32 // reserved bytes (or sectors, per the letter of the spec)
	length uint32 // bytes of data
	offset uint64
}

// header is the 1024-byte dynamic disk header.
type header struct {
	dataOffset  uint64
	tableOffset uint64
	version     uint32
	maxEntries  uint32
	blockSize   uint32
	checksum    uint32 // as stored
	parentUUID  [16]byte
	parentTime  uint32
	parentName  [512]byte // UTF-16BE, NUL-terminated
	locators    [8]locator
	reservedRaw [256]byte
}

const headerChecksumOff = 36

func parseHeader(b []byte) (h header, cookie, sumOK bool) {
	if len(b) < headerSize {
		return h, false, false
	}
	cookie = string(b[:8]) == headerCookie
	h.dataOffset = be.Uint64(b[8:])
	h.tableOffset = be.Uint64(b[16:])
	h.version = be.Uint32(b[24:])
	h.maxEntries = be.Uint32(b[28:])
	h.blockSize = be.Uint32(b[32:])
	h.checksum = be.Uint32(b[36:])
	copy(h.parentUUID[:], b[40:56])
	h.parentTime = be.Uint32(b[56:])
	copy(h.parentName[:], b[64:576])
	for i := range h.locators {
		e := b[576+24*i:]
		h.locators[i] = locator{code: be.Uint32(e), space: be.Uint32(e[4:]), length: be.Uint32(e[8:]), offset: be.Uint64(e[16:])}
	}
	copy(h.reservedRaw[:], b[768:1024])
	sumOK = checksum(b[:headerSize], headerChecksumOff) == h.checksum
	return h, cookie, sumOK
}

func (h *header) marshal() []byte {
	b := make([]byte, headerSize)
	copy(b, headerCookie)
	be.PutUint64(b[8:], h.dataOffset)
	be.PutUint64(b[16:], h.tableOffset)
	be.PutUint32(b[24:], h.version)
	be.PutUint32(b[28:], h.maxEntries)
	be.PutUint32(b[32:], h.blockSize)
	copy(b[40:56], h.parentUUID[:])
	be.PutUint32(b[56:], h.parentTime)
	copy(b[64:576], h.parentName[:])
	for i, l := range h.locators {
		e := b[576+24*i:]
		be.PutUint32(e, l.code)
		be.PutUint32(e[4:], l.space)
		be.PutUint32(e[8:], l.length)
		be.PutUint64(e[16:], l.offset)
	}
	copy(b[768:], h.reservedRaw[:])
	h.checksum = checksum(b, headerChecksumOff)
	be.PutUint32(b[36:], h.checksum)
	return b
}

// specGeometry is the CHS algorithm of the VHD specification (appendix
// "CHS calculation"), capped at 65535/16/255. It rounds down.
func specGeometry(totalSectors int64) driver.CHS {
	if totalSectors > maxGeometry {
		totalSectors = maxGeometry
	}
	var spt, heads, cth int64
	if totalSectors >= chsMaxC*16*63 {
		spt, heads = 255, 16
		cth = totalSectors / spt
	} else {
		spt = 17
		cth = totalSectors / spt
		heads = (cth + 1023) / 1024
		if heads < 4 {
			heads = 4
		}
		if cth >= heads*1024 || heads > 16 {
			spt, heads = 31, 16
			cth = totalSectors / spt
		}
		if cth >= heads*1024 {
			spt, heads = 63, 16
			cth = totalSectors / spt
		}
	}
	return driver.CHS{Cylinders: uint32(cth / heads), Heads: uint32(heads), Sectors: uint32(spt)}
}

func chsProduct(g driver.CHS) int64 {
	return int64(g.Cylinders) * int64(g.Heads) * int64(g.Sectors)
}

var maxCHS = driver.CHS{Cylinders: chsMaxC, Heads: chsMaxH, Sectors: chsMaxS}

// createGeometry computes the geometry and virtual size of a new image of
// size bytes as qemu does: without force the smallest CHS geometry whose
// size is at least the request (the virtual size is then the geometry's
// size); with force (or past the largest geometry) the 65535/16/255 marker
// and the size itself, rounded up to a sector.
func createGeometry(size int64, force bool) (driver.CHS, int64, error) {
	size = roundUp(size, sectorSize)
	total := size / sectorSize
	var g driver.CHS
	if force {
		g = maxCHS
	} else {
		want := min(total, maxGeometry)
		for i := int64(0); want > chsProduct(g); i++ {
			g = specGeometry(want + i)
		}
	}
	if chsProduct(g) != maxGeometry {
		total = chsProduct(g)
	}
	if total > maxSectors {
		return g, 0, driver.OptionErrorf("disk size %d is too large for VHD; the largest is 2040 GiB", size)
	}
	return g, total * sectorSize, nil
}

// sizeUsesCurrent reports whether qemu sizes an image by its footer's
// current size rather than its CHS geometry: images from Hyper-V, Disk2vhd,
// XenServer, XenConverter and qemu's force_size mode, and every image whose
// geometry is the 65535/16/255 marker.
func sizeUsesCurrent(f *footer) bool {
	switch string(f.creatorApp[:]) {
	case "win ", "qem2", "d2v ", "CTXS", "tap\x00":
		return true
	}
	return f.chs() == maxCHS
}

func roundUp(n, to int64) int64 { return (n + to - 1) / to * to }

// newUUID returns a random (version 4) UUID.
func newUUID() [16]byte {
	var u [16]byte
	if _, err := rand.Read(u[:]); err != nil {
		panic(err) // crypto/rand never fails on supported platforms
	}
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	return u
}

func formatUUID(u [16]byte) string {
	if u == ([16]byte{}) {
		return ""
	}
	h := hex.EncodeToString(u[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

// parseUUID accepts the usual 8-4-4-4-12 form (and the same without
// dashes or in braces).
func parseUUID(s string) ([16]byte, error) {
	var u [16]byte
	t := strings.TrimSuffix(strings.TrimPrefix(strings.TrimSpace(s), "{"), "}")
	t = strings.ReplaceAll(t, "-", "")
	if len(t) != 32 {
		return u, fmt.Errorf("invalid UUID %q", s)
	}
	if _, err := hex.Decode(u[:], []byte(t)); err != nil {
		return u, fmt.Errorf("invalid UUID %q", s)
	}
	return u, nil
}

func toVHDTime(t time.Time) uint32 {
	s := t.Unix() - vhdEpoch
	if s < 0 {
		return 0
	}
	if s > 0xFFFFFFFF {
		return 0xFFFFFFFF
	}
	return uint32(s)
}

func fromVHDTime(v uint32) time.Time { return time.Unix(vhdEpoch+int64(v), 0).UTC() }

// encodeUTF16 encodes s as UTF-16 in the given byte order.
func encodeUTF16(s string, bigEndian bool) []byte {
	u := utf16.Encode([]rune(s))
	b := make([]byte, 2*len(u))
	for i, c := range u {
		if bigEndian {
			be.PutUint16(b[2*i:], c)
		} else {
			binary.LittleEndian.PutUint16(b[2*i:], c)
		}
	}
	return b
}

// decodeUTF16 decodes b (up to the first NUL unit) strictly: an odd length,
// an unpaired surrogate or a character that cannot be a file name (control
// characters) is an error.
func decodeUTF16(b []byte, bigEndian bool) (string, error) {
	if len(b)%2 != 0 {
		return "", fmt.Errorf("odd length %d for UTF-16 text", len(b))
	}
	u := make([]uint16, 0, len(b)/2)
	for i := 0; i+1 < len(b); i += 2 {
		var c uint16
		if bigEndian {
			c = be.Uint16(b[i:])
		} else {
			c = binary.LittleEndian.Uint16(b[i:])
		}
		if c == 0 {
			break
		}
		u = append(u, c)
	}
	for i := 0; i < len(u); i++ {
		c := u[i]
		switch {
		case c >= 0xD800 && c < 0xDC00:
			if i+1 >= len(u) || u[i+1] < 0xDC00 || u[i+1] >= 0xE000 {
				return "", fmt.Errorf("unpaired UTF-16 surrogate %#04x", c)
			}
			i++
		case c >= 0xDC00 && c < 0xE000:
			return "", fmt.Errorf("unpaired UTF-16 surrogate %#04x", c)
		case c < 0x20:
			return "", fmt.Errorf("control character %#02x in a file name", c)
		}
	}
	return string(utf16.Decode(u)), nil
}

// decodeUTF8Name validates a MacX locator (a UTF-8 file URL).
func decodeUTF8Name(b []byte) (string, error) {
	if i := indexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	if !utf8.Valid(b) {
		return "", fmt.Errorf("invalid UTF-8 in a MacX locator")
	}
	for _, c := range b {
		if c < 0x20 {
			return "", fmt.Errorf("control character %#02x in a file name", c)
		}
	}
	return string(b), nil
}

func indexByte(b []byte, c byte) int {
	for i, x := range b {
		if x == c {
			return i
		}
	}
	return -1
}

func trimID(b []byte) string {
	return strings.TrimRight(string(b), "\x00 ")
}
