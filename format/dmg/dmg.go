package dmg

import (
	"context"
	"fmt"
	"io"
	"sort"
	"sync"

	"github.com/vdisk/vdisk/driver"
)

func init() { driver.Register(Format) }

// Subformats as hdiutil names them (-o subformat=...).
var subformats = []string{"UDZO", "UDBZ", "UDRO", "UDRW"}

// Format is the DMG format descriptor.
var Format = &driver.Format{
	Name:        "dmg",
	Extensions:  []string{"dmg"},
	Description: "Apple disk image (UDIF); written once by convert",
	Caps:        driver.CapCreateDynamic | driver.CapCompress,
	CreateOptions: []driver.Option{
		{Name: "subformat", Type: driver.TypeEnum, Default: "UDZO", Values: subformats,
			Doc: "UDZO (zlib), UDBZ (bzip2), UDRO or UDRW (uncompressed)"},
		{Name: "zlib-level", Type: driver.TypeInt, Default: "1", Min: 1, Max: 9,
			Doc: "zlib level of UDZO chunks (hdiutil's -imagekey zlib-level; 1, its default, is fastest)"},
	},
	Probe:  probe,
	Create: create,
	Open:   open,
}

// cacheBudget bounds the decompressed chunks kept for reads (at least
// cacheMinEntries are kept whatever their size).
const (
	cacheBudget     = 32 << 20
	cacheMinEntries = 2
)

// probe finds the koly trailer at the end of the file.
func probe(r io.ReaderAt, size int64) int {
	if size < kolySize {
		return 0
	}
	n := min(size, 1023)
	tail := make([]byte, n)
	if err := driver.ReadFullAt(r, tail, size-n); err != nil {
		return 0
	}
	ko := findKoly(tail, size)
	if ko < 0 {
		return 0
	}
	k := decodeKoly(tail[ko-(size-n):])
	if k.xmlLength == 0 && k.rsrcForkLength == 0 {
		return 20
	}
	if ko == size-kolySize && k.version == 4 && k.headerSize == kolySize {
		return 100
	}
	return 60
}

// image is an open DMG: read-only, or being written (w != nil).
type image struct {
	f    driver.File
	name string
	size int64
	k    koly

	chunks []chunk // sorted by sector, not overlapping
	parts  []Partition
	cache  *chunkCache

	w *writer

	closeMu sync.Mutex
	closed  bool
}

// Partition describes one blkx table (for info).
type Partition struct {
	Name   string `json:"name"`
	Start  int64  `json:"start"`
	Length int64  `json:"length"`
	Chunks int    `json:"chunks"`
}

// Specific is the format-specific part of info (qemu-img shows none for
// dmg).
type Specific struct {
	Subformat  string      `json:"subformat,omitempty"`
	Partitions []Partition `json:"partitions,omitempty"`
}

func open(ctx context.Context, p *driver.OpenParams) (driver.Image, error) {
	if !p.ReadOnly {
		return nil, driver.Errorf(driver.ErrReadOnly, p.Name, -1,
			"DMG images are read-only once written (vdisk writes them only with convert -O dmg); open it read-only")
	}
	flag := driver.ReadOnly
	if p.Direct {
		flag |= driver.Direct
	}
	f, err := p.Storage.Open(p.Name, flag)
	if err != nil {
		return nil, driver.WithFile(err, "open", p.Name)
	}
	im, err := load(f, p.Name)
	if err != nil {
		f.Close()
		return nil, err
	}
	return im, nil
}

