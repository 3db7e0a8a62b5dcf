package vmdk

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"sync"

	"github.com/klauspost/compress/zlib"

	"github.com/vdisk/vdisk/driver"
)

const (
	sectorSize = 512

	magicKDMV = 0x564d444b // "KDMV" read little-endian
	magicCOWD = 0x44574f43 // "COWD" read little-endian (VMFS sparse)

	flagNL         = 1 << 0
	flagRGD        = 1 << 1
	flagZeroGrain  = 1 << 2
	flagCompressed = 1 << 16
	flagMarkers    = 1 << 17

	compressDeflate = 1

	gdAtEnd = ^uint64(0)

	// gteZeroed marks a zeroed grain when flagZeroGrain is set.
	gteZeroed = 1

	markerEOS    = 0
	markerGT     = 1
	markerGD     = 2
	markerFooter = 3

	// Limits on untrusted header fields.
	maxSectors      = 1 << 41 // 1 PiB per extent / disk
	maxGrainSectors = 1 << 12 // 2 MiB grains (VMware and qemu make 64 KiB)
	maxCachedGTs    = 8192    // grain tables kept in memory (16 MiB at 512 entries)
	maxGTEs         = 4096    // COWD uses 4096, hosted sparse 512
	maxGDEntries    = 32 << 20
)

// header is the hosted sparse extent header (SparseExtentHeader).
type header struct {
	version    uint32
	flags      uint32
	capacity   uint64 // sectors
	grainSize  uint64 // sectors
	descOffset uint64 // sectors
	descSize   uint64 // sectors
	numGTEs    uint32
	rgdOffset  uint64 // sectors
	gdOffset   uint64 // sectors
	overhead   uint64 // sectors
	unclean    uint8
	compress   uint16
}

func (h *header) decode(b []byte) {
	le := binary.LittleEndian
	h.version = le.Uint32(b[4:])
	h.flags = le.Uint32(b[8:])
	h.capacity = le.Uint64(b[12:])
	h.grainSize = le.Uint64(b[20:])
	h.descOffset = le.Uint64(b[28:])
	h.descSize = le.Uint64(b[36:])
	h.numGTEs = le.Uint32(b[44:])
	h.rgdOffset = le.Uint64(b[48:])
	h.gdOffset = le.Uint64(b[56:])
	h.overhead = le.Uint64(b[64:])
	h.unclean = b[72]
	h.compress = le.Uint16(b[77:])
}

func (h *header) encode() []byte {
	b := make([]byte, sectorSize)
	le := binary.LittleEndian
	le.PutUint32(b[0:], magicKDMV)
	le.PutUint32(b[4:], h.version)
	le.PutUint32(b[8:], h.flags)
	le.PutUint64(b[12:], h.capacity)
	le.PutUint64(b[20:], h.grainSize)
	le.PutUint64(b[28:], h.descOffset)
	le.PutUint64(b[36:], h.descSize)
	le.PutUint32(b[44:], h.numGTEs)
	le.PutUint64(b[48:], h.rgdOffset)
	le.PutUint64(b[56:], h.gdOffset)
	le.PutUint64(b[64:], h.overhead)
	b[72] = h.unclean
	b[73], b[74], b[75], b[76] = '\n', ' ', '\r', '\n'
	le.PutUint16(b[77:], h.compress)
	return b
}

// sparse is one sparse extent file (hosted sparse KDMV, or VMFS sparse COWD
// read-only).
//
// Locking: mu guards gd, rgd, gts, end, the dirty sets and the writes of
// grain table and directory entries. Grain data is written outside it: the
// container never writes one grain from two requests at once.
//
// Crash ordering: grain data is written at once, the tables and directory
// entries that point at it only change in memory (dirtyGT, dirtyGD) and
// reach the file in Flush after a sync of the data (or in Close), so a
// crash never leaves an entry pointing at a grain that was not written.
type sparse struct {
	f        driver.File
	name     string
	h        header
	cowd     bool
	grain    int64 // bytes
	gtes     int64 // entries per grain table
	capacity int64 // bytes
	gdOff    int64 // bytes
	rgdOff   int64 // bytes, 0 when none

	compressed, markers, zeroGrain bool

	// The last inflated grain, for small reads of compressed grains.
	cmu       sync.Mutex
	cacheGTE  uint32
	cacheData []byte

	mu       sync.Mutex
	gd, rgd  []uint32
	gts      map[int64][]uint32 // loaded grain tables by directory index
	dirtyGT  map[int64]bool     // tables changed since they were last written
	dirtyGD  map[int64]bool     // directory entries not yet written
	end      int64              // allocation cursor (bytes, sector aligned)
	fileSize int64              // at open
}

