package vhd

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/holecache"
	"github.com/vdisk/vdisk/internal/prealloc"
)

func init() { driver.Register(Format) }

// Format is the VHD format descriptor.
var Format = &driver.Format{
	Name:        "vpc",
	Aliases:     []string{"vhd"},
	Extensions:  []string{"vhd", "vpc"},
	Description: "Virtual PC / Hyper-V / Azure virtual hard disk (VHD)",
	Caps: driver.CapCreateFixed | driver.CapCreateDynamic | driver.CapDiff | driver.CapDiscard |
		driver.CapZero | driver.CapResize | driver.CapUUID | driver.CapCheck | driver.CapCompact |
		driver.CapWrite,
	CreateOptions: []driver.Option{
		{Name: "subformat", Type: driver.TypeEnum, Default: "dynamic", Values: []string{"dynamic", "fixed"},
			Doc: "dynamic (growing, the default) or fixed (preallocated; what Azure requires)"},
		{Name: "force_size", Type: driver.TypeBool, Default: "off",
			Doc: "use the given size exactly instead of rounding it up to a CHS geometry (writes the 65535/16/255 marker; needed for Azure)"},
		{Name: "block_size", Type: driver.TypeSize, Default: "2M", Min: minBlockSize, Max: maxBlockSize, PowerOf2: true,
			Doc: "block size of dynamic and differencing images (vdisk extension; qemu always uses 2M)"},
		{Name: "preallocation", Type: driver.TypeEnum, Default: "off", Values: []string{"off", "falloc", "full"},
			Doc: "preallocation of a fixed image's data: off (sparse file), falloc, full"},
	},
	OpenOptions: []driver.Option{
		{Name: "force_size_calc", Type: driver.TypeEnum, Values: []string{"chs", "current_size"},
			Doc: "size the disk by its CHS geometry or by the footer's current size instead of guessing from the creator application"},
	},
	Probe:  probe,
	Create: create,
	Open:   open,
}

// probe: "conectix" at offset 0 (dynamic and differencing images, as qemu
// probes) or a footer in the last 512 bytes (fixed images).
func probe(r io.ReaderAt, size int64) int {
	var b [footerSize]byte
	if size >= 8 {
		if n, _ := r.ReadAt(b[:8], 0); n == 8 && string(b[:8]) == footerCookie {
			return 100
		}
	}
	if size >= footerSize {
		if n, _ := r.ReadAt(b[:], size-footerSize); n == footerSize {
			f, cookie, sumOK := parseFooter(b[:])
			if cookie && sumOK && f.diskType >= diskFixed && f.diskType <= diskDiff {
				return 100
			}
			if cookie {
				return 60
			}
		}
	}
	return 0
}

// image is one open VHD.
type image struct {
	f        driver.File
	holes    holecache.Cache // a fixed image's data and hole runs, as lseek said
	st       driver.Storage  // where the parent is looked up (SetParent)
	name     string
	ro       bool
	log      *slog.Logger
	sizeCalc string // the force_size_calc open option

	mu sync.Mutex
	state
}

// state is what load reads from the file (guarded by mu).
type state struct {
	ft       footer
	ftRaw    []byte // ft marshaled
	kind     uint32
	size     int64
	sizeMode string // "chs" or "current-size"
	fileSize int64

	// Dynamic and differencing images.
	hdr      header
	hdrOff   int64
	batOff   int64
	bat      []uint32
	bs       int64 // block size
	spb      int64 // sectors per block
	bmBytes  int64 // meaningful bitmap bytes
	bmSize   int64 // bitmap bytes on disk (padded to a sector)
	meta     []region
	metaEnd  int64 // end of the metadata
	end      int64 // where the next block goes; the footer sits here
	bad      []uint64
	nbad     int
	bms      bmCache
	issues   []issue // found at open, for Check
	parentRf *driver.ParentRef
	// tailFreed: a block at the end of the file was freed since the last
	// flush.
	tailFreed bool
	// inflight counts blocks reserved whose BAT entry is not set yet.
	inflight int
}

type region struct {
	off, end int64
	what     string
}

// issue is a metadata problem found at open that Check reports (and
// repair fixes).
type issue struct {
	kind string // "footer", "footer-copy", "header", "leak"
	msg  string
}

func openFlag(ro bool) driver.OpenFlag {
	if ro {
		return driver.ReadOnly
	}
	return driver.ReadWrite
}

