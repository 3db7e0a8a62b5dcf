package dmg

import (
	"bytes"
	"compress/zlib"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"strings"
)

// A second, independent DMG writer for the tests: it lays images out by
// hand from the format's description (big-endian fields at their
// offsets), with its own plist text and chunk encoders (the standard
// library's zlib, a small ADC encoder), so that vdisk's reader is checked
// against images it did not write. qemu-img reads them too (except ADC,
// which qemu does not implement).

type hchunk struct {
	typ     uint32
	sectors int64
	content []byte // the chunk's uncompressed bytes (nil for holes)
	stored  []byte // override of the stored bytes (hostile tests)
	length  int64  // override of the stored length when > 0
}

type hpart struct {
	name   string
	sector int64
	chunks []hchunk
}

type himage struct {
	parts   []hpart
	sectors int64 // trailer's sector count
	rsrc    bool  // block map in a resource fork instead of XML
	// hostile knobs
	chunkCount   map[int]uint32 // declared chunk count per partition
	xmlOverride  []byte
	kolyOverride func(k []byte)
}

func hzlib(b []byte) []byte {
	var buf bytes.Buffer
	w, _ := zlib.NewWriterLevel(&buf, 9)
	w.Write(b)
	w.Close()
	return buf.Bytes()
}

// hadc encodes b with ADC: runs of one byte as 3-byte codes copying from
// distance 1, repeats of the previous 16 bytes as 2-byte codes, the rest
// as literals.
func hadc(b []byte) []byte {
	var out, lit []byte
	flush := func() {
		for len(lit) > 0 {
			n := min(len(lit), 128)
			out = append(out, 0x80|byte(n-1))
			out = append(out, lit[:n]...)
			lit = lit[n:]
		}
	}
	for i := 0; i < len(b); {
		if i > 0 {
			n := 0
			for i+n < len(b) && b[i+n] == b[i-1] && n < 67 {
				n++
			}
			if n >= 4 {
				flush()
				out = append(out, 0x40|byte(n-4), 0, 0)
				i += n
				continue
			}
		}
		if i >= 16 {
			n := 0
			for i+n < len(b) && b[i+n] == b[i-16+n] && n < 18 {
				n++
			}
			if n >= 3 {
				flush()
				out = append(out, byte((n-3)<<2), 15) // distance 16
				i += n
				continue
			}
		}
		lit = append(lit, b[i])
		i++
	}
	flush()
	return out
}