// openSparse reads and validates the sparse extent header of f.
func openSparse(f driver.File, name string) (*sparse, error) {
	fsz, err := f.Size()
	if err != nil {
		return nil, driver.WithFile(err, "open", name)
	}
	if fsz < sectorSize {
		return nil, driver.Corruptf(name, 0, "sparse extent of %d bytes is shorter than its header", fsz)
	}
	b := make([]byte, sectorSize)
	if err := driver.ReadFullAt(f, b, 0); err != nil {
		return nil, driver.WithFile(err, "read header", name)
	}
	s := &sparse{f: f, name: name, gts: map[int64][]uint32{}, fileSize: fsz}
	switch binary.LittleEndian.Uint32(b) {
	case magicCOWD:
		return s, s.initCOWD(b, fsz)
	case magicKDMV:
	default:
		return nil, driver.Corruptf(name, 0, "not a VMDK sparse extent (bad magic %q)", b[:4])
	}
	s.h.decode(b)
	if s.h.gdOffset == gdAtEnd {
		if err := s.readFooter(fsz); err != nil {
			return nil, err
		}
	}
	h := &s.h
	if h.version < 1 || h.version > 3 {
		return nil, driver.Unsupportedf(name, "VMDK sparse extent version %d", h.version)
	}
	if h.capacity > maxSectors {
		return nil, driver.Corruptf(name, 12, "capacity of %d sectors is beyond the %d-sector limit", h.capacity, int64(maxSectors))
	}
	if h.grainSize == 0 || h.grainSize > maxGrainSectors || h.grainSize&(h.grainSize-1) != 0 {
		return nil, driver.Corruptf(name, 20, "invalid grain size of %d sectors (a power of two up to %d)", h.grainSize, maxGrainSectors)
	}
	if h.numGTEs == 0 || h.numGTEs > 512 {
		return nil, driver.Corruptf(name, 44, "invalid number of grain table entries %d (1..512)", h.numGTEs)
	}
	s.compressed = h.compress == compressDeflate
	if h.compress > compressDeflate {
		return nil, driver.Unsupportedf(name, "compression algorithm %d", h.compress)
	}
	s.markers = h.flags&flagMarkers != 0
	s.zeroGrain = h.flags&flagZeroGrain != 0
	s.grain = int64(h.grainSize) * sectorSize
	s.gtes = int64(h.numGTEs)
	s.capacity = int64(h.capacity) * sectorSize
	if h.overhead > uint64(fsz)/sectorSize+1 && !s.compressed {
		return nil, driver.Corruptf(name, 64, "file truncated: %d bytes, the header expects at least %d", fsz, h.overhead*sectorSize)
	}
	if h.gdOffset >= uint64(fsz)/sectorSize {
		return nil, driver.Corruptf(name, 56, "grain directory at sector %d is past the end of the %d-byte file", h.gdOffset, fsz)
	}
	s.gdOff = int64(h.gdOffset) * sectorSize
	if h.flags&flagRGD != 0 && h.rgdOffset != 0 {
		if h.rgdOffset >= uint64(fsz)/sectorSize {
			return nil, driver.Corruptf(name, 48, "redundant grain directory at sector %d is past the end of the %d-byte file", h.rgdOffset, fsz)
		}
		s.rgdOff = int64(h.rgdOffset) * sectorSize
	}
	if err := s.loadGD(fsz); err != nil {
		return nil, err
	}
	s.end = (fsz + sectorSize - 1) &^ (sectorSize - 1)
	return s, nil
}

