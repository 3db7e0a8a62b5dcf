package parallels

import (
	"encoding/binary"
	"math"

	"github.com/vdisk/vdisk/driver"
)

const (
	headerSize = 64
	sectorSize = 512

	magicOld = "WithoutFreeSpace" // BAT entries in sectors
	magicExt = "WithouFreSpacExt" // BAT entries in clusters

	version = 2

	inuseMagic  = 0x746F6E59 // "Ynot": open for writing
	closedMagic = 0x312e3276 // Parallels' clean-close value

	// maxTracks bounds the cluster size as qemu does (tracks <=
	// INT32_MAX/513, just under 2 GiB clusters), so that cluster arithmetic
	// never overflows.
	maxTracks = math.MaxInt32 / 513

	// qemu's geometry for the images it creates.
	createHeads  = 16
	secInCyl     = 32
	defaultCSize = 1 << 20
)

// header is the decoded 64-byte header.
type header struct {
	magic      string
	version    uint32
	heads      uint32
	cylinders  uint32
	tracks     uint32
	batEntries uint32
	nbSectors  uint64
	inuse      uint32
	dataOff    uint32
	flags      uint32
	extOff     uint64
}

func (h *header) ext() bool { return h.magic == magicExt }

func decodeHeader(b []byte) header {
	le := binary.LittleEndian
	return header{
		magic:      string(b[0:16]),
		version:    le.Uint32(b[16:]),
		heads:      le.Uint32(b[20:]),
		cylinders:  le.Uint32(b[24:]),
		tracks:     le.Uint32(b[28:]),
		batEntries: le.Uint32(b[32:]),
		nbSectors:  le.Uint64(b[36:]),
		inuse:      le.Uint32(b[44:]),
		dataOff:    le.Uint32(b[48:]),
		flags:      le.Uint32(b[52:]),
		extOff:     le.Uint64(b[56:]),
	}
}

func (h *header) encode() []byte {
	b := make([]byte, headerSize)
	le := binary.LittleEndian
	copy(b[0:16], h.magic)
	le.PutUint32(b[16:], h.version)
	le.PutUint32(b[20:], h.heads)
	le.PutUint32(b[24:], h.cylinders)
	le.PutUint32(b[28:], h.tracks)
	le.PutUint32(b[32:], h.batEntries)
	le.PutUint64(b[36:], h.nbSectors)
	le.PutUint32(b[44:], h.inuse)
	le.PutUint32(b[48:], h.dataOff)
	le.PutUint32(b[52:], h.flags)
	le.PutUint64(b[56:], h.extOff)
	return b
}

// layout is what the header means, validated against the file.
type layout struct {
	cs      int64 // cluster size in bytes
	mult    int64 // bytes per BAT entry unit: 512 or cs
	dataOff int64 // start of the data area in bytes
	size    int64 // virtual size in bytes
}

// batEnd is the byte offset just past a BAT of n entries.
func batEnd(n int64) int64 { return headerSize + 4*n }

// validate checks every header field against the format's limits and the
// file size before anything is allocated by it.
func (h *header) validate(name string, fileSize int64) (layout, error) {
	var l layout
	if h.magic != magicOld && h.magic != magicExt {
		return l, driver.Corruptf(name, 0, "not a Parallels image (bad magic)")
	}
	if h.version != version {
		return l, driver.Unsupportedf(name, "Parallels image version %d (only version %d exists)", h.version, version)
	}
	if h.tracks == 0 {
		return l, driver.Corruptf(name, 28, "cluster size of zero sectors")
	}
	if h.tracks > maxTracks {
		return l, driver.Corruptf(name, 28, "cluster size of %d sectors is too big (at most %d)", h.tracks, maxTracks)
	}
	l.cs = int64(h.tracks) * sectorSize
	l.mult = sectorSize
	nb := h.nbSectors
	if h.ext() {
		l.mult = l.cs
	} else {
		nb &= 0xFFFFFFFF // only the low half counts in the original format
	}
	// The BAT must lie inside the file: this bounds its allocation by the
	// file's real size.
	be := batEnd(int64(h.batEntries))
	if be > fileSize {
		return l, driver.Corruptf(name, 32, "BAT of %d entries ends at %d, past the end of the %d-byte file", h.batEntries, be, fileSize)
	}
	// bat_entries*cs cannot overflow: entries < 2^32, cs < 2^31.
	maxSize := int64(h.batEntries) * l.cs
	if nb > uint64(math.MaxInt64/sectorSize) {
		return l, driver.Corruptf(name, 36, "virtual size of %d sectors overflows", nb)
	}
	l.size = int64(nb) * sectorSize
	if l.size > maxSize {
		return l, driver.Corruptf(name, 36, "virtual size %d is larger than the %d clusters of %d bytes the BAT covers", l.size, h.batEntries, l.cs)
	}
	if h.dataOff == 0 {
		if h.ext() {
			return l, driver.Corruptf(name, 48, "data offset is 0 in a WithouFreSpacExt image")
		}
		l.dataOff = (be + sectorSize - 1) &^ (sectorSize - 1)
	} else {
		l.dataOff = int64(h.dataOff) * sectorSize
		if l.dataOff < be {
			return l, driver.Corruptf(name, 48, "data area at %d overlaps the BAT (which ends at %d)", l.dataOff, be)
		}
	}
	return l, nil
}

// firstSlot is the offset of the first cluster slot of the data area:
// cluster offsets are a whole number of clusters past the data offset in
// the original format, and whole clusters from the start of the file in
// the extended one (whose entries count clusters), so a data offset off
// the cluster grid there just leaves the start of its first cluster unused.
func (l layout) firstSlot() int64 { return l.alignUp(l.dataOff) }

// alignUp rounds off (>= the data offset) up to a cluster slot.
func (l layout) alignUp(off int64) int64 {
	base := l.dataOff
	if l.mult == l.cs {
		base = 0
	}
	return base + (off-base+l.cs-1)/l.cs*l.cs
}

// onGrid reports whether off is a cluster slot of the data area.
func (l layout) onGrid(off int64) bool {
	return off >= l.dataOff && l.alignUp(off) == off
}
