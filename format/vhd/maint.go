package vhd

import (
	"context"
	"fmt"
	"sort"
	"time"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/prealloc"
)

// Specific is the format-specific part of Info. qemu's vpc driver shows
// none; the names follow qemu's lower-case-with-dashes style.
type Specific struct {
	Type            string     `json:"type"` // fixed, dynamic, differencing
	CreatorApp      string     `json:"creator-app"`
	CreatorVersion  string     `json:"creator-version"`
	CreatorOS       string     `json:"creator-os"`
	Created         string     `json:"created,omitempty"`
	UUID            string     `json:"uuid,omitempty"`
	ParentUUID      string     `json:"parent-uuid,omitempty"`
	ParentName      string     `json:"parent-name,omitempty"`
	ParentTimestamp string     `json:"parent-timestamp,omitempty"`
	BlockSize       int64      `json:"block-size,omitempty"`
	Geometry        driver.CHS `json:"geometry"`
	SizeSource      string     `json:"size-source"` // chs or current-size
	CurrentSize     int64      `json:"current-size"`
	OriginalSize    int64      `json:"original-size"`
	SavedState      bool       `json:"saved-state,omitempty"`
}

var typeNames = map[uint32]string{diskFixed: "fixed", diskDynamic: "dynamic", diskDiff: "differencing"}

func (im *image) Info() driver.Info {
	im.mu.Lock()
	defer im.mu.Unlock()
	ft := &im.ft
	s := &Specific{
		Type:           typeNames[im.kind],
		CreatorApp:     trimID(ft.creatorApp[:]),
		CreatorVersion: fmt.Sprintf("%d.%d", ft.creatorVer>>16, ft.creatorVer&0xFFFF),
		CreatorOS:      trimID(ft.creatorOS[:]),
		Created:        fromVHDTime(ft.timestamp).Format(time.RFC3339),
		UUID:           formatUUID(ft.uuid),
		Geometry:       ft.chs(),
		SizeSource:     im.sizeMode,
		CurrentSize:    int64(ft.curSize),
		OriginalSize:   int64(ft.origSize),
		SavedState:     ft.savedState != 0,
	}
	info := driver.Info{Format: "vpc", VirtualSize: im.size, Specific: s}
	if im.kind != diskFixed {
		s.BlockSize = im.bs
		info.ClusterSize = im.bs
	}
	if im.kind == diskDiff {
		s.ParentUUID = formatUUID(im.hdr.parentUUID)
		s.ParentTimestamp = fromVHDTime(im.hdr.parentTime).Format(time.RFC3339)
		if im.parentRf != nil {
			s.ParentName = im.parentRf.Name
		}
	}
	return info
}

// Identifier: the footer's unique ID and, in a differencing image, the
// parent's. VHD records no modification UUIDs.
func (im *image) UUID() string {
	im.mu.Lock()
	defer im.mu.Unlock()
	return formatUUID(im.ft.uuid)
}

func (im *image) ModificationUUID() string { return "" }

func (im *image) ParentUUID() string {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.kind != diskDiff {
		return ""
	}
	return formatUUID(im.hdr.parentUUID)
}

func (im *image) ParentModificationUUID() string { return "" }