// initCOWD sets up a VMFS sparse (COWD, VMDK3) extent: 4096-entry grain
// tables, no redundant directory.
func (s *sparse) initCOWD(b []byte, fsz int64) error {
	le := binary.LittleEndian
	s.cowd = true
	sectors := uint64(le.Uint32(b[12:]))
	gran := uint64(le.Uint32(b[16:]))
	gdOff := uint64(le.Uint32(b[20:]))
	gdSize := int64(le.Uint32(b[24:]))
	if gran == 0 || gran > maxGrainSectors {
		return driver.Corruptf(s.name, 16, "invalid grain size of %d sectors", gran)
	}
	s.grain = int64(gran) * sectorSize
	s.gtes = 4096
	s.capacity = int64(sectors) * sectorSize
	s.gdOff = int64(gdOff) * sectorSize
	need := (int64(sectors) + int64(gran)*s.gtes - 1) / (int64(gran) * s.gtes)
	if gdSize < need {
		return driver.Corruptf(s.name, 24, "grain directory of %d entries is too small for %d sectors", gdSize, sectors)
	}
	if err := s.loadGD(fsz); err != nil {
		return err
	}
	s.end = (fsz + sectorSize - 1) &^ (sectorSize - 1)
	return nil
}

// readFooter replaces the header by the footer of a stream-optimized file
// (the header records the grain directory "at the end").
func (s *sparse) readFooter(fsz int64) error {
	if fsz < 1536+sectorSize {
		return driver.Corruptf(s.name, 56, "grain directory at the end, but the file is too short for a footer")
	}
	b := make([]byte, 1536)
	off := fsz - 1536
	if err := driver.ReadFullAt(s.f, b, off); err != nil {
		return driver.WithFile(err, "read footer", s.name)
	}
	le := binary.LittleEndian
	if le.Uint32(b[12:]) != markerFooter || le.Uint32(b[8:]) != 0 {
		return driver.Corruptf(s.name, off, "invalid footer marker")
	}
	if le.Uint32(b[512:]) != magicKDMV {
		return driver.Corruptf(s.name, off+512, "invalid footer (bad magic)")
	}
	eos := b[1024:]
	if le.Uint64(eos) != 0 || le.Uint32(eos[8:]) != 0 || le.Uint32(eos[12:]) != markerEOS {
		return driver.Corruptf(s.name, off+1024, "invalid end-of-stream marker")
	}
	s.h.decode(b[512:1024])
	if s.h.gdOffset == gdAtEnd {
		return driver.Corruptf(s.name, off+512+56, "the footer does not locate the grain directory")
	}
	return nil
}

// loadGD reads the grain directory (and the redundant one).
func (s *sparse) loadGD(fsz int64) error {
	if s.capacity == 0 {
		return nil
	}
	n := (s.capacity + s.grain*s.gtes - 1) / (s.grain * s.gtes)
	if n > maxGDEntries {
		return driver.Corruptf(s.name, 0, "grain directory of %d entries is beyond the %d-entry limit", n, maxGDEntries)
	}
	if s.gdOff+n*4 > fsz {
		return driver.Corruptf(s.name, s.gdOff, "grain directory of %d entries runs past the end of the %d-byte file", n, fsz)
	}
	read := func(off int64) ([]uint32, error) {
		raw := make([]byte, n*4)
		if err := readMeta(s.f, raw, off, "grain directory", s.name); err != nil {
			return nil, err
		}
		d := make([]uint32, n)
		for i := range d {
			d[i] = binary.LittleEndian.Uint32(raw[i*4:])
		}
		return d, nil
	}
	var err error
	if s.gd, err = read(s.gdOff); err != nil {
		return err
	}
	if s.rgdOff != 0 {
		if s.rgdOff+n*4 > fsz {
			return driver.Corruptf(s.name, s.rgdOff, "redundant grain directory runs past the end of the file")
		}
		if s.rgd, err = read(s.rgdOff); err != nil {
			return err
		}
	}
	return nil
}

func (s *sparse) gtBytes() int64 { return s.gtes * 4 }

