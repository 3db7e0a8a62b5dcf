package vhdx

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"sync"

	"github.com/vdisk/vdisk/driver"
)

func init() { driver.Register(Format) }

// Format is the VHDX format descriptor.
var Format = &driver.Format{
	Name:        "vhdx",
	Extensions:  []string{"vhdx"},
	Description: "Hyper-V virtual hard disk v2 (VHDX)",
	Caps: driver.CapCreateFixed | driver.CapCreateDynamic | driver.CapDiff | driver.CapDiscard |
		driver.CapZero | driver.CapResize | driver.CapUUID | driver.CapCheck | driver.CapCompact | driver.CapWrite,
	CreateOptions: []driver.Option{
		{Name: "subformat", Type: driver.TypeEnum, Default: "dynamic", Values: []string{"dynamic", "fixed"},
			Doc: "dynamic (growing, the default) or fixed (every block allocated)"},
		{Name: "block_size", Type: driver.TypeSize, Default: "0",
			Doc: "payload block size, a power of two from 1M to 256M; 0 picks one by disk size as qemu does (8M up to 1G, 16M up to 100G, 32M up to 32T, else 64M)"},
		{Name: "log_size", Type: driver.TypeSize, Default: "1M", Min: minLogSize, Max: maxCreateLog,
			Doc: "log size, a multiple of 1M"},
		{Name: "block_state_zero", Type: driver.TypeBool, Default: "on",
			Doc: "new blocks start in the ZERO state (qemu's default); off leaves them NOT_PRESENT (dynamic) or FULLY_PRESENT (fixed)"},
		{Name: "logical_sector_size", Type: driver.TypeInt, Default: "512",
			Doc: "logical sector size, 512 or 4096 (vdisk extension)"},
		{Name: "physical_sector_size", Type: driver.TypeInt, Default: "4096",
			Doc: "physical sector size, 512 or 4096 (vdisk extension)"},
	},
	Probe:  probe,
	Create: create,
	Open:   open,
}

const (
	minLogSize   = 1 * mib
	maxCreateLog = 256 * mib
	// maxMetaRegion bounds the metadata region read into memory.
	maxMetaRegion = 16 * mib
)

// probe: the file type identifier's signature.
func probe(r io.ReaderAt, size int64) int {
	var b [8]byte
	if size < 8 {
		return 0
	}
	if n, _ := r.ReadAt(b[:], 0); n == 8 && string(b[:]) == ftiSignature {
		return 100
	}
	return 0
}

// Payload and sector bitmap block states.
const (
	stNotPresent = 0
	stUndefined  = 1
	stZero       = 2
	stUnmapped   = 3
	stFull       = 6
	stPartial    = 7
	stBitmapOK   = 6
)

type span struct{ off, end int64 }

// image is one open VHDX.
type image struct {
	f    driver.File
	r    io.ReaderAt // f, or the overlay of a log replayed in memory
	name string
	ro   bool
	log  *slog.Logger

	mu      sync.Mutex
	hdr     header
	hdrSlot int
	p       params
	metaEnt []metaEntry

	logOff, logLen   int64
	batOff, batLen   int64
	metaOff, metaLen int64

	bat        []uint64
	bad        map[int64]string // BAT index -> why the entry is unusable
	chunkRatio int64
	nBlocks    int64 // payload blocks
	spb        int64 // logical sectors per block
	fileEnd    int64 // where the next block goes (1 MiB aligned)

	bitmaps map[int64][]byte // chunk -> its sector bitmap block (loaded)

	dirtyBAT     map[int64]bool           // BAT page indices
	dirtyBM      map[int64]map[int64]bool // chunk -> bitmap page indices
	dirtyPg      map[int64][]byte         // other metadata pages (region tables, metadata items) by file offset
	punch        []span                   // freed blocks, punched once committed
	free         []freeSpan               // committed free space, by offset
	regions      []regionEntry            // the region table as read
	otherRegions []span                   // unknown regions: never allocated over
	session      bool                     // headers carry this session's GUIDs
	logSeq       uint64                   // last log sequence number used

	replayedInMemory bool
	replayed         bool
	issues           []string
}