func open(ctx context.Context, p *driver.OpenParams) (driver.Image, error) {
	// O_DIRECT is not requested: the format's metadata (4-byte BAT entries,
	// bitmaps, footers) is not written in aligned units.
	f, err := p.Storage.Open(p.Name, openFlag(p.ReadOnly))
	if err != nil {
		return nil, err
	}
	im := &image{f: f, st: p.Storage, name: p.Name, ro: p.ReadOnly, log: p.Logger,
		sizeCalc: p.Options.String("force_size_calc")}
	if im.log == nil {
		im.log = slog.New(slog.DiscardHandler)
	}
	if err := im.load(im.sizeCalc); err != nil {
		f.Close()
		return nil, err
	}
	for _, is := range im.issues {
		im.log.Warn("VHD metadata problem (vdisk check -r all repairs it)", "problem", is.msg)
	}
	if im.nbad > 0 {
		im.log.Warn("VHD block table has corrupt entries; reading those blocks fails (vdisk check -r all repairs them)", "entries", im.nbad)
	}
	return im, nil
}

func (im *image) corrupt(off int64, format string, args ...any) error {
	return driver.Corruptf(im.name, off, format, args...)
}

// load reads and validates the footer, header and BAT.
func (im *image) load(sizeCalc string) error {
	fsize, err := im.f.Size()
	if err != nil {
		return err
	}
	im.fileSize = fsize
	im.issues = nil
	if fsize < footerSize {
		return im.corrupt(0, "file of %d bytes is too small for a VHD footer", fsize)
	}
	first := make([]byte, footerSize)
	last := make([]byte, footerSize)
	if err := driver.ReadFullAt(im.f, first, 0); err != nil {
		return err
	}
	if err := driver.ReadFullAt(im.f, last, fsize-footerSize); err != nil {
		return err
	}
	f0, c0, s0 := parseFooter(first)
	fe, ce, se := parseFooter(last)

	var ft footer
	var ftSumOK bool
	switch {
	case c0 && !(ce && se && fe.diskType == diskFixed):
		// Dynamic or differencing: qemu trusts the copy at offset 0.
		ft, ftSumOK = f0, s0
		if !s0 && ce && se {
			ft, ftSumOK = fe, true
		}
	case ce:
		ft, ftSumOK = fe, se
	default:
		return im.corrupt(0, "no VHD footer (\"conectix\") at the start or the end of the file")
	}
	if !ftSumOK && ft.diskType == diskFixed {
		im.issues = append(im.issues, issue{"footer", "footer checksum mismatch"})
	}
	switch ft.diskType {
	case diskFixed, diskDynamic, diskDiff:
	default:
		return driver.Unsupportedf(im.name, "VHD disk type %d is not supported (only fixed 2, dynamic 3 and differencing 4)", ft.diskType)
	}
	im.ft, im.kind = ft, ft.diskType
	im.ftRaw = im.ft.marshal()

	// Virtual size, per qemu's rule (differencing images, which qemu cannot
	// open as such, use the current size as VirtualBox and Hyper-V do).
	useCur := sizeUsesCurrent(&ft) || ft.diskType == diskDiff
	switch sizeCalc {
	case "chs":
		useCur = chsProduct(ft.chs()) == maxGeometry
	case "current_size":
		useCur = true
	}
	if useCur {
		if ft.curSize > maxSectors*sectorSize {
			return driver.Unsupportedf(im.name, "disk size %d is larger than the VHD limit of 2040 GiB", ft.curSize)
		}
		im.size = int64(ft.curSize) / sectorSize * sectorSize
		im.sizeMode = "current-size"
	} else {
		im.size = chsProduct(ft.chs()) * sectorSize
		im.sizeMode = "chs"
	}
	if im.size > maxSectors*sectorSize {
		return driver.Unsupportedf(im.name, "disk size %d is larger than the VHD limit of 2040 GiB", im.size)
	}

	if im.kind == diskFixed {
		if !ce {
			return im.corrupt(fsize-footerSize, "fixed VHD has no footer at the end of the file")
		}
		if im.size > fsize-footerSize {
			return im.corrupt(fsize-footerSize, "fixed VHD of %d bytes holds only %d bytes of data; the image is truncated", im.size, fsize-footerSize)
		}
		return nil
	}

	// The two footer copies of a dynamic image.
	switch {
	case !c0:
		im.issues = append(im.issues, issue{"footer-copy", "the footer copy at offset 0 is missing"})
	case !s0:
		im.issues = append(im.issues, issue{"footer-copy", "the footer copy at offset 0 has a bad checksum"})
	}
	return im.loadDynamic(first, last, c0 && s0, ce, se, fsize)
}