// gt returns grain table i, loading it. Called with mu held. nil means the
// table is not allocated.
func (s *sparse) gt(i int64) ([]uint32, error) {
	if t, ok := s.gts[i]; ok {
		return t, nil
	}
	if i < 0 || i >= int64(len(s.gd)) || s.gd[i] == 0 {
		return nil, nil
	}
	off := int64(s.gd[i]) * sectorSize
	if off+s.gtBytes() > s.fileSizeNow() {
		return nil, driver.Corruptf(s.name, s.gdOff+i*4, "grain table %d at offset %d runs past the end of the file", i, off)
	}
	raw := make([]byte, s.gtBytes())
	if err := readMeta(s.f, raw, off, "grain table", s.name); err != nil {
		return nil, err
	}
	t := make([]uint32, s.gtes)
	for j := range t {
		t[j] = binary.LittleEndian.Uint32(raw[j*4:])
	}
	if len(s.gts) >= maxCachedGTs {
		// Drop tables that live in the file (a stream being written
		// keeps its tables only in memory: gd is 0 for them).
		for k := range s.gts {
			if len(s.gts) < maxCachedGTs/2 {
				break
			}
			if k < int64(len(s.gd)) && s.gd[k] != 0 && !s.dirtyGT[k] && !s.dirtyGD[k] {
				delete(s.gts, k)
			}
		}
	}
	s.gts[i] = t
	return t, nil
}

// sizeNow is fileSizeNow for callers not holding mu.
func (s *sparse) sizeNow() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.fileSizeNow()
}

// fileSizeNow is the file size including grains allocated since open.
// Called with mu held.
func (s *sparse) fileSizeNow() int64 {
	return max(s.fileSize, s.end)
}

// gte returns the grain table entry of grain g.
func (s *sparse) gte(g int64) (uint32, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, err := s.gt(g / s.gtes)
	if err != nil || t == nil {
		return 0, err
	}
	return t[g%s.gtes], nil
}

// grainState classifies an entry.
func (s *sparse) grainState(e uint32) driver.State {
	switch {
	case e == 0:
		return driver.Unallocated
	case e == gteZeroed && s.zeroGrain:
		return driver.Zero
	}
	return driver.Data
}

// run reports the run at rel (extent-relative) of at most n bytes: state,
// length, and for uncompressed data the byte offset in the file (else -1).
func (s *sparse) run(rel, n int64) (driver.State, int64, int64, error) {
	if rel >= s.capacity {
		return driver.Zero, n, -1, nil
	}
	n = min(n, s.capacity-rel)
	s.mu.Lock()
	defer s.mu.Unlock()
	st, foff := driver.Unallocated, int64(-1)
	pos, end := rel, rel+n
	for pos < end {
		g, in := pos/s.grain, pos%s.grain
		t, err := s.gt(g / s.gtes)
		if err != nil {
			return 0, 0, 0, err
		}
		cst, coff, span := driver.Unallocated, int64(-1), s.grain-in
		if t == nil {
			span = (s.gtes-g%s.gtes)*s.grain - in
		} else {
			e := t[g%s.gtes]
			cst = s.grainState(e)
			if cst == driver.Data && !s.compressed {
				coff = int64(e)*sectorSize + in
			}
		}
		if pos == rel {
			st, foff = cst, coff
		} else if cst != st || (st == driver.Data && (foff < 0 || coff != foff+(pos-rel))) {
			break
		}
		pos += span
		if st == driver.Data && s.compressed {
			break
		}
	}
	return st, min(pos, end) - rel, foff, nil
}

var zlibReaders sync.Pool

// readCompressed decompresses the grain at entry e into out (one grain),
// through a one-grain cache.
func (s *sparse) readCompressed(e uint32, out []byte) error {
	s.cmu.Lock()
	if s.cacheData != nil && s.cacheGTE == e {
		copy(out, s.cacheData)
		s.cmu.Unlock()
		return nil
	}
	s.cmu.Unlock()
	if err := s.inflate(e, out); err != nil {
		return err
	}
	s.cmu.Lock()
	s.cacheGTE = e
	s.cacheData = append(s.cacheData[:0], out...)
	s.cmu.Unlock()
	return nil
}