func (im *image) corrupt(off int64, format string, args ...any) error {
	return driver.Corruptf(im.name, off, format, args...)
}

func open(ctx context.Context, p *driver.OpenParams) (driver.Image, error) {
	flag := driver.ReadOnly
	if !p.ReadOnly {
		flag = driver.ReadWrite
	}
	f, err := p.Storage.Open(p.Name, flag)
	if err != nil {
		return nil, err
	}
	im := &image{f: f, r: f, name: p.Name, ro: p.ReadOnly, log: p.Logger}
	if im.log == nil {
		im.log = slog.New(slog.DiscardHandler)
	}
	if err := im.load(); err != nil {
		f.Close()
		return nil, err
	}
	if im.replayedInMemory {
		im.log.Warn("VHDX log replayed in memory (opened read-only); open it read-write to replay it into the file", "image", im.name)
	}
	for _, s := range im.issues {
		im.log.Warn("VHDX metadata problem (vdisk check -r all repairs it)", "image", im.name, "problem", s)
	}
	return im, nil
}

// load reads and validates everything the image needs.
func (im *image) load() error {
	fsize, err := im.f.Size()
	if err != nil {
		return err
	}
	if fsize < headerArea {
		return im.corrupt(0, "file of %d bytes is too small for a VHDX header section", fsize)
	}
	b := make([]byte, regionSize)
	if err := readFull(im.f, b[:8], 0); err != nil {
		return err
	}
	if string(b[:8]) != ftiSignature {
		return im.corrupt(0, "no VHDX file type identifier")
	}
	var hs [2]header
	for i, off := range []int64{header1Off, header2Off} {
		if err := readFull(im.f, b[:headerSize], off); err != nil {
			return err
		}
		hs[i] = parseHeader(b[:headerSize])
	}
	valid := func(h header) bool { return h.signatureOK && h.checksumOK && h.version == 1 }
	switch {
	case valid(hs[0]) && valid(hs[1]):
		im.hdrSlot = 0
		if hs[1].seq > hs[0].seq {
			im.hdrSlot = 1
		}
	case valid(hs[0]):
		im.hdrSlot = 0
		im.issues = append(im.issues, "header 2 is invalid")
	case valid(hs[1]):
		im.hdrSlot = 1
		im.issues = append(im.issues, "header 1 is invalid")
	default:
		return im.corrupt(header1Off, "neither VHDX header is valid (signature, CRC-32C, version 1)")
	}
	im.hdr = hs[im.hdrSlot]
	hoff := int64(header1Off)
	if im.hdrSlot == 1 {
		hoff = header2Off
	}
	h := &im.hdr
	if h.logVersion != 0 {
		return driver.Unsupportedf(im.name, "log version %d (only 0 is defined)", h.logVersion)
	}
	im.logOff, im.logLen = int64(h.logOffset), int64(h.logLength)
	if im.logLen%mib != 0 || im.logOff%mib != 0 || im.logOff < headerArea && im.logLen > 0 ||
		h.logOffset > uint64(fsize) || im.logOff+im.logLen > fsize {
		return im.corrupt(hoff+68, "log of %d bytes at %d lies outside the %d-byte file or is not 1 MiB aligned", im.logLen, h.logOffset, fsize)
	}
	if im.replayed, err = im.replay(fsize); err != nil {
		return err
	}
	if !im.ro {
		if fsize, err = im.f.Size(); err != nil {
			return err
		}
	} else if ov, ok := im.r.(*overlay); ok {
		fsize = ov.size
	}
	if err := im.loadRegions(fsize, b); err != nil {
		return err
	}
	return im.loadBAT(fsize)
}

