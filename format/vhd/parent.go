package vhd

import (
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/vdisk/vdisk/driver"
)

var (
	_ driver.Reparenter = (*image)(nil)
	_ driver.Emptier    = (*image)(nil)
)

// newParent is what SetParent records for a parent reference.
type newParent struct {
	uuid [16]byte
	time uint32
	name [512]byte // UTF-16BE
	locs []locData
	ref  *driver.ParentRef // what Parent() reports afterwards
}

type locData struct {
	code  uint32
	data  []byte
	space int64
}

// SetParent rewrites the parent reference (driver.Reparenter).
//
// With a reference, a differencing image gets new W2ku (absolute path) and
// W2ru (relative path) locators, the parent's UUID (none when the
// reference has no UUID), its modification time (kept when the parent
// cannot be looked at) and its file name; a dynamic image becomes a
// differencing one. The locator data goes into space no current metadata
// or block uses (the old locators' space is reused by the next change) or
// at the end of the file, is made durable, and only then does the header
// point at it; the old locators' space is punched afterwards.
//
// Without one, a differencing image becomes a dynamic image: the data
// areas under clear bitmap bits are zeroed first (the image does not show
// them, and qemu, which ignores bitmaps, reads them), then both footers
// say dynamic, then the header's parent fields and locators are cleared.
// The sectors the image does not hold then read zeros; copying the
// parent's data in first is the container's work.
func (im *image) SetParent(ref *driver.ParentRef) error {
	if im.ro {
		return im.readOnlyErr(-1)
	}
	var np *newParent
	if ref != nil {
		var err error
		if np, err = im.newParent(ref); err != nil {
			return err
		}
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	switch {
	case ref == nil && im.kind != diskDiff:
		return nil // standalone already
	case im.kind == diskFixed:
		return driver.Unsupportedf(im.name, "a fixed VHD cannot have a parent (convert it to a dynamic VHD first)")
	case im.inflight > 0:
		// The container excludes writes while it changes the chain.
		return driver.Errorf(driver.ErrBusy, im.name, -1, "cannot change the parent while blocks are being allocated")
	}
	if err := im.flushBitmapsLocked(); err != nil {
		return err
	}
	if ref == nil {
		return im.makeStandaloneLocked()
	}
	return im.reparentLocked(np)
}

// newParent works out the fields and locators for ref. Relative names are
// relative to the image's directory.
func (im *image) newParent(ref *driver.ParentRef) (*newParent, error) {
	if strings.Contains(ref.Name, "://") {
		return nil, driver.Unsupportedf(im.name, "a VHD parent locator records a file path, not a URL (%s)", ref.Name)
	}
	if strings.EqualFold(ref.Format, "raw") {
		return nil, driver.Unsupportedf(im.name, "a VHD does not record its parent's format, and a raw parent cannot be found again by probing; convert the parent to VHD first")
	}
	np := &newParent{}
	if ref.UUID != "" {
		u, err := parseUUID(ref.UUID)
		if err != nil {
			im.log.Warn("the parent's UUID is not a UUID; not recording it", "uuid", ref.UUID)
		} else {
			np.uuid = u
		}
	}
	var rel, abs, name string
	if ref.Name != "" {
		name = filepath.Base(filepath.FromSlash(ref.Name))
		nb := encodeUTF16(name, true)
		if len(nb) > 2*(parentNameUnits-1) {
			return nil, driver.OptionErrorf("parent file name %q is too long for a VHD (at most %d UTF-16 units)", name, parentNameUnits-1)
		}
		copy(np.name[:], nb)
		// The parent's name in the storage, and its absolute path.
		stName := filepath.Clean(ref.Name)
		if !filepath.IsAbs(stName) {
			stName = filepath.Join(filepath.Dir(im.name), stName)
		}
		abs = stName
		if !filepath.IsAbs(abs) {
			if a, err := filepath.Abs(abs); err == nil {
				abs = a
			}
		}
		if !filepath.IsAbs(ref.Name) {
			rel = toWindowsRel(ref.Name)
		} else if child, err := filepath.Abs(im.name); err == nil {
			if r, err := filepath.Rel(filepath.Dir(child), filepath.Clean(ref.Name)); err == nil {
				rel = toWindowsRel(r)
			}
		}
		add := func(code uint32, s string) error {
			data := encodeUTF16(s, false)
			if len(data) > maxLocatorLen {
				return driver.OptionErrorf("parent path is too long for a VHD locator (%d bytes, at most %d)", len(data), maxLocatorLen)
			}
			np.locs = append(np.locs, locData{code: code, data: data,
				space: max(int64(locatorSpace), roundUp(int64(len(data)), sectorSize))})
			return nil
		}
		if err := add(platW2ku, filepath.ToSlash(abs)); err != nil {
			return nil, err
		}
		if rel != "" {
			if err := add(platW2ru, rel); err != nil {
				return nil, err
			}
		}
		if im.st != nil {
			if fi, err := im.st.Stat(stName); err == nil && !fi.ModTime.IsZero() {
				np.time = toVHDTime(fi.ModTime)
			}
		}
	}
	np.ref = parentRefFrom(rel, filepath.ToSlash(abs), "", name, np.uuid)
	if np.ref.Name == "" && np.ref.UUID == "" {
		return nil, driver.OptionErrorf("the parent reference has neither a file name nor a UUID that a VHD can record")
	}
	return np, nil
}

// reparentLocked records np in a differencing or dynamic image.
func (im *image) reparentLocked(np *newParent) error {
	var total int64
	for _, l := range np.locs {
		total += l.space
	}
	h := im.hdr
	h.parentUUID, h.parentName = np.uuid, np.name
	switch {
	case np.time != 0:
		h.parentTime = np.time
	case h.parentTime == 0 || im.kind != diskDiff:
		h.parentTime = toVHDTime(time.Now()) // as create does
	}
	h.locators = [8]locator{}
	var regions []region
	if total > 0 {
		pos, err := im.placeMetaLocked(total)
		if err != nil {
			return err
		}
		buf := make([]byte, total)
		off := pos
		for i, l := range np.locs {
			copy(buf[off-pos:], l.data)
			h.locators[i] = locator{code: l.code, space: uint32(l.space), length: uint32(len(l.data)), offset: uint64(off)}
			regions = append(regions, region{off, off + l.space, "parent locator"})
			off += l.space
		}
		if _, err := im.f.WriteAt(buf, pos); err != nil {
			return err
		}
	}
	// The locator data is durable before the header points at it, and the
	// header before the footers make a dynamic image a differencing one
	// (a dynamic image's header parent fields are ignored).
	if err := im.f.Sync(); err != nil {
		return err
	}
	if _, err := im.f.WriteAt(h.marshal(), im.hdrOff); err != nil {
		return err
	}
	if err := im.f.Sync(); err != nil {
		return err
	}
	im.hdr = h
	old := im.replaceLocatorsLocked(regions)
	im.parentRf = np.ref
	if im.kind == diskDynamic {
		keep := im.ft
		im.ft.diskType = diskDiff
		// A differencing image is sized by its current size.
		im.ft.curSize = uint64(im.size)
		if err := im.writeFootersLocked(); err != nil {
			im.ft = keep
			im.ftRaw = im.ft.marshal()
			return err
		}
		im.kind, im.sizeMode = diskDiff, "current-size"
		if err := im.f.Sync(); err != nil {
			return err
		}
	}
	return im.punchLocked(old)
}

// makeStandaloneLocked turns a differencing image into a dynamic one.
func (im *image) makeStandaloneLocked() error {
	if err := im.zeroUnheldLocked(); err != nil {
		return err
	}
	if err := im.f.Sync(); err != nil {
		return err
	}
	// The footers first: a dynamic image ignores the header's parent
	// fields, while a differencing image without them does not open.
	keep := im.ft
	im.ft.diskType = diskDynamic
	mode := "current-size"
	if !sizeUsesCurrent(&im.ft) {
		if chsProduct(im.ft.chs())*sectorSize == im.size {
			mode = "chs"
		} else {
			// Keep the size: the marker geometry makes qemu (and vdisk)
			// read the current size.
			im.ft.setCHS(maxCHS)
		}
	}
	if err := im.writeFootersLocked(); err != nil {
		im.ft = keep
		im.ftRaw = im.ft.marshal()
		return err
	}
	if err := im.f.Sync(); err != nil {
		return err
	}
	im.kind, im.sizeMode, im.parentRf = diskDynamic, mode, nil
	h := im.hdr
	h.parentUUID, h.parentTime, h.parentName, h.locators = [16]byte{}, 0, [512]byte{}, [8]locator{}
	if _, err := im.f.WriteAt(h.marshal(), im.hdrOff); err != nil {
		return err
	}
	if err := im.f.Sync(); err != nil {
		return err
	}
	im.hdr = h
	old := im.replaceLocatorsLocked(nil)
	if err := im.punchLocked(old); err != nil {
		return err
	}
	// Locators at the end of the file: the footer moves down.
	im.tailFreed = true
	return im.trimTailLocked()
}

// zeroUnheldLocked zeroes the data of the sectors whose bitmap bit is clear
// in every allocated block: what a differencing image does not show, and
// what it would show as a dynamic image to readers that ignore bitmaps.
func (im *image) zeroUnheldLocked() error {
	for i, e := range im.bat {
		b := int64(i)
		if e == batUnused || im.isBad(b) {
			continue
		}
		full, bm, err := im.bitmapLocked(b)
		if err != nil {
			return err
		}
		if full {
			continue
		}
		bits := append([]byte(nil), bm.bits...)
		data := int64(e)*sectorSize + im.bmSize
		for s := int64(0); s < im.spb; {
			if im.bitIsSet(bits, s) {
				s++
				continue
			}
			n := int64(1)
			for s+n < im.spb && !im.bitIsSet(bits, s+n) {
				n++
			}
			if err := im.f.PunchHole(data+s*sectorSize, n*sectorSize); err != nil {
				return err
			}
			s += n
		}
	}
	return nil
}

// usedLocked is every region of the file that metadata or a block (good
// or bad) occupies, sorted by offset.
func (im *image) usedLocked() []region {
	used := append([]region(nil), im.meta...)
	rs := im.bmSize + im.bs
	for _, e := range im.bat {
		if e == batUnused {
			continue
		}
		if pos := int64(e) * sectorSize; pos < im.fileSize {
			used = append(used, region{pos, min(pos+rs, im.fileSize), "block"})
		}
	}
	sort.Slice(used, func(a, b int) bool { return used[a].off < used[b].off })
	return used
}

// placeMetaLocked finds n bytes (a multiple of the sector size) for new
// metadata: the first hole no metadata or block uses, below the end of the
// data, that is large enough, else the end of the file, behind which the
// footer moves (written first, as for a new block).
func (im *image) placeMetaLocked(n int64) (int64, error) {
	var reach int64
	for _, u := range im.usedLocked() {
		if start := roundUp(reach, sectorSize); u.off >= start+n && start+n <= im.end {
			return start, nil
		}
		reach = max(reach, u.end)
	}
	if start := roundUp(reach, sectorSize); start+n <= im.end {
		return start, nil // freed blocks before the end, not cut off yet
	}
	return im.appendLocked(n)
}

// replaceLocatorsLocked replaces the parent locator regions of the
// metadata by regions and returns the old ones.
func (im *image) replaceLocatorsLocked(regions []region) []region {
	var old []region
	meta := im.meta[:0:0]
	for _, m := range im.meta {
		if m.what == "parent locator" {
			old = append(old, m)
		} else {
			meta = append(meta, m)
		}
	}
	im.meta = append(meta, regions...)
	im.metaEnd = 0
	for _, m := range im.meta {
		im.metaEnd = max(im.metaEnd, m.end)
	}
	im.metaEnd = roundUp(im.metaEnd, sectorSize)
	im.end = max(im.end, im.metaEnd)
	return old
}

// punchLocked punches the old regions out of the file, except where
// metadata or a block (a bad entry may point there) uses them.
func (im *image) punchLocked(old []region) error {
	used := im.usedLocked()
	for _, r := range old {
		r.end = min(r.end, im.fileSize-footerSize)
		if r.end <= r.off {
			continue
		}
		busy := false
		for _, u := range used {
			busy = busy || overlaps(r, u)
		}
		if busy {
			continue
		}
		if err := im.f.PunchHole(r.off, r.end-r.off); err != nil {
			return err
		}
	}
	return nil
}

// MakeEmpty makes every block unallocated (driver.Emptier): the table is
// cleared in one go and made durable, then the space the blocks took is
// punched and the file cut behind the metadata. A differencing image then
// shows its parent everywhere, a dynamic one reads zeros.
func (im *image) MakeEmpty() error {
	// Bitmaps are written back first, so that a failure below loses
	// nothing.
	if err := im.beginTableOp("a fixed VHD has no block table to empty", "cannot empty the image while blocks are being allocated"); err != nil {
		return err
	}
	defer im.mu.Unlock()
	if err := writeUnused(im.f, im.batOff, int64(len(im.bat))*4); err != nil {
		return err
	}
	if err := im.f.Sync(); err != nil {
		return err
	}
	for i := range im.bat {
		im.bat[i] = batUnused
	}
	clear(im.bad)
	im.nbad = 0
	im.bms.init(im)
	im.tailFreed = false
	// Everything but the metadata is free now.
	meta := append([]region(nil), im.meta...)
	sort.Slice(meta, func(a, b int) bool { return meta[a].off < meta[b].off })
	var reach int64
	for _, m := range meta {
		if start := roundUp(reach, sectorSize); m.off > start {
			if err := im.f.PunchHole(start, m.off-start); err != nil {
				return err
			}
		}
		reach = max(reach, m.end)
	}
	end := im.metaEnd
	if im.fileSize > end+footerSize {
		return im.cutLocked(end)
	}
	im.end, im.fileSize = end, end+footerSize
	return nil
}