// load reads the trailer and the block map, validating every offset and
// length against the file before using it.
func load(f driver.File, name string) (*image, error) {
	fsize, err := f.Size()
	if err != nil {
		return nil, driver.WithFile(err, "open", name)
	}
	if fsize < kolySize {
		return nil, driver.Corruptf(name, 0, "a %d-byte file is too small for a DMG (512-byte koly trailer)", fsize)
	}
	n := min(fsize, 1023)
	tail := make([]byte, n)
	if err := driver.ReadFullAt(f, tail, fsize-n); err != nil {
		return nil, driver.WithFile(err, "open", name)
	}
	ko := findKoly(tail, fsize)
	if ko < 0 {
		return nil, driver.Corruptf(name, fsize-kolySize, "no UDIF trailer (\"koly\") at the end of the file")
	}
	k := decodeKoly(tail[ko-(fsize-n):])
	im := &image{f: f, name: name, k: k, cache: newChunkCache(cacheBudget, cacheMinEntries)}
	if k.dataForkOffset > uint64(ko) {
		return nil, driver.Corruptf(name, ko+0x18, "data fork offset %d lies past the trailer at %d", k.dataForkOffset, ko)
	}
	if k.sectorCount > maxSectors {
		return nil, driver.Corruptf(name, ko+0x1ec, "sector count %d is too large", k.sectorCount)
	}
	var tables [][]byte
	var names []string
	switch {
	case k.rsrcForkLength != 0:
		meta, err := readMeta(f, name, ko, k.rsrcForkOffset, k.rsrcForkLength, ko+0x28, "resource fork")
		if err != nil {
			return nil, err
		}
		if tables, err = parseRsrc(meta); err != nil {
			return nil, driver.Corruptf(name, int64(k.rsrcForkOffset), "resource fork: %v", err)
		}
		names = make([]string, len(tables))
	case k.xmlLength != 0:
		meta, err := readMeta(f, name, ko, k.xmlOffset, k.xmlLength, ko+0xd8, "XML property list")
		if err != nil {
			return nil, err
		}
		entries, err := parsePlist(meta)
		if err != nil {
			return nil, driver.Corruptf(name, int64(k.xmlOffset), "XML property list: %v", err)
		}
		for _, e := range entries {
			tables = append(tables, e.data)
			names = append(names, e.name)
		}
	default:
		return nil, driver.Corruptf(name, ko, "the trailer records neither an XML property list nor a resource fork (no block map)")
	}
	if err := im.buildMap(tables, names, ko); err != nil {
		return nil, err
	}
	return im, nil
}

// readMeta reads the metadata region [off, off+n) that the trailer at ko
// records (field at fieldOff), bounded by the trailer and maxMetadata.
func readMeta(f driver.File, name string, ko int64, off, n uint64, fieldOff int64, what string) ([]byte, error) {
	if off >= uint64(ko) || n > uint64(ko)-off {
		return nil, driver.Corruptf(name, fieldOff, "%s [%d, +%d) lies past the trailer at %d", what, off, n, ko)
	}
	if n > maxMetadata {
		return nil, driver.Unsupportedf(name, "%s of %d bytes is larger than the %d bytes vdisk reads", what, n, maxMetadata)
	}
	b := make([]byte, n)
	if err := driver.ReadFullAt(f, b, int64(off)); err != nil {
		return nil, driver.WithFile(err, "open", name)
	}
	return b, nil
}

// parseRsrc returns the resources of a classic resource fork's data area
// (each a 4-byte length and its bytes); as qemu does, every one is tried
// as a mish table (parseMish skips the others).
func parseRsrc(b []byte) ([][]byte, error) {
	if len(b) < 16 {
		return nil, fmt.Errorf("%d bytes is too short for a resource fork header", len(b))
	}
	dataOff := uint64(uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3]))
	dataLen := uint64(uint32(b[8])<<24 | uint32(b[9])<<16 | uint32(b[10])<<8 | uint32(b[11]))
	if dataLen == 0 || dataOff > uint64(len(b)) || dataLen > uint64(len(b))-dataOff {
		return nil, fmt.Errorf("resource data [%d, +%d) lies outside the %d-byte fork", dataOff, dataLen, len(b))
	}
	data := b[dataOff : dataOff+dataLen]
	var out [][]byte
	for p := uint64(0); p < uint64(len(data)); {
		if uint64(len(data))-p < 4 {
			return nil, fmt.Errorf("resource at data offset %d is cut short", p)
		}
		n := uint64(uint32(data[p])<<24 | uint32(data[p+1])<<16 | uint32(data[p+2])<<8 | uint32(data[p+3]))
		p += 4
		if n == 0 || n > uint64(len(data))-p {
			return nil, fmt.Errorf("resource of %d bytes at data offset %d runs past the resource data", n, p-4)
		}
		out = append(out, data[p:p+n])
		p += n
	}
	return out, nil
}