// loadRegions reads the region table and the metadata region.
func (im *image) loadRegions(fsize int64, b []byte) error {
	var ents []regionEntry
	var why string
	for i, off := range []int64{region1Off, region2Off} {
		if err := readFull(im.r, b, off); err != nil {
			return err
		}
		ents, why = parseRegionTable(b)
		if why == "" {
			if i == 1 {
				im.issues = append(im.issues, "region table 1 is invalid; using region table 2")
			}
			break
		}
	}
	if why != "" {
		return im.corrupt(region1Off, "%s (both copies)", why)
	}
	spans := []span{{0, headerArea}}
	if im.logLen > 0 {
		spans = append(spans, span{im.logOff, im.logOff + im.logLen})
	}
	var haveBAT, haveMeta bool
	for i, r := range ents {
		eoff := region1Off + 16 + 32*int64(i)
		switch r.id {
		case guidBAT, guidMetadata:
		default:
			if r.required {
				return driver.Unsupportedf(im.name, "required region %s is unknown", r.id)
			}
			if r.length > 0 && r.off < uint64(fsize) {
				im.otherRegions = append(im.otherRegions, span{int64(r.off), int64(r.off) + int64(r.length)})
			}
			continue
		}
		if r.off%mib != 0 || r.length == 0 || int64(r.length)%mib != 0 || r.off > uint64(fsize) || int64(r.off)+int64(r.length) > fsize {
			return im.corrupt(eoff, "region %s (%d bytes at %d) is not 1 MiB aligned or lies outside the %d-byte file", r.id, r.length, r.off, fsize)
		}
		s := span{int64(r.off), int64(r.off) + int64(r.length)}
		for _, o := range spans {
			if s.off < o.end && o.off < s.end {
				return im.corrupt(eoff, "region %s (%d bytes at %d) overlaps the headers, the log or another region", r.id, r.length, r.off)
			}
		}
		spans = append(spans, s)
		if r.id == guidBAT {
			if haveBAT {
				return im.corrupt(eoff, "two BAT regions")
			}
			haveBAT = true
			im.batOff, im.batLen = s.off, s.end-s.off
		} else {
			if haveMeta {
				return im.corrupt(eoff, "two metadata regions")
			}
			haveMeta = true
			im.metaOff, im.metaLen = s.off, s.end-s.off
		}
	}
	im.regions = ents
	if !haveBAT || !haveMeta {
		return im.corrupt(region1Off, "the region table lacks the BAT or the metadata region")
	}
	if im.metaLen > maxMetaRegion {
		return driver.Unsupportedf(im.name, "metadata region of %d bytes (at most %d)", im.metaLen, int64(maxMetaRegion))
	}
	md := make([]byte, im.metaLen)
	if err := readFull(im.r, md, im.metaOff); err != nil {
		return err
	}
	p, ents2, err := im.parseMetadata(md, im.metaOff)
	if err != nil {
		return err
	}
	im.p, im.metaEnt = p, ents2
	return nil
}

// batEntries is the number of BAT entries for n payload blocks.
func batEntries(n, cr int64, hasParent bool) int64 {
	if n == 0 {
		return 0
	}
	if hasParent {
		return (n + cr - 1) / cr * (cr + 1)
	}
	return n + (n-1)/cr
}

// loadBAT reads and validates the BAT.
func (im *image) loadBAT(fsize int64) error {
	p := &im.p
	im.chunkRatio = (1 << 23) * p.logicalSector / p.blockSize
	im.nBlocks = (p.diskSize + p.blockSize - 1) / p.blockSize
	im.spb = p.blockSize / p.logicalSector
	total := batEntries(im.nBlocks, im.chunkRatio, p.hasParent)
	if total*8 > im.batLen {
		return im.corrupt(im.batOff, "the %d-byte BAT region cannot hold the %d entries a %d-byte disk of %d-byte blocks needs", im.batLen, total, p.diskSize, p.blockSize)
	}
	raw := make([]byte, total*8)
	if err := readFull(im.r, raw, im.batOff); err != nil {
		return err
	}
	im.bat = make([]uint64, total)
	for i := range im.bat {
		im.bat[i] = leU64(raw[8*i:])
	}
	im.validateBAT(fsize)
	im.fileEnd = roundUp(fsize, mib)
	im.bitmaps = map[int64][]byte{}
	im.clearDirtyLocked()
	if !im.ro {
		im.rebuildFreeLocked()
	}
	return nil
}