// setUUID parses the UUID s and, on a writable image, records it with set
// under mu.
func (im *image) setUUID(s string, set func(u [16]byte) error) error {
	u, err := parseUUID(s)
	if err != nil {
		return driver.OptionErrorf("%v", err)
	}
	if im.ro {
		return im.readOnlyErr(-1)
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	return set(u)
}

func (im *image) SetUUID(s string) error {
	return im.setUUID(s, func(u [16]byte) error {
		im.ft.uuid = u
		return im.writeFootersLocked()
	})
}

func (im *image) SetModificationUUID(string) error {
	return driver.Unsupportedf(im.name, "VHD records no modification UUID")
}

func (im *image) SetParentUUID(s string) error {
	return im.setUUID(s, func(u [16]byte) error {
		if im.kind != diskDiff {
			return driver.Unsupportedf(im.name, "only a differencing VHD records a parent UUID")
		}
		im.hdr.parentUUID = u
		if _, err := im.f.WriteAt(im.hdr.marshal(), im.hdrOff); err != nil {
			return err
		}
		if im.parentRf != nil {
			im.parentRf.UUID = formatUUID(u)
		}
		return nil
	})
}

func (im *image) SetParentModificationUUID(string) error {
	return driver.Unsupportedf(im.name, "VHD records no modification UUID")
}

// Geometry: the footer's CHS geometry is the physical one; VHD records no
// logical geometry. Changing it would change the size qemu sees, so it is
// read-only.
func (im *image) PCHS() (driver.CHS, bool) {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.ft.chs(), true
}

func (im *image) LCHS() (driver.CHS, bool) { return driver.CHS{}, false }

func (im *image) SetPCHS(driver.CHS) error {
	return driver.Unsupportedf(im.name, "the VHD geometry follows the disk size (qemu sizes most VHDs by it)")
}

func (im *image) SetLCHS(driver.CHS) error {
	return driver.Unsupportedf(im.name, "VHD records no logical geometry")
}

// footerPosLocked is where the footer at the end of the file goes.
func (im *image) footerPosLocked() int64 {
	if im.kind == diskFixed {
		return im.fileSize - footerSize
	}
	return im.end
}

// writeFootersLocked writes the footer at the end and, for dynamic images,
// its copy at offset 0.
func (im *image) writeFootersLocked() error {
	im.ftRaw = im.ft.marshal()
	if _, err := im.f.WriteAt(im.ftRaw, im.footerPosLocked()); err != nil {
		return err
	}
	im.fileSize = max(im.fileSize, im.footerPosLocked()+footerSize)
	if im.kind != diskFixed {
		if _, err := im.f.WriteAt(im.ftRaw, 0); err != nil {
			return err
		}
	}
	return nil
}

// ---- Check ----

func (im *image) Check(ctx context.Context, mode driver.RepairMode) (*driver.CheckResult, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	if !im.ro {
		if err := im.flushLocked(); err != nil {
			return nil, err
		}
	}
	// Look at what is on disk now.
	if err := im.reloadLocked(); err != nil {
		return nil, err
	}
	res := im.scanLocked()
	if mode == driver.RepairNone || (res.Corruptions == 0 && res.Leaks == 0) {
		return res, nil
	}
	if im.ro {
		return res, im.readOnlyErr(-1)
	}
	fixedC, fixedL, err := im.repairLocked(mode)
	if err != nil {
		return res, err
	}
	if err := im.f.Sync(); err != nil {
		return res, err
	}
	if err := im.reloadLocked(); err != nil {
		return res, err
	}
	after := im.scanLocked()
	after.CorruptionsFixed, after.LeaksFixed = fixedC, fixedL
	after.Messages = append(res.Messages, after.Messages...)
	return after, nil
}

// reloadLocked re-reads the metadata from disk (bitmaps were written back).
func (im *image) reloadLocked() error {
	keep := im.state
	im.bms = bmCache{}
	im.holes.Invalidate(0, -1)
	if err := im.load(im.sizeCalc); err != nil {
		im.state = keep // keep the state the image was opened with
		return err
	}
	return nil
}

func (im *image) scanLocked() *driver.CheckResult {
	res := &driver.CheckResult{}
	msg := func(format string, args ...any) {
		if len(res.Messages) < 50 {
			res.Messages = append(res.Messages, fmt.Sprintf(format, args...))
		}
	}
	for _, is := range im.issues {
		if is.kind == "leak" {
			res.Leaks++
			msg("Leaked space: %s", is.msg)
		} else {
			res.Corruptions++
			msg("ERROR: %s", is.msg)
		}
	}
	if im.kind == diskFixed {
		res.ImageEndOffset = im.fileSize
		return res
	}
	rs := im.bmSize + im.bs
	res.TotalClusters = (im.size + im.bs - 1) / im.bs
	var prev int64 = -1
	for i, e := range im.bat {
		if e == batUnused {
			continue
		}
		if im.isBad(int64(i)) {
			res.Corruptions++
			msg("ERROR: block %d: %s", i, im.badReason(int64(i)))
			continue
		}
		res.AllocatedClusters++
		pos := int64(e) * sectorSize
		if prev >= 0 && (pos < prev+rs || pos >= prev+rs+dataAlign) { // (not the alignment's gap)
			res.FragmentedClusters++
		}
		prev = pos
	}
	res.ImageEndOffset = im.end + footerSize
	return res
}

func (im *image) badReason(b int64) string {
	pos := int64(im.bat[b]) * sectorSize
	rs := im.bmSize + im.bs
	if pos+rs > im.fileSize {
		return fmt.Sprintf("table entry points to offset %d, past the end of the %d-byte file", pos, im.fileSize)
	}
	for _, m := range im.meta {
		if overlaps(m, region{pos, pos + rs, ""}) {
			return fmt.Sprintf("table entry points to offset %d, inside the %s", pos, m.what)
		}
	}
	return fmt.Sprintf("table entry points to offset %d, overlapping another block", pos)
}

// repairLocked fixes what scanLocked found.
func (im *image) repairLocked(mode driver.RepairMode) (fixedC, fixedL int, err error) {
	if mode == driver.RepairAll && im.kind != diskFixed {
		// Bad table entries: ones outside the file or in metadata are
		// dropped (the block reads as unallocated); ones overlapping
		// another block get a copy of what they read now.
		rs := im.bmSize + im.bs
		// Copies are bounded: a hostile table of many duplicate entries
		// must not blow the file up. Past the budget (the file's size
		// again) duplicates are dropped instead.
		budget := im.fileSize
		for i := range im.bat {
			b := int64(i)
			if im.bat[b] == batUnused || !im.isBad(b) {
				continue
			}
			pos := int64(im.bat[b]) * sectorSize
			inMeta := pos+rs > im.fileSize
			for _, m := range im.meta {
				inMeta = inMeta || overlaps(m, region{pos, pos + rs, ""})
			}
			if inMeta || budget < rs {
				if err := im.setEntryLocked(b, batUnused); err != nil {
					return fixedC, fixedL, err
				}
			} else {
				np, from, err := im.reserveLocked()
				if err != nil {
					return fixedC, fixedL, err
				}
				if _, err := im.f.WriteAt(make([]byte, np-from), from); err != nil {
					return fixedC, fixedL, err
				}
				if err := im.copyRegionLocked(pos, np, rs); err != nil {
					return fixedC, fixedL, err
				}
				budget -= rs
				if err := im.setEntryLocked(b, uint32(np/sectorSize)); err != nil {
					return fixedC, fixedL, err
				}
			}
			im.clearBad(b)
			im.bms.state[b] = bmUnknown
			fixedC++
		}
	}
	for _, is := range im.issues {
		switch {
		case is.kind == "leak" && mode >= driver.RepairLeaks:
			if im.fileSize > im.end+footerSize {
				if err := im.f.Truncate(im.end + footerSize); err != nil {
					return fixedC, fixedL, err
				}
				im.fileSize = im.end + footerSize
			}
			fixedL++
		case is.kind == "header" && mode == driver.RepairAll:
			if _, err := im.f.WriteAt(im.hdr.marshal(), im.hdrOff); err != nil {
				return fixedC, fixedL, err
			}
			fixedC++
		case (is.kind == "footer" || is.kind == "footer-copy") && mode == driver.RepairAll:
			fixedC++
		}
	}
	if mode == driver.RepairAll || fixedL > 0 {
		if err := im.writeFootersLocked(); err != nil {
			return fixedC, fixedL, err
		}
	}
	return fixedC, fixedL, nil
}

// copyRegionLocked copies n bytes from src to dst (dst + n <= src or
// dst >= src + n), keeping zero runs sparse.
func (im *image) copyRegionLocked(src, dst, n int64) error {
	buf := make([]byte, min(n, 1<<20))
	for done := int64(0); done < n; {
		c := min(n-done, int64(len(buf)))
		if err := driver.ReadFullAt(im.f, buf[:c], src+done); err != nil {
			return err
		}
		var err error
		if driver.IsZero(buf[:c]) {
			err = im.f.PunchHole(dst+done, c)
		} else {
			_, err = im.f.WriteAt(buf[:c], dst+done)
		}
		if err != nil {
			return err
		}
		done += c
	}
	im.fileSize = max(im.fileSize, dst+n)
	return nil
}

// ---- Compact ----

// Compact packs the file: the blocks nearest its end move into the holes
// that freed blocks left (Discard, WriteZeroes with unmap, a shrink), the
// footer moves behind the last block and the file is truncated. Which
// blocks are all zeros or equal to the parent is the container's business:
// it discards them before calling Compact, which only reorganises the
// file and does not change what any block reads.
// beginTableOp starts an operation that rewrites the block table of a
// writable dynamic or differencing image (Compact, MakeEmpty): it refuses
// fixed images (fixedWhy) and allocations in flight (busyWhy), takes mu
// and writes the cached bitmaps back. On success the caller holds mu.
func (im *image) beginTableOp(fixedWhy, busyWhy string) error {
	if im.ro {
		return im.readOnlyErr(-1)
	}
	if im.kind == diskFixed {
		return driver.Unsupportedf(im.name, "%s", fixedWhy)
	}
	im.mu.Lock()
	if im.inflight > 0 {
		im.mu.Unlock()
		return driver.Errorf(driver.ErrBusy, im.name, -1, "%s", busyWhy)
	}
	if err := im.flushBitmapsLocked(); err != nil {
		im.mu.Unlock()
		return err
	}
	return nil
}

func (im *image) Compact(ctx context.Context, progress driver.Progress) error {
	// The container excludes writes during Compact; a block being
	// allocated now would be taken for a hole. Bitmaps are written back
	// first: moved blocks are copied from the file.
	if err := im.beginTableOp("a fixed VHD cannot be compacted (convert it to a dynamic one)", "cannot compact while blocks are being allocated"); err != nil {
		return err
	}
	defer im.mu.Unlock()
	if err := im.f.Sync(); err != nil {
		return err
	}
	var total int64
	for _, e := range im.bat {
		if e != batUnused {
			total++
		}
	}
	report := func(done int64) {
		if progress != nil {
			progress(min(done, total), total)
		}
	}
	report(0)
	if err := im.packLocked(ctx, report); err != nil {
		return err
	}
	im.tailFreed = false
	report(total)
	return im.f.Sync()
}

// packLocked moves the blocks nearest the end of the file into the lowest
// holes that fit them, then truncates the file behind the last used byte.
func (im *image) packLocked(ctx context.Context, progress func(int64)) error {
	rs := im.bmSize + im.bs
	used := append([]region(nil), im.meta...)
	type blk struct {
		pos int64
		idx int64
	}
	var blocks []blk
	for i, e := range im.bat {
		if e == batUnused {
			continue
		}
		pos := int64(e) * sectorSize
		if im.isBad(int64(i)) {
			if pos < im.fileSize {
				used = append(used, region{pos, min(pos+rs, im.fileSize), "bad block"})
			}
			continue
		}
		blocks = append(blocks, blk{pos, int64(i)})
		used = append(used, region{pos, pos + rs, "block"})
	}
	sort.Slice(used, func(a, b int) bool { return used[a].off < used[b].off })
	sort.Slice(blocks, func(a, b int) bool { return blocks[a].pos < blocks[b].pos })
	// Holes between used regions, lowest first.
	var holes []region
	var reach int64
	for _, u := range used {
		if u.off > reach {
			holes = append(holes, region{roundUp(reach, sectorSize), u.off, ""})
		}
		reach = max(reach, u.end)
	}
	for k := len(blocks) - 1; k >= 0; k-- {
		if err := ctx.Err(); err != nil {
			return err
		}
		progress(int64(len(blocks) - 1 - k)) // blocks looked at
		bl := blocks[k]
		h := -1
		for i, hole := range holes {
			if hole.off >= bl.pos {
				break
			}
			if a := im.alignBlock(hole.off); a < bl.pos && hole.end-a >= rs {
				h = i
				break
			}
		}
		if h < 0 {
			continue
		}
		dst := im.alignBlock(holes[h].off)
		if err := im.copyRegionLocked(bl.pos, dst, rs); err != nil {
			return err
		}
		if err := im.f.Sync(); err != nil {
			return err
		}
		if err := im.setEntryLocked(bl.idx, uint32(dst/sectorSize)); err != nil {
			return err
		}
		if err := im.f.Sync(); err != nil {
			return err
		}
		holes[h].off = dst + rs
		blocks[k].pos = dst
	}
	// The new end: the last used byte.
	end := int64(0)
	for _, m := range im.meta {
		end = max(end, m.end)
	}
	for _, bl := range blocks {
		end = max(end, bl.pos+rs)
	}
	for _, u := range used {
		if u.what == "bad block" {
			end = max(end, u.end)
		}
	}
	im.end = roundUp(end, sectorSize)
	return im.cutLocked(im.end)
}

// ---- Resize ----

// resizeGeometry is the geometry and exact virtual size for a new size,
// keeping the image's size rule: images sized by their geometry are rounded
// up to the next geometry as qemu's create does; images sized by their
// current size keep the size (in whole sectors).
func (im *image) resizeGeometry(size int64) (driver.CHS, int64, error) {
	if im.kind == diskDiff || sizeUsesCurrent(&im.ft) {
		size = roundUp(size, sectorSize)
		if size > maxSectors*sectorSize {
			return driver.CHS{}, 0, driver.OptionErrorf("disk size %d is too large for VHD; the largest is 2040 GiB", size)
		}
		if im.ft.chs() == maxCHS {
			return maxCHS, size, nil
		}
		g := specGeometry(size / sectorSize)
		if im.kind != diskDiff && string(im.ft.creatorApp[:]) != "win " && chsProduct(g)*sectorSize != size {
			g = maxCHS // keep qemu reading the current size
		}
		return g, size, nil
	}
	return createGeometry(size, false)
}

func (im *image) Resize(ctx context.Context, size int64, mode string) error {
	if im.ro {
		return im.readOnlyErr(-1)
	}
	if size < 0 {
		return driver.OptionErrorf("negative size %d", size)
	}
	im.mu.Lock()
	g, newSize, err := im.resizeGeometry(size)
	if err != nil {
		im.mu.Unlock()
		return err
	}
	oldSize := im.size
	if im.kind == diskFixed {
		err = im.resizeFixedLocked(ctx, g, newSize, mode)
		im.mu.Unlock()
		return err
	}
	if prealloc.Active(mode) {
		im.mu.Unlock()
		return driver.Unsupportedf(im.name, "preallocation=%s is not supported when resizing a dynamic VHD", mode)
	}
	err = im.resizeDynamicLocked(g, newSize)
	im.mu.Unlock()
	if err != nil || newSize <= oldSize {
		return err
	}
	// The new range must read zeros where this image holds something:
	// stale data left in the old last block (after an earlier shrink), or
	// blocks a foreign writer allocated past the size. Unallocated blocks
	// of a dynamic image read zeros; those of a differencing image show the
	// parent, which the container shadows where it reaches (the driver
	// does not know what the parent holds).
	for off := oldSize; off < newSize; {
		b, in := off/im.bs, off%im.bs
		c := min(newSize-off, im.bs-in)
		im.mu.Lock()
		free := im.bat[b] == batUnused
		im.mu.Unlock()
		if !free {
			if err := im.zeroBlock(b, in, c, true); err != nil {
				return err
			}
		}
		off += c
	}
	return nil
}

func (im *image) resizeFixedLocked(ctx context.Context, g driver.CHS, newSize int64, mode string) error {
	defer im.holes.Invalidate(0, -1)
	dataEnd := im.fileSize - footerSize // the old footer's place
	im.ft.curSize = uint64(newSize)
	im.ft.setCHS(g)
	im.ftRaw = im.ft.marshal()
	// The new footer first, so the file always ends with a valid one.
	if _, err := im.f.WriteAt(im.ftRaw, newSize); err != nil {
		return err
	}
	if newSize > dataEnd {
		if err := im.f.PunchHole(dataEnd, footerSize); err != nil {
			return err
		}
		if err := preallocate(ctx, im.f, im.name, dataEnd, newSize, mode); err != nil {
			return err
		}
	} else if err := im.f.Truncate(newSize + footerSize); err != nil {
		return err
	}
	// Data left between the old size and the old end of the data area
	// (the size may have been the geometry's, rounded down) must read
	// zeros now.
	if e := min(newSize, dataEnd); e > im.size {
		if err := im.f.PunchHole(im.size, e-im.size); err != nil {
			return err
		}
	}
	im.fileSize = newSize + footerSize
	im.size = newSize
	return nil
}

func (im *image) resizeDynamicLocked(g driver.CHS, newSize int64) error {
	if err := im.flushBitmapsLocked(); err != nil {
		return err
	}
	oldN := int64(len(im.bat))
	newN := (newSize + im.bs - 1) / im.bs
	if newN > max(maxCreateEntries, oldN) {
		return driver.OptionErrorf("a %d-byte disk needs %d blocks of %d bytes, more than the %d this image's block size allows", newSize, newN, im.bs, maxCreateEntries)
	}
	if newN > oldN {
		if err := im.growBATLocked(newN); err != nil {
			return err
		}
		im.hdr.maxEntries = uint32(newN)
		if _, err := im.f.WriteAt(im.hdr.marshal(), im.hdrOff); err != nil {
			return err
		}
	}
	im.ft.curSize = uint64(newSize)
	im.ft.setCHS(g)
	if err := im.writeFootersLocked(); err != nil {
		return err
	}
	if newN < oldN {
		for b := newN; b < oldN; b++ {
			if im.bat[b] == batUnused {
				continue
			}
			if im.isBad(b) {
				if err := im.setEntryLocked(b, batUnused); err != nil {
					return err
				}
				im.clearBad(b)
				continue
			}
			if err := im.freeBlockLocked(b); err != nil {
				return err
			}
		}
		im.hdr.maxEntries = uint32(newN)
		if _, err := im.f.WriteAt(im.hdr.marshal(), im.hdrOff); err != nil {
			return err
		}
		// The table's region shrinks with it (what load computes).
		im.metaEnd = 0
		for i := range im.meta {
			if im.meta[i].what == "block table" {
				im.meta[i].end = roundUp(im.batOff+newN*4, sectorSize)
			}
			im.metaEnd = max(im.metaEnd, im.meta[i].end)
		}
		im.metaEnd = roundUp(im.metaEnd, sectorSize)
		im.tailFreed = true
		if err := im.trimTailLocked(); err != nil {
			return err
		}
		im.bat = im.bat[:newN]
		im.bms.state = im.bms.state[:newN]
		im.bad = im.bad[:(newN+63)/64]
		if newN%64 != 0 {
			im.bad[len(im.bad)-1] &= 1<<(newN%64) - 1
		}
	}
	im.size = newSize
	return nil
}

// growBATLocked makes room for n entries: in place when the space after
// the table is free, otherwise by writing a new table at the end of the
// file (the header's table offset then points there).
func (im *image) growBATLocked(n int64) error {
	oldN := int64(len(im.bat))
	newEnd := roundUp(im.batOff+n*4, sectorSize)
	inPlace := true
	want := region{im.batOff, newEnd, ""}
	for _, m := range im.meta {
		if m.what != "block table" && overlaps(m, want) {
			inPlace = false
		}
	}
	rs := im.bmSize + im.bs
	for _, e := range im.bat {
		if e != batUnused && overlaps(region{int64(e) * sectorSize, int64(e)*sectorSize + rs, ""}, want) {
			inPlace = false
		}
	}
	bat := make([]uint32, n)
	copy(bat, im.bat)
	for i := oldN; i < n; i++ {
		bat[i] = batUnused
	}
	if inPlace {
		buf := make([]byte, newEnd-(im.batOff+oldN*4))
		for i := range buf {
			buf[i] = 0xFF
		}
		if _, err := im.f.WriteAt(buf, im.batOff+oldN*4); err != nil {
			return err
		}
		for i := range im.meta {
			if im.meta[i].what == "block table" {
				im.meta[i].end = newEnd
			}
		}
		if newEnd > im.end {
			im.end = newEnd
		}
		im.metaEnd = max(im.metaEnd, newEnd)
	} else {
		pos := im.end
		if im.fileSize > pos+footerSize {
			if err := im.f.Truncate(pos + footerSize); err != nil {
				return err
			}
			im.fileSize = pos + footerSize
		}
		size := roundUp(n*4, sectorSize)
		buf := make([]byte, size)
		for i, e := range bat {
			be.PutUint32(buf[4*i:], e)
		}
		for i := n * 4; i < size; i++ {
			buf[i] = 0xFF
		}
		if _, err := im.f.WriteAt(im.ftRaw, pos+size); err != nil {
			return err
		}
		if _, err := im.f.WriteAt(buf, pos); err != nil {
			return err
		}
		im.end = pos + size
		im.fileSize = max(im.fileSize, im.end+footerSize)
		im.hdr.tableOffset = uint64(pos)
		im.batOff = pos
		for i := range im.meta {
			if im.meta[i].what == "block table" {
				im.meta[i] = region{pos, pos + size, "block table"}
			}
		}
		im.metaEnd = max(im.metaEnd, im.end)
	}
	im.bat = bat
	st := make([]uint8, n)
	copy(st, im.bms.state)
	im.bms.state = st
	bad := make([]uint64, (n+63)/64)
	copy(bad, im.bad)
	im.bad = bad
	return nil
}