// build lays the image out: data fork from 0, then the block map (XML or
// resource fork), then the trailer.
func (h *himage) build() []byte {
	be := binary.BigEndian
	var data []byte
	var tables [][]byte
	var sums []uint32
	for pi, p := range h.parts {
		var runs []byte
		var rel int64
		crc := uint32(0)
		n := 0
		for _, c := range p.chunks {
			stored := c.stored
			if stored == nil {
				switch c.typ {
				case typeRaw:
					stored = c.content
				case typeZlib:
					stored = hzlib(c.content)
				case typeADC:
					stored = hadc(c.content)
				}
			}
			content := c.content
			if content == nil {
				content = make([]byte, c.sectors*512)
			}
			crc = crc32.Update(crc, crc32.IEEETable, content)
			length := int64(len(stored))
			if c.length > 0 {
				length = c.length
			}
			r := make([]byte, 40)
			be.PutUint32(r, c.typ)
			be.PutUint64(r[8:], uint64(rel))
			be.PutUint64(r[16:], uint64(c.sectors))
			be.PutUint64(r[24:], uint64(len(data)))
			be.PutUint64(r[32:], uint64(length))
			runs = append(runs, r...)
			data = append(data, stored...)
			rel += c.sectors
			n++
		}
		// a comment and the terminator
		for _, typ := range []uint32{typeComment, typeTerminator} {
			r := make([]byte, 40)
			be.PutUint32(r, typ)
			be.PutUint64(r[8:], uint64(rel))
			be.PutUint64(r[24:], uint64(len(data)))
			runs = append(runs, r...)
			n++
		}
		t := make([]byte, 204)
		copy(t, "mish")
		be.PutUint32(t[4:], 1)
		be.PutUint64(t[8:], uint64(p.sector))
		be.PutUint64(t[16:], uint64(rel))
		be.PutUint32(t[32:], 2056)
		be.PutUint32(t[36:], uint32(pi))
		be.PutUint32(t[64:], 2)
		be.PutUint32(t[68:], 32)
		be.PutUint32(t[72:], crc)
		cnt := uint32(n)
		if v, ok := h.chunkCount[pi]; ok {
			cnt = v
		}
		be.PutUint32(t[200:], cnt)
		tables = append(tables, append(t, runs...))
		sums = append(sums, crc)
	}
	out := append([]byte(nil), data...)
	k := make([]byte, 512)
	copy(k, "koly")
	be.PutUint32(k[4:], 4)
	be.PutUint32(k[8:], 512)
	be.PutUint32(k[12:], 1)
	be.PutUint64(k[0x20:], uint64(len(data)))
	be.PutUint32(k[0x38:], 1)
	be.PutUint32(k[0x3c:], 1)
	be.PutUint32(k[0x50:], 2)
	be.PutUint32(k[0x54:], 32)
	be.PutUint32(k[0x58:], crc32.ChecksumIEEE(data))
	if h.rsrc {
		var rd []byte
		for _, t := range tables {
			rd = be.AppendUint32(rd, uint32(len(t)))
			rd = append(rd, t...)
		}
		hdr := make([]byte, 256)
		be.PutUint32(hdr, 256)
		be.PutUint32(hdr[4:], uint32(256+len(rd)))
		be.PutUint32(hdr[8:], uint32(len(rd)))
		be.PutUint32(hdr[12:], 30)
		fork := append(append(hdr, rd...), make([]byte, 30)...)
		be.PutUint64(k[0x28:], uint64(len(out)))
		be.PutUint64(k[0x30:], uint64(len(fork)))
		out = append(out, fork...)
	} else {
		var x strings.Builder
		x.WriteString("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<plist version=\"1.0\"><dict><key>resource-fork</key><dict>")
		x.WriteString("<key>plst</key><array><dict><key>Attributes</key><string>0x0050</string><key>Data</key><data>AAAA</data></dict></array>")
		x.WriteString("<key>blkx</key><array>")
		for i, t := range tables {
			fmt.Fprintf(&x, "<dict><key>Attributes</key><string>0x0050</string><key>Data</key><data>%s</data><key>ID</key><string>%d</string><key>Name</key><string>%s</string></dict>",
				base64.StdEncoding.EncodeToString(t), i, h.parts[i].name)
		}
		x.WriteString("</array></dict></dict></plist>\n")
		xml := []byte(x.String())
		if h.xmlOverride != nil {
			xml = h.xmlOverride
		}
		be.PutUint64(k[0xd8:], uint64(len(out)))
		be.PutUint64(k[0xe0:], uint64(len(xml)))
		out = append(out, xml...)
	}
	var ms []byte
	for _, s := range sums {
		ms = be.AppendUint32(ms, s)
	}
	be.PutUint32(k[0x160:], 2)
	be.PutUint32(k[0x164:], 32)
	be.PutUint32(k[0x168:], crc32.ChecksumIEEE(ms))
	be.PutUint32(k[0x1e8:], 1)
	be.PutUint64(k[0x1ec:], uint64(h.sectors))
	if h.kolyOverride != nil {
		h.kolyOverride(k)
	}
	return append(out, k...)
}

// content returns what the image reads as (holes as zeros).
func (h *himage) content() []byte {
	out := make([]byte, h.sectors*512)
	for _, p := range h.parts {
		off := p.sector * 512
		for _, c := range p.chunks {
			if c.content != nil && off < int64(len(out)) {
				copy(out[off:], c.content)
			}
			off += c.sectors * 512
		}
	}
	return out
}