// validateBAT marks entries with an unknown state, or pointing outside
// the file, into the headers, log or regions, or into another block.
func (im *image) validateBAT(fsize int64) {
	im.bad = map[int64]string{}
	meta := []span{{0, headerArea}, {im.batOff, im.batOff + im.batLen}, {im.metaOff, im.metaOff + im.metaLen}}
	if im.logLen > 0 {
		meta = append(meta, span{im.logOff, im.logOff + im.logLen})
	}
	type blk struct {
		s   span
		idx int64
	}
	var blks []blk
	for i, e := range im.bat {
		idx := int64(i)
		st := e & 7
		off := int64(e >> 20 << 20)
		size := im.p.blockSize
		isBM := (idx+1)%(im.chunkRatio+1) == 0
		if isBM {
			size = mib
			if st != stNotPresent && st != stBitmapOK {
				im.bad[idx] = fmt.Sprintf("sector bitmap entry %d has invalid state %d", idx, st)
				continue
			}
			if st == stNotPresent {
				continue
			}
		} else {
			switch st {
			case stNotPresent, stUndefined, stUnmapped:
				continue
			case stZero:
				if off == 0 {
					continue
				}
			case stFull, stPartial:
			default:
				im.bad[idx] = fmt.Sprintf("BAT entry %d has invalid state %d", idx, st)
				continue
			}
		}
		s := span{off, off + size}
		// qemu cuts a fixed image's file at the disk's end, so only the
		// start of the last block needs to lie inside the file; reads
		// past the end of the file return zeros.
		if off < headerArea || off >= fsize {
			im.bad[idx] = fmt.Sprintf("BAT entry %d points at %d, outside the %d-byte file", idx, off, fsize)
			continue
		}
		inMeta := false
		for _, m := range meta {
			if s.off < m.end && m.off < s.end {
				inMeta = true
			}
		}
		if inMeta {
			im.bad[idx] = fmt.Sprintf("BAT entry %d points at %d, into the headers, log or metadata", idx, off)
			continue
		}
		blks = append(blks, blk{s, idx})
	}
	sortBlocks := func(a, b int) bool { return blks[a].s.off < blks[b].s.off }
	sortSlice(len(blks), sortBlocks, func(a, b int) { blks[a], blks[b] = blks[b], blks[a] })
	reach := int64(0)
	for _, b := range blks {
		if b.s.off < reach {
			im.bad[b.idx] = fmt.Sprintf("BAT entry %d points at %d, into another block", b.idx, b.s.off)
			continue
		}
		reach = b.s.end
	}
	if p := im.p; p.hasParent {
		// A partially present block needs its chunk's sector bitmap.
		for b := int64(0); b < im.nBlocks; b++ {
			i := im.payloadIndex(b)
			if im.bat[i]&7 == stPartial && im.bad[i] == "" {
				bi := im.bitmapIndex(b / im.chunkRatio)
				if im.bat[bi]&7 != stBitmapOK || im.bad[bi] != "" {
					im.bad[i] = fmt.Sprintf("block %d is partially present but its sector bitmap is missing", b)
				}
			}
		}
	}
}

func (im *image) payloadIndex(b int64) int64 { return b + b/im.chunkRatio }
func (im *image) bitmapIndex(c int64) int64  { return c*(im.chunkRatio+1) + im.chunkRatio }

// writeHeader writes h (with the next sequence number) over the older
// header, which becomes the current one.
func (im *image) writeHeader(h header) error {
	h.seq = im.hdr.seq + 1
	h.version = 1
	slot := 1 - im.hdrSlot
	off := int64(header1Off)
	if slot == 1 {
		off = header2Off
	}
	if _, err := im.f.WriteAt(h.marshal(), off); err != nil {
		return err
	}
	im.hdr, im.hdrSlot = h, slot
	return nil
}

