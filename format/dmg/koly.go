package dmg

import (
	"bytes"
	"encoding/binary"
)

const (
	sectorSize = 512
	kolySize   = 512
	kolyMagic  = "koly"
	mishMagic  = "mish"

	checksumCRC32 = 2 // UDIF checksum type: CRC-32, 32 bits

	variantDevice = 1 // kUDIFDeviceImageType
	flagFlattened = 1 // kUDIFFlagsFlattened

	// qemu's limits on one chunk: at most 64 MiB stored and 131072 sectors
	// (64 MiB) once decompressed, so a chunk is bounded in memory.
	maxChunkLength  = 64 << 20
	maxChunkSectors = maxChunkLength / sectorSize

	// maxMetadata bounds the XML plist or resource fork read into memory
	// (qemu accepts 16 MiB of XML; large images with 1 MiB chunks need
	// about 54 bytes of XML per chunk, so 256 MiB covers 4 TiB of data).
	maxMetadata = 256 << 20

	// maxSectors keeps sector arithmetic and byte sizes inside int64.
	maxSectors = (1<<63 - 1) / sectorSize
)

// checksum is a UDIF checksum field: type, size in bits and 128 bytes of
// value (a CRC-32 uses the first 4).
type checksum struct {
	typ, bits uint32
	value     uint32
}

func (c checksum) put(b []byte) {
	binary.BigEndian.PutUint32(b, c.typ)
	binary.BigEndian.PutUint32(b[4:], c.bits)
	binary.BigEndian.PutUint32(b[8:], c.value)
}

func getChecksum(b []byte) checksum {
	return checksum{typ: binary.BigEndian.Uint32(b), bits: binary.BigEndian.Uint32(b[4:]), value: binary.BigEndian.Uint32(b[8:])}
}

func crcChecksum(v uint32) checksum { return checksum{typ: checksumCRC32, bits: 32, value: v} }

// koly is the UDIF trailer.
type koly struct {
	version, headerSize, flags uint32
	runningDataFork            uint64
	dataForkOffset             uint64
	dataForkLength             uint64
	rsrcForkOffset             uint64
	rsrcForkLength             uint64
	segmentNumber              uint32
	segmentCount               uint32
	segmentID                  [16]byte
	dataChecksum               checksum
	xmlOffset, xmlLength       uint64
	masterChecksum             checksum
	variant                    uint32
	sectorCount                uint64
}

func decodeKoly(b []byte) koly {
	be := binary.BigEndian
	k := koly{
		version:         be.Uint32(b[4:]),
		headerSize:      be.Uint32(b[8:]),
		flags:           be.Uint32(b[12:]),
		runningDataFork: be.Uint64(b[0x10:]),
		dataForkOffset:  be.Uint64(b[0x18:]),
		dataForkLength:  be.Uint64(b[0x20:]),
		rsrcForkOffset:  be.Uint64(b[0x28:]),
		rsrcForkLength:  be.Uint64(b[0x30:]),
		segmentNumber:   be.Uint32(b[0x38:]),
		segmentCount:    be.Uint32(b[0x3c:]),
		dataChecksum:    getChecksum(b[0x50:]),
		xmlOffset:       be.Uint64(b[0xd8:]),
		xmlLength:       be.Uint64(b[0xe0:]),
		masterChecksum:  getChecksum(b[0x160:]),
		variant:         be.Uint32(b[0x1e8:]),
		sectorCount:     be.Uint64(b[0x1ec:]),
	}
	copy(k.segmentID[:], b[0x40:0x50])
	return k
}

func (k *koly) encode() []byte {
	b := make([]byte, kolySize)
	be := binary.BigEndian
	copy(b, kolyMagic)
	be.PutUint32(b[4:], k.version)
	be.PutUint32(b[8:], k.headerSize)
	be.PutUint32(b[12:], k.flags)
	be.PutUint64(b[0x10:], k.runningDataFork)
	be.PutUint64(b[0x18:], k.dataForkOffset)
	be.PutUint64(b[0x20:], k.dataForkLength)
	be.PutUint64(b[0x28:], k.rsrcForkOffset)
	be.PutUint64(b[0x30:], k.rsrcForkLength)
	be.PutUint32(b[0x38:], k.segmentNumber)
	be.PutUint32(b[0x3c:], k.segmentCount)
	copy(b[0x40:0x50], k.segmentID[:])
	k.dataChecksum.put(b[0x50:])
	be.PutUint64(b[0xd8:], k.xmlOffset)
	be.PutUint64(b[0xe0:], k.xmlLength)
	k.masterChecksum.put(b[0x160:])
	be.PutUint32(b[0x1e8:], k.variant)
	be.PutUint64(b[0x1ec:], k.sectorCount)
	return b
}

// findKoly returns the offset of the trailer in a file of size bytes whose
// last (up to) 1023 bytes are tail: at size-512 normally, else anywhere in
// the last 515 bytes as qemu searches (images whose size is not a
// multiple of 512). -1 when there is none.
func findKoly(tail []byte, size int64) int64 {
	if size < kolySize {
		return -1
	}
	if bytes.Equal(tail[len(tail)-kolySize:len(tail)-kolySize+4], []byte(kolyMagic)) {
		return size - kolySize
	}
	start := max(0, len(tail)-1023)
	if i := bytes.Index(tail[start:min(len(tail), start+515)], []byte(kolyMagic)); i >= 0 {
		off := size - int64(len(tail)) + int64(start+i)
		if off+kolySize <= size {
			return off
		}
	}
	return -1
}
