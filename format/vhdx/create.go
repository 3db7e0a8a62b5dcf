package vhdx

import (
	"context"
	"log/slog"
	"path/filepath"
	"strings"

	"github.com/vdisk/vdisk/driver"
)

// creator is written into the file type identifier.
const creator = "vdisk"

// autoBlockSize is qemu's choice of block size by disk size.
func autoBlockSize(size int64) int64 {
	switch {
	case size > 32<<40:
		return 64 * mib
	case size > 100<<30:
		return 32 * mib
	case size > 1<<30:
		return 16 * mib
	}
	return 8 * mib
}

// create makes a new image: the header section, the log, the BAT and the
// metadata region, laid out as qemu does (log at 1 MiB, then the BAT, then
// a 1 MiB metadata region), then the payload blocks.
func create(ctx context.Context, p *driver.CreateParams) (driver.Image, error) {
	o := p.Options
	fixed := o.String("subformat") == "fixed"
	bs := o.Int("block_size")
	logSize := o.Int("log_size")
	if !o.Has("log_size") {
		logSize = mib
	}
	zeroState := !o.Has("block_state_zero") || o.Bool("block_state_zero")
	lss, pss := o.Int("logical_sector_size"), o.Int("physical_sector_size")
	if lss == 0 {
		lss = 512
	}
	if pss == 0 {
		pss = 4096
	}
	if lss != 512 && lss != 4096 {
		return nil, driver.OptionErrorf("logical_sector_size must be 512 or 4096, not %d", lss)
	}
	if pss != 512 && pss != 4096 {
		return nil, driver.OptionErrorf("physical_sector_size must be 512 or 4096, not %d", pss)
	}
	size := roundUp(p.Size, lss)
	if size <= 0 || size > maxDiskSize {
		return nil, driver.OptionErrorf("VHDX disk size must be from 1 sector to 64 TiB, not %d", p.Size)
	}
	if bs == 0 {
		bs = autoBlockSize(size)
	}
	if bs < minBlockSize || bs > maxBlockSize || bs&(bs-1) != 0 {
		return nil, driver.OptionErrorf("block_size %d is not a power of two from 1M to 256M", bs)
	}
	if logSize < minLogSize || logSize%mib != 0 || logSize > maxCreateLog {
		return nil, driver.OptionErrorf("log_size %d is not a multiple of 1M from 1M to 256M", logSize)
	}
	hasParent := p.ParentRef != nil
	if hasParent && fixed {
		return nil, driver.OptionErrorf("a differencing VHDX cannot be fixed (subformat=fixed)")
	}
	if hasParent && p.ParentInfo != nil && p.ParentInfo.Format == "raw" {
		return nil, driver.Unsupportedf(p.Name, "a VHDX records no parent format and a raw parent cannot be found again by probing; convert the parent first")
	}
	log := p.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}

	cr := (1 << 23) * lss / bs
	nBlocks := (size + bs - 1) / bs
	total := batEntries(nBlocks, cr, hasParent)
	logOff := int64(headerArea)
	batOff := logOff + logSize
	batLen := roundUp(max(total*8, 1), mib)
	metaOff := batOff + batLen
	metaLen := int64(mib)
	dataOff := metaOff + metaLen

	var fp uint32
	if fixed {
		fp |= fpLeaveAllocated
	}
	items := []metaItem{
		{guidFileParam, metaIsRequired, append(u32le(uint32(bs)), u32le(fp|boolBit(hasParent, fpHasParent))...)},
		{guidDiskSize, metaIsVirtualDisk | metaIsRequired, u64le(uint64(size))},
		{guidPage83, metaIsVirtualDisk | metaIsRequired, func() []byte { g := newGUID(); return g[:] }()},
		{guidLogical, metaIsVirtualDisk | metaIsRequired, u32le(uint32(lss))},
		{guidPhysical, metaIsVirtualDisk | metaIsRequired, u32le(uint32(pss))},
	}
	if hasParent {
		loc, err := parentLocator(p)
		if err != nil {
			return nil, err
		}
		items = append(items, metaItem{guidParentLoc, metaIsRequired, loc})
	}

	// No Truncate: cutting a file to zero length makes ext4 write the
	// whole file back when it is closed (auto_da_alloc), which costs a
	// convert into a new image as much as a sync. An existing file is cut
	// to the header section instead, which the write below covers whole;
	// everything past it reads zeros until written.
	flag := driver.ReadWrite | driver.Create
	if !p.Overwrite {
		flag |= driver.Excl
	}
	f, err := p.Storage.Open(p.Name, flag)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (driver.Image, error) {
		f.Close()
		return nil, err
	}
	if err := f.Truncate(headerArea); err != nil {
		return fail(err)
	}
	head := make([]byte, headerArea)
	copy(head, ftiSignature)
	copy(head[8:], encodeUTF16(creator))
	h := header{fileWrite: newGUID(), dataWrite: newGUID(), version: 1, logLength: uint32(logSize), logOffset: uint64(logOff)}
	h.seq = 1
	copy(head[header1Off:], h.marshal())
	h.seq = 2
	copy(head[header2Off:], h.marshal())
	rt := marshalRegionTable([]regionEntry{
		{guidBAT, uint64(batOff), uint32(batLen), true},
		{guidMetadata, uint64(metaOff), uint32(metaLen), true},
	})
	copy(head[region1Off:], rt)
	copy(head[region2Off:], rt)
	if _, err := f.WriteAt(head, 0); err != nil {
		return fail(err)
	}
	if _, err := f.WriteAt(marshalMetadata(items, metaLen), metaOff); err != nil {
		return fail(err)
	}
	end := dataOff
	if hasParent {
		zeroState = false // a diff shows its parent until written
	}
	if fixed || zeroState {
		bat := make([]byte, total*8)
		for b := int64(0); b < nBlocks; b++ {
			i := b + b/cr
			var e uint64
			switch {
			case fixed:
				e = uint64(dataOff+b*bs) | stFull
				if zeroState {
					e = uint64(dataOff+b*bs) | stZero
				}
			default:
				e = stZero
			}
			putU64(bat[8*i:], e)
		}
		if _, err := f.WriteAt(bat, batOff); err != nil {
			return fail(err)
		}
		if fixed {
			end = dataOff + nBlocks*bs
		}
	}
	if err := f.Truncate(end); err != nil {
		return fail(err)
	}
	im := &image{f: f, r: f, name: p.Name, log: log}
	if err := im.load(); err != nil {
		return fail(err)
	}
	return im, nil
}