func (im *image) loadDynamic(first, last []byte, copyOK, ce, se bool, fsize int64) error {
	ft := &im.ft
	if ft.dataOffset < footerSize || ft.dataOffset > uint64(fsize) || int64(ft.dataOffset) > fsize-headerSize {
		return im.corrupt(16, "dynamic disk header offset %d is outside the %d-byte file", ft.dataOffset, fsize)
	}
	im.hdrOff = int64(ft.dataOffset)
	hb := make([]byte, headerSize)
	if err := driver.ReadFullAt(im.f, hb, im.hdrOff); err != nil {
		return err
	}
	h, cookie, sumOK := parseHeader(hb)
	if !cookie {
		return im.corrupt(im.hdrOff, "no dynamic disk header (\"cxsparse\")")
	}
	if !sumOK {
		im.issues = append(im.issues, issue{"header", "dynamic disk header checksum mismatch"})
	}
	im.hdr = h
	bs := int64(h.blockSize)
	if bs < minBlockSize || bs&(bs-1) != 0 {
		return im.corrupt(im.hdrOff+32, "invalid block size %d (must be a power of two of at least 512)", bs)
	}
	if bs > maxBlockSize {
		return driver.Unsupportedf(im.name, "block size %d is larger than the supported %d", bs, maxBlockSize)
	}
	im.bs = bs
	im.spb = bs / sectorSize
	im.bmBytes = (im.spb + 7) / 8
	im.bmSize = roundUp(im.bmBytes, sectorSize)
	entries := int64(h.maxEntries)
	if entries > maxSectors*sectorSize/bs+1 {
		return im.corrupt(im.hdrOff+28, "max table entries %d is too large for block size %d", entries, bs)
	}
	if entries*bs < im.size {
		return im.corrupt(im.hdrOff+28, "block table of %d entries of %d bytes cannot cover the %d-byte disk", entries, bs, im.size)
	}
	im.batOff = int64(h.tableOffset)
	if h.tableOffset > uint64(fsize) || im.batOff < footerSize || entries*4 > fsize-im.batOff {
		return im.corrupt(im.hdrOff+16, "block table (%d entries at offset %d) is outside the %d-byte file", entries, h.tableOffset, fsize)
	}
	batEnd := roundUp(im.batOff+entries*4, sectorSize)
	im.meta = []region{{0, footerSize, "footer copy"}, {im.hdrOff, im.hdrOff + headerSize, "header"}, {im.batOff, batEnd, "block table"}}
	if overlaps(im.meta[1], region{im.batOff, im.batOff + entries*4, ""}) {
		return im.corrupt(im.hdrOff+16, "block table overlaps the dynamic disk header")
	}
	if im.kind == diskDiff {
		if err := im.loadParent(fsize); err != nil {
			return err
		}
	}
	raw := make([]byte, entries*4)
	if err := driver.ReadFullAt(im.f, raw, im.batOff); err != nil {
		return err
	}
	im.bat = make([]uint32, entries)
	for i := range im.bat {
		im.bat[i] = be.Uint32(raw[4*i:])
	}
	im.validateBAT(fsize)
	im.bms.init(im)

	// The footer at the end.
	footerAt := fsize - footerSize
	switch {
	case fsize < im.end+footerSize:
		im.issues = append(im.issues, issue{"footer", "the footer at the end of the file is missing (the file ends inside the data)"})
	case !ce:
		im.issues = append(im.issues, issue{"footer", "the footer at the end of the file is missing"})
	case !se:
		im.issues = append(im.issues, issue{"footer", "the footer at the end of the file has a bad checksum"})
	case copyOK && string(first) != string(last):
		im.issues = append(im.issues, issue{"footer", "the footers at the start and at the end of the file differ"})
	}
	if footerAt > im.end {
		im.issues = append(im.issues, issue{"leak", fmt.Sprintf("%d bytes between the last block and the footer are unused", footerAt-im.end)})
	}
	return nil
}

func overlaps(a, b region) bool { return a.off < b.end && b.off < a.end }

