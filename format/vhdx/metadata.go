package vhdx

import (
	"encoding/binary"
	"fmt"
	"sort"

	"github.com/vdisk/vdisk/driver"
)

// Metadata item flags.
const (
	metaIsUser        = 1 << 0
	metaIsVirtualDisk = 1 << 1
	metaIsRequired    = 1 << 2

	fpLeaveAllocated = 1 << 0
	fpHasParent      = 1 << 1

	// maxLocatorSize bounds the parent locator item read into memory.
	maxLocatorSize = 64 * kib
	maxLocatorKeys = 256
)

// metaEntry is one entry of the metadata table.
type metaEntry struct {
	id     guid
	off    uint32 // relative to the metadata region
	length uint32
	flags  uint32
}

// params is what the metadata region says about the disk.
type params struct {
	blockSize      int64
	leaveAllocated bool
	hasParent      bool
	diskSize       int64
	logicalSector  int64
	physicalSector int64
	page83         guid
	locator        *locator
}

// locator is a VHDX parent locator: key/value pairs.
type locator struct {
	typ  guid
	keys []string
	vals map[string]string
}

func (l *locator) get(k string) string {
	if l == nil {
		return ""
	}
	return l.vals[k]
}

// parseMetadata decodes the metadata region's table and its known items.
// region is the whole region (its length bounded by the caller).
func (im *image) parseMetadata(region []byte, base int64) (params, []metaEntry, error) {
	var p params
	if string(region[:8]) != metaSignature {
		return p, nil, im.corrupt(base, "bad metadata table signature")
	}
	n := int(binary.LittleEndian.Uint16(region[10:]))
	if n > maxMetaEntries {
		return p, nil, im.corrupt(base+10, "metadata table has %d entries (at most %d)", n, maxMetaEntries)
	}
	var ents []metaEntry
	seen := map[guid]bool{}
	type span struct{ off, end int64 }
	var spans []span
	for i := 0; i < n; i++ {
		e := region[32+32*i:]
		var m metaEntry
		copy(m.id[:], e[:16])
		m.off = binary.LittleEndian.Uint32(e[16:])
		m.length = binary.LittleEndian.Uint32(e[20:])
		m.flags = binary.LittleEndian.Uint32(e[24:])
		eoff := base + 32 + 32*int64(i)
		if seen[m.id] {
			return p, nil, im.corrupt(eoff, "metadata item %s appears twice", m.id)
		}
		seen[m.id] = true
		if m.length == 0 {
			if m.off != 0 {
				return p, nil, im.corrupt(eoff, "empty metadata item %s has offset %d", m.id, m.off)
			}
		} else {
			if int64(m.off) < metaTableSize || int64(m.off)+int64(m.length) > int64(len(region)) {
				return p, nil, im.corrupt(eoff, "metadata item %s (%d bytes at %d) lies outside the %d-byte metadata region", m.id, m.length, m.off, len(region))
			}
			spans = append(spans, span{int64(m.off), int64(m.off) + int64(m.length)})
		}
		ents = append(ents, m)
	}
	sort.Slice(spans, func(a, b int) bool { return spans[a].off < spans[b].off })
	for i := 1; i < len(spans); i++ {
		if spans[i].off < spans[i-1].end {
			return p, nil, im.corrupt(base+spans[i].off, "metadata items overlap")
		}
	}
	get := func(id guid, size uint32, what string) ([]byte, error) {
		for _, m := range ents {
			if m.id == id {
				if m.length < size {
					return nil, im.corrupt(base+int64(m.off), "metadata item %s is %d bytes, want %d", what, m.length, size)
				}
				return region[m.off : m.off+m.length], nil
			}
		}
		return nil, nil
	}
	for _, m := range ents {
		switch m.id {
		case guidFileParam, guidDiskSize, guidPage83, guidLogical, guidPhysical, guidParentLoc:
		default:
			if m.flags&metaIsRequired != 0 {
				return p, nil, driver.Unsupportedf(im.name, "required metadata item %s is unknown", m.id)
			}
		}
	}
	b, err := get(guidFileParam, 8, "file parameters")
	if err != nil {
		return p, nil, err
	}
	if b == nil {
		return p, nil, im.corrupt(base, "the metadata has no file parameters")
	}
	bs := binary.LittleEndian.Uint32(b)
	fl := binary.LittleEndian.Uint32(b[4:])
	if bs < minBlockSize || bs > maxBlockSize || bs&(bs-1) != 0 {
		return p, nil, im.corrupt(base, "block size %d is not a power of two from 1 MiB to 256 MiB", bs)
	}
	p.blockSize = int64(bs)
	p.leaveAllocated = fl&fpLeaveAllocated != 0
	p.hasParent = fl&fpHasParent != 0

	if b, err = get(guidDiskSize, 8, "virtual disk size"); err != nil {
		return p, nil, err
	} else if b == nil {
		return p, nil, im.corrupt(base, "the metadata has no virtual disk size")
	}
	ds := binary.LittleEndian.Uint64(b)
	if b, err = get(guidLogical, 4, "logical sector size"); err != nil {
		return p, nil, err
	} else if b == nil {
		return p, nil, im.corrupt(base, "the metadata has no logical sector size")
	}
	p.logicalSector = int64(binary.LittleEndian.Uint32(b))
	if p.logicalSector != 512 && p.logicalSector != 4096 {
		return p, nil, im.corrupt(base, "logical sector size %d is neither 512 nor 4096", p.logicalSector)
	}
	if ds == 0 || ds > maxDiskSize || ds%uint64(p.logicalSector) != 0 {
		return p, nil, im.corrupt(base, "virtual disk size %d is not a multiple of the %d-byte sector from one sector to 64 TiB", ds, p.logicalSector)
	}
	p.diskSize = int64(ds)
	if b, err = get(guidPhysical, 4, "physical sector size"); err != nil {
		return p, nil, err
	} else if b == nil {
		return p, nil, im.corrupt(base, "the metadata has no physical sector size")
	}
	p.physicalSector = int64(binary.LittleEndian.Uint32(b))
	if p.physicalSector != 512 && p.physicalSector != 4096 {
		return p, nil, im.corrupt(base, "physical sector size %d is neither 512 nor 4096", p.physicalSector)
	}
	if b, err = get(guidPage83, 16, "page 83 data"); err != nil {
		return p, nil, err
	} else if b != nil {
		copy(p.page83[:], b)
	}
	if p.hasParent {
		var m *metaEntry
		for i := range ents {
			if ents[i].id == guidParentLoc {
				m = &ents[i]
			}
		}
		if m == nil || m.length == 0 {
			return p, nil, im.corrupt(base, "differencing image without a parent locator")
		}
		if m.length > maxLocatorSize {
			return p, nil, im.corrupt(base+int64(m.off), "parent locator of %d bytes (at most %d)", m.length, maxLocatorSize)
		}
		l, err := parseLocator(region[m.off : m.off+m.length])
		if err != nil {
			return p, nil, im.corrupt(base+int64(m.off), "parent locator: %v", err)
		}
		p.locator = l
	}
	return p, ents, nil
}