// startSessionLocked gives the header new file and data write GUIDs and a
// log GUID before the first change of this session, as [MS-VHDX]
// requires, and makes that durable.
func (im *image) startSessionLocked() error {
	if im.session {
		return nil
	}
	if im.ro {
		return driver.Errorf(driver.ErrReadOnly, im.name, -1, "image opened read-only")
	}
	h := im.hdr
	h.fileWrite, h.dataWrite, h.logGUID = newGUID(), newGUID(), newGUID()
	if err := im.writeHeader(h); err != nil {
		return err
	}
	if err := im.f.Sync(); err != nil {
		return err
	}
	im.session = true
	im.logSeq = 0
	return nil
}

// endSessionLocked marks the log empty (zero log GUID) once everything is
// committed and synced.
func (im *image) endSessionLocked(sync bool) error {
	if !im.session {
		return nil
	}
	if !sync {
		// Unsafe close: the caller wants no durability; if the header
		// reaches the disk before the metadata, the blocks written since
		// the last flush are lost, nothing else.
	} else if err := im.f.Sync(); err != nil {
		return err
	}
	h := im.hdr
	h.logGUID = guid{}
	if err := im.writeHeader(h); err != nil {
		return err
	}
	im.session = false
	return nil
}

func (im *image) Size() int64 {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.p.diskSize
}

func (im *image) Flush() error {
	if im.ro {
		return nil
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := im.commitLocked(); err != nil {
		return err
	}
	return im.f.Sync()
}

func (im *image) Close() error {
	var first error
	if !im.ro {
		im.mu.Lock()
		// A Flush before Close (the safe path) left nothing to commit and
		// the sync below is cheap; without one, nothing is synced.
		wrote, err := im.commitMode(true)
		first = err
		if first == nil {
			first = im.endSessionLocked(!wrote)
		}
		im.mu.Unlock()
	}
	if err := im.f.Close(); err != nil && first == nil {
		first = err
	}
	return first
}

func (im *image) String() string { return fmt.Sprintf("vhdx(%s)", im.name) }

// Specific is the format-specific part of Info (qemu reports none for
// VHDX; these are the format's own facts).
type Specific struct {
	Subformat          string            `json:"subformat"`
	BlockSize          int64             `json:"block-size"`
	LogicalSectorSize  int64             `json:"logical-sector-size"`
	PhysicalSectorSize int64             `json:"physical-sector-size"`
	LogSize            int64             `json:"log-size"`
	LogOffset          int64             `json:"log-offset"`
	LogReplayed        bool              `json:"log-replayed,omitempty"`
	LeaveAllocated     bool              `json:"leave-blocks-allocated,omitempty"`
	HasParent          bool              `json:"has-parent"`
	ParentLinkage      string            `json:"parent-linkage,omitempty"`
	ParentLocator      map[string]string `json:"parent-locator,omitempty"`
	FileWriteGUID      string            `json:"file-write-guid"`
	DataWriteGUID      string            `json:"data-write-guid"`
	Page83             string            `json:"page83-data,omitempty"`
}

func (im *image) Info() driver.Info {
	im.mu.Lock()
	defer im.mu.Unlock()
	sub := "dynamic"
	switch {
	case im.p.hasParent:
		sub = "differencing"
	case im.p.leaveAllocated:
		sub = "fixed"
	}
	s := &Specific{
		Subformat: sub, BlockSize: im.p.blockSize, LogicalSectorSize: im.p.logicalSector,
		PhysicalSectorSize: im.p.physicalSector, LogSize: im.logLen, LogOffset: im.logOff,
		LogReplayed: im.replayed, LeaveAllocated: im.p.leaveAllocated, HasParent: im.p.hasParent,
		FileWriteGUID: im.hdr.fileWrite.String(), DataWriteGUID: im.hdr.dataWrite.String(),
	}
	if !im.p.page83.isZero() {
		s.Page83 = im.p.page83.String()
	}
	if l := im.p.locator; l != nil {
		s.ParentLinkage = l.get("parent_linkage")
		s.ParentLocator = map[string]string{}
		for k, v := range l.vals {
			s.ParentLocator[k] = v
		}
	}
	return driver.Info{Format: "vhdx", VirtualSize: im.p.diskSize, ClusterSize: im.p.blockSize,
		Dirty: im.replayedInMemory, Specific: s}
}