func boolBit(b bool, v uint32) uint32 {
	if b {
		return v
	}
	return 0
}

// parentLocator builds the parent locator of a new differencing image:
// parent_linkage (the parent's data write GUID when it is a VHDX, else its
// UUID, else a new GUID), relative_path (Hyper-V's ".\name" form, what
// Parent() reports) and absolute_win32_path (the parent's absolute path
// as this system spells it).
func parentLocator(p *driver.CreateParams) ([]byte, error) {
	ref, pi := p.ParentRef, p.ParentInfo
	link := guid{}
	for _, s := range []string{infoField(pi, true), infoField(pi, false), ref.ModUUID, ref.UUID} {
		if g, err := parseGUID(s); err == nil && s != "" {
			link = g
			break
		}
	}
	if link.isZero() {
		link = newGUID()
	}
	ppath := ref.Name
	if pi != nil && pi.Path != "" {
		ppath = pi.Path
	}
	absPath := ppath
	if !filepath.IsAbs(absPath) {
		if a, err := filepath.Abs(absPath); err == nil {
			absPath = a
		}
	}
	rel := ref.Name
	if filepath.IsAbs(rel) {
		child := p.Name
		if !filepath.IsAbs(child) {
			if a, err := filepath.Abs(child); err == nil {
				child = a
			}
		}
		if r, err := filepath.Rel(filepath.Dir(child), rel); err == nil {
			rel = r
		}
	}
	keys := []string{"parent_linkage", "relative_path", "absolute_win32_path"}
	vals := map[string]string{
		"parent_linkage":      "{" + link.String() + "}",
		"relative_path":       toWindowsRel(rel),
		"absolute_win32_path": absPath,
	}
	b := marshalLocator(keys, vals)
	if len(b) > maxLocatorSize {
		return nil, driver.OptionErrorf("parent path is too long for a VHDX parent locator")
	}
	return b, nil
}

// infoField is the parent's modification UUID (mod) or UUID, if known.
func infoField(pi *driver.ParentInfo, mod bool) string {
	if pi == nil {
		return ""
	}
	if mod {
		return pi.ModUUID
	}
	return pi.UUID
}

// toWindowsRel turns a relative path into Hyper-V's ".\dir\name" form.
func toWindowsRel(s string) string {
	s = filepath.ToSlash(filepath.Clean(s))
	if !strings.HasPrefix(s, "../") && s != ".." {
		s = "./" + s
	}
	return strings.ReplaceAll(s, "/", "\\")
}

// fromWindowsRel turns ".\name" or "..\x\name" into a slash-separated
// relative name.
func fromWindowsRel(s string) string {
	s = strings.ReplaceAll(s, "\\", "/")
	for strings.HasPrefix(s, "./") {
		s = s[2:]
	}
	return s
}

func (im *image) Parent() *driver.ParentRef {
	im.mu.Lock()
	defer im.mu.Unlock()
	if !im.p.hasParent || im.p.locator == nil {
		return nil
	}
	l := im.p.locator
	ref := &driver.ParentRef{ModUUID: strings.Trim(l.get("parent_linkage"), "{}")}
	if r := l.get("relative_path"); r != "" {
		ref.Name = fromWindowsRel(r)
	}
	for _, k := range []string{"absolute_win32_path", "volume_path"} {
		if v := l.get(k); ref.Name == "" && strings.HasPrefix(v, "/") {
			ref.Name = v
		}
	}
	for _, k := range []string{"absolute_win32_path", "volume_path"} {
		if v := strings.ReplaceAll(l.get(k), "\\", "/"); ref.Name == "" && v != "" {
			ref.Name = v[strings.LastIndex(v, "/")+1:]
		}
	}
	return ref
}
