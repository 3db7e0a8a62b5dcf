package dmg

import (
	"encoding/binary"
	"fmt"
)

// Chunk types of a mish table.
const (
	typeZero       = 0x00000000
	typeRaw        = 0x00000001
	typeIgnore     = 0x00000002
	typeComment    = 0x7ffffffe
	typeADC        = 0x80000004
	typeZlib       = 0x80000005
	typeBzip2      = 0x80000006
	typeLZFSE      = 0x80000007
	typeTerminator = 0xffffffff
)

const (
	mishHeaderSize = 0xcc
	mishChunkSize  = 40
)

func typeName(t uint32) string {
	switch t {
	case typeZero:
		return "zero-fill"
	case typeRaw:
		return "raw"
	case typeIgnore:
		return "ignore"
	case typeComment:
		return "comment"
	case typeADC:
		return "ADC"
	case typeZlib:
		return "zlib"
	case typeBzip2:
		return "bzip2"
	case typeLZFSE:
		return "LZFSE"
	case typeTerminator:
		return "terminator"
	}
	return fmt.Sprintf("unknown type 0x%08x", t)
}

// chunk is one entry of the merged block map, in absolute terms.
type chunk struct {
	typ    uint32
	sector int64 // first virtual sector
	count  int64 // sectors
	off    int64 // offset of the stored bytes in the file
	length int64 // stored bytes
}

func (c *chunk) end() int64 { return c.sector + c.count }

// hole reports whether the chunk stores nothing (reads zeros).
func (c *chunk) hole() bool { return c.typ == typeZero || c.typ == typeIgnore }

// mish is one blkx table (one partition).
type mish struct {
	sector, count int64
	dataOffset    uint64
	buffers       uint32
	descriptor    uint32
	checksum      checksum
	chunks        []rawChunk
}

// rawChunk is a chunk entry as stored: relative sector and offset.
type rawChunk struct {
	typ, comment   uint32
	sector, count  uint64
	offset, length uint64
}

// parseMish decodes a blkx table. It returns (nil, nil) for data that is
// not a mish table (qemu skips those: resource forks hold other
// resources too). The declared chunk count must fit in the data.
func parseMish(b []byte) (*mish, error) {
	if len(b) < 4 || string(b[:4]) != mishMagic {
		return nil, nil
	}
	if len(b) < mishHeaderSize {
		return nil, fmt.Errorf("blkx table of %d bytes is shorter than its %d-byte header", len(b), mishHeaderSize)
	}
	be := binary.BigEndian
	sector, count := be.Uint64(b[8:]), be.Uint64(b[16:])
	if sector > maxSectors || count > maxSectors {
		return nil, fmt.Errorf("blkx table claims sectors [%d, +%d), past any disk size", sector, count)
	}
	m := &mish{
		sector:     int64(sector),
		count:      int64(count),
		dataOffset: be.Uint64(b[24:]),
		buffers:    be.Uint32(b[32:]),
		descriptor: be.Uint32(b[36:]),
		checksum:   getChecksum(b[64:]),
	}
	n := uint64(be.Uint32(b[200:]))
	room := uint64(len(b)-mishHeaderSize) / mishChunkSize
	if n > room {
		return nil, fmt.Errorf("blkx table declares %d chunks but holds room for %d", n, room)
	}
	m.chunks = make([]rawChunk, n)
	for i := range m.chunks {
		c := b[mishHeaderSize+i*mishChunkSize:]
		m.chunks[i] = rawChunk{
			typ: be.Uint32(c), comment: be.Uint32(c[4:]),
			sector: be.Uint64(c[8:]), count: be.Uint64(c[16:]),
			offset: be.Uint64(c[24:]), length: be.Uint64(c[32:]),
		}
	}
	return m, nil
}

// encode writes the table with its chunks.
func (m *mish) encode() []byte {
	b := make([]byte, mishHeaderSize+len(m.chunks)*mishChunkSize)
	be := binary.BigEndian
	copy(b, mishMagic)
	be.PutUint32(b[4:], 1)
	be.PutUint64(b[8:], uint64(m.sector))
	be.PutUint64(b[16:], uint64(m.count))
	be.PutUint64(b[24:], m.dataOffset)
	be.PutUint32(b[32:], m.buffers)
	be.PutUint32(b[36:], m.descriptor)
	m.checksum.put(b[64:])
	be.PutUint32(b[200:], uint32(len(m.chunks)))
	for i, c := range m.chunks {
		p := b[mishHeaderSize+i*mishChunkSize:]
		be.PutUint32(p, c.typ)
		be.PutUint32(p[4:], c.comment)
		be.PutUint64(p[8:], c.sector)
		be.PutUint64(p[16:], c.count)
		be.PutUint64(p[24:], c.offset)
		be.PutUint64(p[32:], c.length)
	}
	return b
}