// loadParent decodes the parent name and locators of a differencing image.
func (im *image) loadParent(fsize int64) error {
	h := &im.hdr
	name, err := decodeUTF16(h.parentName[:], true)
	if err != nil {
		return im.corrupt(im.hdrOff+64, "parent name: %v", err)
	}
	var rel, abs, macx string
	for i, l := range h.locators {
		if l.code == platNone {
			continue
		}
		eoff := im.hdrOff + 576 + int64(24*i)
		switch l.code {
		case platW2ru, platW2ku, platMacX, platMac, platWi2r, platWi2k:
		default:
			continue // unknown platform: ignore, as the spec says
		}
		if l.length == 0 {
			continue
		}
		if l.length > maxLocatorLen {
			return im.corrupt(eoff, "parent locator %d is %d bytes long", i, l.length)
		}
		if uint64(l.length) > uint64(l.space) && uint64(l.length) > uint64(l.space)*sectorSize {
			return im.corrupt(eoff, "parent locator %d holds %d bytes in a space of %d", i, l.length, l.space)
		}
		if l.offset > uint64(fsize) || int64(l.offset)+int64(l.length) > fsize || l.offset < footerSize {
			return im.corrupt(eoff, "parent locator %d (%d bytes at %d) is outside the %d-byte file", i, l.length, l.offset, fsize)
		}
		// The locator's region: its reserved space (in bytes, as
		// VirtualBox and Hyper-V write it) when that is plausible.
		r := region{int64(l.offset), roundUp(int64(l.offset)+int64(l.length), sectorSize), "parent locator"}
		if l.space >= l.length && l.space <= maxLocatorLen && int64(l.offset)+int64(l.space) <= fsize {
			r.end = max(r.end, roundUp(int64(l.offset)+int64(l.space), sectorSize))
		}
		if overlaps(r, im.meta[1]) || overlaps(r, im.meta[2]) {
			return im.corrupt(eoff, "parent locator %d overlaps the header or the block table", i)
		}
		im.meta = append(im.meta, r)
		data := make([]byte, l.length)
		if err := driver.ReadFullAt(im.f, data, int64(l.offset)); err != nil {
			return err
		}
		switch l.code {
		case platW2ru, platW2ku:
			s, err := decodeUTF16(data, false)
			if err != nil {
				return im.corrupt(int64(l.offset), "parent locator %d: %v", i, err)
			}
			if l.code == platW2ru {
				rel = s
			} else {
				abs = s
			}
		case platMacX:
			s, err := decodeUTF8Name(data)
			if err != nil {
				return im.corrupt(int64(l.offset), "parent locator %d: %v", i, err)
			}
			macx = s
		}
	}
	ref := parentRefFrom(rel, abs, macx, name, h.parentUUID)
	if ref.Name == "" && ref.UUID == "" {
		return im.corrupt(im.hdrOff+40, "differencing image records neither a parent name nor a parent UUID")
	}
	im.parentRf = ref
	return nil
}

// parentRefFrom is the reference Parent() reports for the decoded W2ru,
// W2ku and MacX locators, the header's parent name and parent UUID: the
// relative path, else a POSIX absolute path, else a file URL's path, else
// the name.
func parentRefFrom(rel, abs, macx, name string, uuid [16]byte) *driver.ParentRef {
	ref := &driver.ParentRef{UUID: formatUUID(uuid)}
	if rel != "" {
		ref.Name = fromWindowsRel(rel)
	}
	if ref.Name == "" && strings.HasPrefix(abs, "/") {
		ref.Name = abs
	}
	if ref.Name == "" && strings.HasPrefix(macx, "file://") {
		if u, err := url.Parse(macx); err == nil && strings.HasPrefix(u.Path, "/") {
			ref.Name = u.Path
		}
	}
	if ref.Name == "" && name != "" {
		n := strings.ReplaceAll(name, "\\", "/")
		ref.Name = n[strings.LastIndex(n, "/")+1:]
	}
	return ref
}

// fromWindowsRel turns a W2ru path (".\base.vhd", "..\x\base.vhd") into a
// slash-separated relative name.
func fromWindowsRel(s string) string {
	s = strings.ReplaceAll(s, "\\", "/")
	for strings.HasPrefix(s, "./") {
		s = s[2:]
	}
	return s
}

// toWindowsRel is the inverse, in Hyper-V's style.
func toWindowsRel(s string) string {
	s = filepath.ToSlash(filepath.Clean(s))
	if !strings.HasPrefix(s, "../") && s != ".." {
		s = "./" + s
	}
	return strings.ReplaceAll(s, "/", "\\")
}