// buildMap merges the chunks of every blkx table into one sorted map.
func (im *image) buildMap(tables [][]byte, names []string, ko int64) error {
	dataFork := int64(im.k.dataForkOffset)
	var endSector int64
	for ti, tb := range tables {
		m, err := parseMish(tb)
		if err != nil {
			return driver.Corruptf(im.name, -1, "blkx table %d: %v", ti, err)
		}
		if m == nil {
			continue
		}
		part := Partition{Name: names[ti], Start: m.sector * sectorSize, Length: m.count * sectorSize}
		if m.dataOffset > uint64(ko) {
			return driver.Corruptf(im.name, -1, "blkx table %d: data offset %d lies past the trailer", ti, m.dataOffset)
		}
		base := dataFork + int64(m.dataOffset)
		for ci, rc := range m.chunks {
			if rc.typ == typeComment || rc.typ == typeTerminator || rc.count == 0 {
				continue
			}
			if rc.sector > maxSectors || rc.count > maxSectors || uint64(m.sector)+rc.sector > maxSectors-rc.count {
				return driver.Corruptf(im.name, -1, "blkx table %d chunk %d: sectors [%d, +%d) past any disk size", ti, ci, rc.sector, rc.count)
			}
			c := chunk{typ: rc.typ, sector: m.sector + int64(rc.sector), count: int64(rc.count)}
			if !c.hole() {
				if rc.count > maxChunkSectors {
					return driver.Corruptf(im.name, -1, "blkx table %d chunk %d (%s): %d sectors is more than the %d a chunk may hold", ti, ci, typeName(rc.typ), rc.count, maxChunkSectors)
				}
				if rc.length > maxChunkLength {
					return driver.Corruptf(im.name, -1, "blkx table %d chunk %d (%s): stored length %d is more than the %d a chunk may use", ti, ci, typeName(rc.typ), rc.length, maxChunkLength)
				}
				if rc.offset > uint64(ko) || rc.length > uint64(ko) || uint64(base)+rc.offset > uint64(ko)-rc.length {
					return driver.Corruptf(im.name, -1, "blkx table %d chunk %d (%s): stored bytes [%d, +%d) lie past the data fork (trailer at %d)", ti, ci, typeName(rc.typ), uint64(base)+rc.offset, rc.length, ko)
				}
				c.off, c.length = base+int64(rc.offset), int64(rc.length)
				if c.typ == typeRaw && c.length < c.count*sectorSize {
					return driver.Corruptf(im.name, c.off, "blkx table %d chunk %d: a raw chunk of %d sectors stores only %d bytes", ti, ci, c.count, c.length)
				}
			}
			im.chunks = append(im.chunks, c)
			part.Chunks++
			endSector = max(endSector, c.end())
		}
		im.parts = append(im.parts, part)
	}
	sort.SliceStable(im.chunks, func(i, j int) bool { return im.chunks[i].sector < im.chunks[j].sector })
	for i := 1; i < len(im.chunks); i++ {
		a, b := &im.chunks[i-1], &im.chunks[i]
		if b.sector < a.end() {
			return driver.Corruptf(im.name, -1, "chunks overlap: sectors [%d, %d) (%s) and [%d, %d) (%s)", a.sector, a.end(), typeName(a.typ), b.sector, b.end(), typeName(b.typ))
		}
	}
	sectors := int64(im.k.sectorCount)
	if sectors == 0 {
		// Some writers (libdmg's whole-disk images) leave the trailer's
		// sector count at 0; the block map still says how large the disk is.
		sectors = endSector
	}
	im.size = sectors * sectorSize
	return nil
}

// find returns the index of the first chunk ending after byte off.
func (im *image) find(off int64) int {
	s := off / sectorSize
	return sort.Search(len(im.chunks), func(i int) bool { return im.chunks[i].end() > s })
}

func (im *image) Size() int64 { return im.size }

// kind classifies a chunk for status runs.
func kindOf(c *chunk) (driver.State, bool) {
	switch c.typ {
	case typeZero:
		return driver.Zero, false
	case typeIgnore:
		return driver.Unallocated, false
	case typeRaw:
		return driver.Data, false
	}
	return driver.Data, true
}

// maxMerge bounds how many chunks one Status call merges.
const maxMerge = 4096

func (im *image) Status(off, n int64) (driver.Extent, error) {
	if im.w != nil {
		return driver.Extent{}, im.writing()
	}
	if err := driver.CheckRange(im.name, off, n, im.size); err != nil {
		return driver.Extent{}, err
	}
	end := off + n
	i := im.find(off)
	if i == len(im.chunks) || im.chunks[i].sector*sectorSize > off {
		// A gap no chunk covers: a hole.
		stop := end
		if i < len(im.chunks) {
			stop = min(stop, im.chunks[i].sector*sectorSize)
		}
		return driver.Extent{State: driver.Unallocated, Length: stop - off, Offset: -1}, nil
	}
	c := &im.chunks[i]
	st, comp := kindOf(c)
	e := driver.Extent{State: st, Offset: -1, Compressed: comp}
	if c.typ == typeRaw {
		e.Offset = c.off + off - c.sector*sectorSize
	}
	stop := c.end() * sectorSize
	for j := i + 1; j < len(im.chunks) && j-i < maxMerge && stop < end; j++ {
		d := &im.chunks[j]
		if d.sector*sectorSize != stop {
			break
		}
		s2, c2 := kindOf(d)
		if s2 != st || c2 != comp || (d.typ == typeRaw) != (c.typ == typeRaw) {
			break
		}
		if d.typ == typeRaw && d.off != e.Offset+(stop-off) {
			break
		}
		stop = d.end() * sectorSize
	}
	e.Length = min(stop, end) - off
	return e, nil
}