// parseLocator decodes a parent locator item.
func parseLocator(b []byte) (*locator, error) {
	if len(b) < 20 {
		return nil, fmt.Errorf("%d bytes is too short", len(b))
	}
	l := &locator{vals: map[string]string{}}
	copy(l.typ[:], b[:16])
	n := int(binary.LittleEndian.Uint16(b[18:]))
	if n > maxLocatorKeys || 20+12*n > len(b) {
		return nil, fmt.Errorf("%d key/value entries do not fit in %d bytes", n, len(b))
	}
	for i := 0; i < n; i++ {
		e := b[20+12*i:]
		ko, vo := int64(binary.LittleEndian.Uint32(e)), int64(binary.LittleEndian.Uint32(e[4:]))
		kl, vl := int64(binary.LittleEndian.Uint16(e[8:])), int64(binary.LittleEndian.Uint16(e[10:]))
		if ko+kl > int64(len(b)) || vo+vl > int64(len(b)) {
			return nil, fmt.Errorf("entry %d points outside the item", i)
		}
		k, err := decodeUTF16(b[ko : ko+kl])
		if err != nil {
			return nil, fmt.Errorf("entry %d key: %v", i, err)
		}
		v, err := decodeUTF16(b[vo : vo+vl])
		if err != nil {
			return nil, fmt.Errorf("entry %d value: %v", i, err)
		}
		if _, dup := l.vals[k]; dup {
			return nil, fmt.Errorf("key %q appears twice", k)
		}
		l.keys = append(l.keys, k)
		l.vals[k] = v
	}
	return l, nil
}

// marshalLocator encodes a VHDX parent locator with keys in order.
func marshalLocator(keys []string, vals map[string]string) []byte {
	hdr := 20 + 12*len(keys)
	b := make([]byte, hdr)
	copy(b, guidVHDXLocator[:])
	binary.LittleEndian.PutUint16(b[18:], uint16(len(keys)))
	for i, k := range keys {
		kb, vb := encodeUTF16(k), encodeUTF16(vals[k])
		e := b[20+12*i:]
		binary.LittleEndian.PutUint32(e, uint32(len(b)))
		binary.LittleEndian.PutUint16(e[8:], uint16(len(kb)))
		b = append(b, kb...)
		e = b[20+12*i:]
		binary.LittleEndian.PutUint32(e[4:], uint32(len(b)))
		binary.LittleEndian.PutUint16(e[10:], uint16(len(vb)))
		b = append(b, vb...)
	}
	return b
}

// metaItem is an item to write into a new metadata region.
type metaItem struct {
	id    guid
	flags uint32
	data  []byte
}

// marshalMetadata lays out a metadata region of size bytes: the table,
// then the items from offset 64 KiB on.
func marshalMetadata(items []metaItem, size int64) []byte {
	b := make([]byte, size)
	copy(b, metaSignature)
	binary.LittleEndian.PutUint16(b[10:], uint16(len(items)))
	off := uint32(metaTableSize)
	for i, it := range items {
		e := b[32+32*i:]
		copy(e, it.id[:])
		if len(it.data) == 0 {
			// An empty item records offset 0.
			binary.LittleEndian.PutUint32(e[24:], it.flags)
			continue
		}
		binary.LittleEndian.PutUint32(e[16:], off)
		binary.LittleEndian.PutUint32(e[20:], uint32(len(it.data)))
		binary.LittleEndian.PutUint32(e[24:], it.flags)
		copy(b[off:], it.data)
		off += uint32(roundUp(int64(len(it.data)), 8))
	}
	return b
}

func u32le(v uint32) []byte { b := make([]byte, 4); binary.LittleEndian.PutUint32(b, v); return b }
func u64le(v uint64) []byte { b := make([]byte, 8); binary.LittleEndian.PutUint64(b, v); return b }