// validateBAT marks entries pointing outside the file, into metadata or
// into another block as bad, and computes where the data ends.
func (im *image) validateBAT(fsize int64) {
	im.bad = make([]uint64, (len(im.bat)+63)/64)
	im.nbad = 0
	rs := im.bmSize + im.bs
	im.metaEnd = 0
	for _, m := range im.meta {
		im.metaEnd = max(im.metaEnd, m.end)
	}
	im.metaEnd = roundUp(im.metaEnd, sectorSize)
	im.end = im.metaEnd
	type ent struct {
		pos int64
		idx int
	}
	var ents []ent
	for i, e := range im.bat {
		if e == batUnused {
			continue
		}
		pos := int64(e) * sectorSize
		if pos+rs > fsize {
			im.markBad(i)
			continue
		}
		inMeta := false
		for _, m := range im.meta {
			if overlaps(m, region{pos, pos + rs, ""}) {
				inMeta = true
				break
			}
		}
		if inMeta {
			im.markBad(i)
			continue
		}
		ents = append(ents, ent{pos, i})
	}
	sort.Slice(ents, func(a, b int) bool {
		if ents[a].pos != ents[b].pos {
			return ents[a].pos < ents[b].pos
		}
		return ents[a].idx < ents[b].idx
	})
	var reach int64 = -1
	for _, e := range ents {
		if e.pos < reach {
			im.markBad(e.idx) // overlaps an earlier block
		} else {
			reach = e.pos + rs
		}
		im.end = max(im.end, e.pos+rs)
	}
}

func (im *image) markBad(i int) {
	if im.bad[i/64]&(1<<(i%64)) == 0 {
		im.bad[i/64] |= 1 << (i % 64)
		im.nbad++
	}
}

func (im *image) isBad(i int64) bool { return im.bad[i/64]&(1<<(i%64)) != 0 }

func (im *image) clearBad(i int64) {
	if im.isBad(i) {
		im.bad[i/64] &^= 1 << (i % 64)
		im.nbad--
	}
}