// inflate decompresses the grain at entry e into out.
func (s *sparse) inflate(e uint32, out []byte) error {
	off := int64(e) * sectorSize
	fsz := s.sizeNow()
	if off >= fsz {
		return driver.Corruptf(s.name, off, "compressed grain past the end of the file")
	}
	var size int64
	hdr := int64(0)
	if s.markers {
		var m [12]byte
		if err := driver.ReadFullAt(s.f, m[:], off); err != nil {
			return driver.Corruptf(s.name, off, "grain marker cut short by the end of the file")
		}
		size = int64(binary.LittleEndian.Uint32(m[8:]))
		hdr = 12
	} else {
		size = min(2*s.grain, fsz-off)
	}
	if size == 0 || size > 2*s.grain+1024 || off+hdr+size > fsz {
		return driver.Corruptf(s.name, off, "compressed grain of %d bytes is invalid or runs past the end of the file", size)
	}
	buf := make([]byte, size)
	if err := readMeta(s.f, buf, off+hdr, "compressed grain", s.name); err != nil {
		return err
	}
	var zr io.ReadCloser
	var err error
	if v := zlibReaders.Get(); v != nil {
		zr = v.(io.ReadCloser)
		err = zr.(zlib.Resetter).Reset(bytes.NewReader(buf), nil)
	} else {
		zr, err = zlib.NewReader(bytes.NewReader(buf))
	}
	if err != nil {
		return driver.Corruptf(s.name, off, "compressed grain: %v", err)
	}
	defer zlibReaders.Put(zr)
	n, err := io.ReadFull(zr, out)
	if err == io.ErrUnexpectedEOF || err == io.EOF {
		clear(out[n:]) // the last grain of a disk may be short
		err = nil
	}
	if err != nil {
		return driver.Corruptf(s.name, off, "compressed grain does not inflate: %v", err)
	}
	return nil
}

// readData reads p from uncompressed data at file offset off; bytes past
// the end of the file read as zeros (the last grain may be cut short).
func (s *sparse) readData(p []byte, off int64) error {
	n, err := s.f.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err != nil && !errors.Is(err, io.EOF) {
		return driver.WithFile(err, "read", s.name)
	}
	if n == 0 && off >= s.sizeNow() {
		return driver.Corruptf(s.name, off, "grain past the end of the file")
	}
	clear(p[n:])
	return nil
}

// setGTE records entry v for grain g in both grain tables: data must
// already be written. Called with mu held.
func (s *sparse) setGTE(g int64, v uint32) error {
	gi := g / s.gtes
	t, err := s.gt(gi)
	if err != nil {
		return err
	}
	if t == nil {
		if t, err = s.allocGT(gi); err != nil {
			return err
		}
	}
	t[g%s.gtes] = v
	s.markGT(gi)
	return nil
}

// unmap clears the grain table entries of grains [first, last): the
// grains become unallocated. Tables that are not allocated stay so.
func (s *sparse) unmap(first, last int64) error {
	for g := first; g < last; {
		gi := g / s.gtes
		end := min(last, (gi+1)*s.gtes)
		s.mu.Lock()
		t, err := s.gt(gi)
		if err == nil && t != nil {
			changed := false
			for j := g; j < end; j++ {
				if t[j%s.gtes] != 0 {
					t[j%s.gtes] = 0
					changed = true
				}
			}
			if changed {
				s.markGT(gi)
			}
		}
		s.mu.Unlock()
		if err != nil {
			return err
		}
		g = end
	}
	return nil
}

func (s *sparse) markGT(gi int64) {
	if s.dirtyGT == nil {
		s.dirtyGT = map[int64]bool{}
	}
	s.dirtyGT[gi] = true
}