func (im *image) ReadAt(p []byte, off int64) (int, error) {
	if im.w != nil {
		return 0, im.writing()
	}
	if err := driver.CheckRange(im.name, off, int64(len(p)), im.size); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		rest := p[done:]
		i := im.find(pos)
		if i == len(im.chunks) || im.chunks[i].sector*sectorSize > pos {
			k := int64(len(rest))
			if i < len(im.chunks) {
				k = min(k, im.chunks[i].sector*sectorSize-pos)
			}
			clear(rest[:k])
			done += int(k)
			continue
		}
		c := &im.chunks[i]
		in := pos - c.sector*sectorSize
		k := min(int64(len(rest)), c.count*sectorSize-in)
		switch {
		case c.hole():
			clear(rest[:k])
		case c.typ == typeRaw:
			if err := driver.ReadFullAt(im.f, rest[:k], c.off+in); err != nil {
				return done, driver.WithFile(err, "read", im.name)
			}
		default:
			data, err := im.cache.get(i, func() ([]byte, error) { return im.decompress(c) })
			if err != nil {
				return done, err
			}
			copy(rest[:k], data[in:in+k])
		}
		done += int(k)
	}
	return done, nil
}

func (im *image) writing() error {
	return driver.Unsupportedf(im.name, "a DMG being written cannot be read before it is closed")
}

func (im *image) WriteAt(p []byte, off int64) (int, error) {
	if im.w == nil {
		return 0, driver.Errorf(driver.ErrReadOnly, im.name, off, "DMG images are read-only once written")
	}
	if err := driver.CheckRange(im.name, off, int64(len(p)), im.size); err != nil {
		return 0, err
	}
	if err := im.w.writeAt(p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteZeroes is a no-op ahead of a stream being written (unwritten
// ranges become zero-fill chunks).
func (im *image) WriteZeroes(off, n int64, unmap bool) error {
	if im.w == nil {
		return driver.Errorf(driver.ErrReadOnly, im.name, off, "DMG images are read-only once written")
	}
	if err := driver.CheckRange(im.name, off, n, im.size); err != nil {
		return err
	}
	return im.w.writeZeroes(off, n)
}

func (im *image) Flush() error {
	if im.w == nil {
		return nil
	}
	if err := im.w.wait(); err != nil {
		return err
	}
	return driver.WithFile(im.f.Sync(), "flush", im.name)
}

func (im *image) Close() error {
	im.closeMu.Lock()
	defer im.closeMu.Unlock()
	if im.closed {
		return nil
	}
	im.closed = true
	var err error
	if im.w != nil {
		err = im.w.finish()
	}
	if cerr := im.f.Close(); err == nil {
		err = driver.WithFile(cerr, "close", im.name)
	}
	return err
}

func (im *image) Parent() *driver.ParentRef { return nil }

func (im *image) Info() driver.Info {
	in := driver.Info{Format: "dmg", VirtualSize: im.size}
	if im.w != nil {
		in.ClusterSize = im.w.unit
		in.Specific = &Specific{Subformat: im.w.sub}
		return in
	}
	in.Specific = &Specific{Subformat: im.subformat(), Partitions: im.parts}
	return in
}

// subformat names the image kind by the chunk types it holds, as hdiutil
// names them (ADC: UDCO; LZFSE: ULFO; raw and zero chunks: UDRO, or UDRW
// when every sector is stored at its own offset).
func (im *image) subformat() string {
	seen := map[uint32]bool{}
	for i := range im.chunks {
		seen[im.chunks[i].typ] = true
	}
	switch {
	case seen[typeLZFSE]:
		return "ULFO"
	case seen[typeBzip2]:
		return "UDBZ"
	case seen[typeZlib]:
		return "UDZO"
	case seen[typeADC]:
		return "UDCO"
	}
	for i := range im.chunks {
		if c := &im.chunks[i]; c.typ != typeRaw || c.off != c.sector*sectorSize {
			return "UDRO"
		}
	}
	// Raw chunks each at its own offset: the linear read/write kind.
	return "UDRW"
}