// create makes a new image.
func create(ctx context.Context, p *driver.CreateParams) (driver.Image, error) {
	sub := p.Options.String("subformat")
	if sub == "" {
		sub = "dynamic"
	}
	force := p.Options.Bool("force_size")
	bs := p.Options.Int("block_size")
	if bs == 0 {
		bs = defaultBlockSize
	}
	mode := p.Options.String("preallocation")
	kind := uint32(diskDynamic)
	if sub == "fixed" {
		kind = diskFixed
	}
	if p.ParentRef != nil {
		if kind == diskFixed {
			return nil, driver.OptionErrorf("a differencing VHD cannot be fixed (subformat=fixed)")
		}
		kind = diskDiff
		if p.ParentInfo != nil && p.ParentInfo.Format == "raw" {
			return nil, driver.Unsupportedf(p.Name, "a VHD does not record its parent's format, and a raw parent cannot be found again by probing; convert the parent to VHD first")
		}
	}
	if kind != diskFixed && prealloc.Active(mode) {
		return nil, driver.OptionErrorf("preallocation=%s applies to fixed VHDs only (subformat=fixed)", mode)
	}
	var g driver.CHS
	var size int64
	var err error
	if kind == diskDiff {
		// A differencing image matches its parent's size exactly; its
		// geometry is derived from it as the specification describes.
		size = roundUp(p.Size, sectorSize)
		if size > maxSectors*sectorSize {
			return nil, driver.OptionErrorf("disk size %d is too large for VHD; the largest is 2040 GiB", size)
		}
		g = specGeometry(size / sectorSize)
		if chsProduct(g)*sectorSize != size {
			g = maxCHS
		}
	} else {
		g, size, err = createGeometry(p.Size, force)
		if err != nil {
			return nil, err
		}
	}
	log := p.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if kind == diskFixed && size%(1<<20) != 0 {
		hint := "use a whole number of MiB with -o force_size=on"
		if !force {
			hint = fmt.Sprintf("the CHS geometry rounded the size up from %d; use -o force_size=on with a whole number of MiB", p.Size)
		}
		log.Warn(fmt.Sprintf("the fixed VHD's virtual size %d is not a whole number of MiB, which Azure rejects (%s)", size, hint))
	}

	flag := driver.ReadWrite | driver.Create | driver.Truncate
	if !p.Overwrite {
		flag |= driver.Excl
	}
	f, err := p.Storage.Open(p.Name, flag)
	if err != nil {
		return nil, err
	}
	im := &image{f: f, st: p.Storage, name: p.Name, log: log}
	im.kind, im.size = kind, size
	im.ft = footer{
		features:   featReserved,
		version:    formatVersion,
		dataOffset: noOffset,
		timestamp:  toVHDTime(time.Now()),
		creatorVer: creatorVersion,
		origSize:   uint64(size),
		curSize:    uint64(size),
		diskType:   kind,
		uuid:       newUUID(),
	}
	copy(im.ft.creatorApp[:], creatorApp)
	copy(im.ft.creatorOS[:], creatorOS)
	im.ft.setCHS(g)
	im.sizeMode = "chs"
	if sizeUsesCurrent(&im.ft) || kind == diskDiff {
		im.sizeMode = "current-size"
	}
	if kind == diskFixed {
		err = im.createFixed(ctx, mode)
	} else {
		err = im.createDynamic(p, bs)
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return im, nil
}

func (im *image) createFixed(ctx context.Context, mode string) error {
	im.ftRaw = im.ft.marshal()
	if err := im.f.Truncate(im.size + footerSize); err != nil {
		return err
	}
	if err := preallocate(ctx, im.f, im.name, 0, im.size, mode); err != nil {
		return err
	}
	if _, err := im.f.WriteAt(im.ftRaw, im.size); err != nil {
		return err
	}
	im.fileSize = im.size + footerSize
	return nil
}

// preallocate does mode for [from, to) of a fixed image's data area.
func preallocate(ctx context.Context, f driver.File, name string, from, to int64, mode string) error {
	if to <= from {
		return nil
	}
	if err := prealloc.Check("", mode, prealloc.Falloc, prealloc.Full); err != nil {
		return err
	}
	return prealloc.File(ctx, f, name, mode, from, to-from)
}

func (im *image) createDynamic(p *driver.CreateParams, bs int64) error {
	entries := (im.size + bs - 1) / bs
	if entries > maxCreateEntries {
		return driver.OptionErrorf("a %d-byte disk needs %d blocks of %d bytes; use a larger block_size (at most %d blocks)", im.size, entries, bs, maxCreateEntries)
	}
	im.hdrOff = footerSize
	im.batOff = footerSize + headerSize
	im.ft.dataOffset = uint64(im.hdrOff)
	im.hdr = header{
		dataOffset:  noOffset,
		tableOffset: uint64(im.batOff),
		version:     formatVersion,
		maxEntries:  uint32(entries),
		blockSize:   uint32(bs),
	}
	im.bs = bs
	im.spb = bs / sectorSize
	im.bmBytes = (im.spb + 7) / 8
	im.bmSize = roundUp(im.bmBytes, sectorSize)
	batEnd := im.batOff + roundUp(entries*4, sectorSize)
	im.meta = []region{{0, footerSize, "footer copy"}, {im.hdrOff, im.hdrOff + headerSize, "header"}, {im.batOff, batEnd, "block table"}}
	pos := batEnd
	var locs [][]byte
	if im.kind == diskDiff {
		var err error
		pos, locs, err = im.setupParent(p, pos)
		if err != nil {
			return err
		}
	}
	im.metaEnd = pos
	im.end = pos
	im.bat = make([]uint32, entries)
	for i := range im.bat {
		im.bat[i] = batUnused
	}
	im.bad = make([]uint64, (entries+63)/64)
	im.bms.init(im)
	im.ftRaw = im.ft.marshal()

	// Layout: footer copy, header, BAT, parent locators, footer.
	head := make([]byte, im.batOff)
	copy(head, im.ftRaw)
	copy(head[im.hdrOff:], im.hdr.marshal())
	if _, err := im.f.WriteAt(head, 0); err != nil {
		return err
	}
	if err := writeUnused(im.f, im.batOff, batEnd-im.batOff); err != nil {
		return err
	}
	for i, l := range im.hdr.locators[:len(locs)] {
		buf := make([]byte, l.space)
		copy(buf, locs[i])
		if _, err := im.f.WriteAt(buf, int64(l.offset)); err != nil {
			return err
		}
	}
	if _, err := im.f.WriteAt(im.ftRaw, im.end); err != nil {
		return err
	}
	im.fileSize = im.end + footerSize
	return nil
}

// writeUnused writes n bytes of unused block table entries (all bits set)
// at off, in pieces of at most 1 MiB.
func writeUnused(f driver.File, off, n int64) error {
	ff := make([]byte, min(n, 1<<20))
	for i := range ff {
		ff[i] = 0xFF
	}
	for end := off + n; off < end; {
		c := min(int64(len(ff)), end-off)
		if _, err := f.WriteAt(ff[:c], off); err != nil {
			return err
		}
		off += c
	}
	return nil
}

// setupParent fills in the parent fields of a new differencing image's
// header and returns the locator data to write from pos on.
func (im *image) setupParent(p *driver.CreateParams, pos int64) (int64, [][]byte, error) {
	ref, pi := p.ParentRef, p.ParentInfo
	h := &im.hdr
	uuid := ref.UUID
	if pi != nil && pi.UUID != "" {
		uuid = pi.UUID
	}
	if uuid != "" {
		u, err := parseUUID(uuid)
		if err != nil {
			im.log.Warn("the parent's UUID is not a UUID; not recording it", "uuid", uuid)
		} else {
			h.parentUUID = u
		}
	}
	ppath := ref.Name
	if pi != nil && pi.Path != "" {
		ppath = pi.Path
	}
	h.parentTime = toVHDTime(time.Now())
	if fi, err := p.Storage.Stat(ppath); err == nil && !fi.ModTime.IsZero() {
		h.parentTime = toVHDTime(fi.ModTime)
	}
	base := filepath.Base(filepath.FromSlash(ref.Name))
	nb := encodeUTF16(base, true)
	if len(nb) > 2*(parentNameUnits-1) {
		return 0, nil, driver.OptionErrorf("parent file name %q is too long for a VHD (at most %d UTF-16 units)", base, parentNameUnits-1)
	}
	copy(h.parentName[:], nb)

	// W2ku: the parent's absolute path; W2ru: the path relative to the
	// child's directory, which is what Parent() reports.
	absPath := ppath
	if !filepath.IsAbs(absPath) {
		if a, err := filepath.Abs(absPath); err == nil {
			absPath = a
		}
	}
	relPath := ref.Name
	if filepath.IsAbs(relPath) {
		childAbs := p.Name
		if !filepath.IsAbs(childAbs) {
			if a, err := filepath.Abs(childAbs); err == nil {
				childAbs = a
			}
		}
		if r, err := filepath.Rel(filepath.Dir(childAbs), relPath); err == nil {
			relPath = r
		}
	}
	var locs [][]byte
	add := func(code uint32, data []byte) error {
		if len(data) > maxLocatorLen {
			return driver.OptionErrorf("parent path is too long for a VHD locator")
		}
		space := max(int64(locatorSpace), roundUp(int64(len(data)), sectorSize))
		h.locators[len(locs)] = locator{code: code, space: uint32(space), length: uint32(len(data)), offset: uint64(pos)}
		im.meta = append(im.meta, region{pos, pos + space, "parent locator"})
		locs = append(locs, data)
		pos += space
		return nil
	}
	if err := add(platW2ku, encodeUTF16(absPath, false)); err != nil {
		return 0, nil, err
	}
	if err := add(platW2ru, encodeUTF16(toWindowsRel(relPath), false)); err != nil {
		return 0, nil, err
	}
	im.parentRf = &driver.ParentRef{Name: filepath.ToSlash(filepath.Clean(relPath)), UUID: formatUUID(h.parentUUID)}
	return pos, locs, nil
}

func (im *image) Size() int64 {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.size
}

func (im *image) Parent() *driver.ParentRef {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.parentRf == nil {
		return nil
	}
	r := *im.parentRf
	return &r
}

func (im *image) Flush() error {
	if im.ro {
		return nil
	}
	im.mu.Lock()
	err := im.flushLocked()
	im.mu.Unlock()
	if err != nil {
		return err
	}
	return im.f.Sync()
}

// flushLocked writes back bitmaps and trims freed blocks off the end.
func (im *image) flushLocked() error {
	if err := im.flushBitmapsLocked(); err != nil {
		return err
	}
	return im.trimTailLocked()
}

func (im *image) Close() error {
	var first error
	if !im.ro {
		im.mu.Lock()
		first = im.flushLocked()
		im.mu.Unlock()
	}
	if err := im.f.Close(); err != nil && first == nil {
		first = err
	}
	return first
}

func (im *image) String() string { return fmt.Sprintf("vpc(%s)", im.name) }