// allocGT allocates grain table gi (and its redundant copy) at the end of
// the file. The zeroed tables are written at once; the directory entries
// that point at them are written with the tables (see writeMeta).
func (s *sparse) allocGT(gi int64) ([]uint32, error) {
	sz := (s.gtBytes() + sectorSize - 1) &^ (sectorSize - 1)
	zero := make([]byte, sz)
	n := int64(1)
	if s.rgd != nil {
		n = 2
	}
	base := s.end
	if base/sectorSize+n*sz/sectorSize > 0xffffffff {
		return nil, driver.Errorf(driver.ErrUnsupported, s.name, base, "sparse extent is full (4 G sectors)")
	}
	for i := int64(0); i < n; i++ {
		if _, err := s.f.WriteAt(zero, base+i*sz); err != nil {
			return nil, driver.WithFile(err, "write grain table", s.name)
		}
	}
	s.end += n * sz
	s.gd[gi] = uint32(base / sectorSize)
	if s.rgd != nil {
		s.rgd[gi] = uint32((base + sz) / sectorSize)
	}
	if s.dirtyGD == nil {
		s.dirtyGD = map[int64]bool{}
	}
	s.dirtyGD[gi] = true
	t := make([]uint32, s.gtes)
	s.gts[gi] = t
	return t, nil
}

// metaUpdate is a snapshot of the metadata to write: grain tables (both
// copies) and directory entries.
type metaUpdate struct {
	gts map[int64][]byte // encoded tables by directory index
	gd  map[int64]bool   // directory entries
}

// takeMeta snapshots and clears the dirty tables and directory entries.
// Callers hold mu; putBack undoes it after a failed write.
func (s *sparse) takeMeta() *metaUpdate {
	if len(s.dirtyGT) == 0 && len(s.dirtyGD) == 0 {
		return nil
	}
	u := &metaUpdate{gts: map[int64][]byte{}, gd: s.dirtyGD}
	for gi := range s.dirtyGT {
		t := s.gts[gi]
		b := make([]byte, s.gtBytes())
		for j, v := range t {
			binary.LittleEndian.PutUint32(b[j*4:], v)
		}
		u.gts[gi] = b
	}
	s.dirtyGT, s.dirtyGD = nil, nil
	return u
}

func (s *sparse) putBack(u *metaUpdate) {
	for gi := range u.gts {
		s.markGT(gi)
	}
	if len(u.gd) > 0 && s.dirtyGD == nil {
		s.dirtyGD = map[int64]bool{}
	}
	for gi := range u.gd {
		s.dirtyGD[gi] = true
	}
}

// writeMeta writes u: the tables first, then the directory entries that
// point at them.
func (s *sparse) writeMeta(u *metaUpdate) error {
	s.mu.Lock()
	gd, rgd := s.gd, s.rgd
	s.mu.Unlock()
	for gi, b := range u.gts {
		if _, err := s.f.WriteAt(b, int64(gd[gi])*sectorSize); err != nil {
			return driver.WithFile(err, "write grain table", s.name)
		}
		if rgd != nil && rgd[gi] != 0 {
			if _, err := s.f.WriteAt(b, int64(rgd[gi])*sectorSize); err != nil {
				return driver.WithFile(err, "write redundant grain table", s.name)
			}
		}
	}
	put := func(dirOff int64, gi int64, v uint32) error {
		var b [4]byte
		binary.LittleEndian.PutUint32(b[:], v)
		_, err := s.f.WriteAt(b[:], dirOff+gi*4)
		return driver.WithFile(err, "write grain directory", s.name)
	}
	for gi := range u.gd {
		if err := put(s.gdOff, gi, gd[gi]); err != nil {
			return err
		}
		if rgd != nil {
			if err := put(s.rgdOff, gi, rgd[gi]); err != nil {
				return err
			}
		}
	}
	return nil
}

// reserve returns the file offset of a new grain at the end of the file.
func (s *sparse) reserve() (int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	off := s.end
	if (off+s.grain)/sectorSize > 0xffffffff {
		return 0, driver.Errorf(driver.ErrUnsupported, s.name, off, "sparse extent is full (4 G sectors)")
	}
	s.end += s.grain
	return off, nil
}

// readMeta reads len(p) bytes of what at off; a read that the end of the
// file cuts short (the file is smaller than the metadata said) is a
// corrupt image, not an I/O error.
func readMeta(f driver.File, p []byte, off int64, what, name string) error {
	err := driver.ReadFullAt(f, p, off)
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return driver.Corruptf(name, off, "%s of %d bytes is cut short by the end of the file", what, len(p))
	}
	return driver.WithFile(err, "read "+what, name)
}
