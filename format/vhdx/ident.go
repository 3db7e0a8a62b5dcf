package vhdx

import (
	"encoding/binary"
	"path/filepath"
	"strings"

	"github.com/vdisk/vdisk/driver"
)

// The Identifier setters and SetParent change the page 83 item, the data
// write GUID (a header field: written by the alternating header update,
// which is already atomic) and the parent locator. Metadata region pages
// go through the log in one commit.

func (im *image) parseID(u string) (guid, error) {
	g, err := parseGUID(strings.Trim(u, "{}"))
	if err != nil || g.isZero() {
		return guid{}, driver.OptionErrorf("%q is not a GUID", u)
	}
	return g, nil
}

func (im *image) SetUUID(u string) error {
	g, err := im.parseID(u)
	if err != nil {
		return err
	}
	return im.changeMetadata(func(items []metaItem) ([]metaItem, error) {
		items = delItem(items, guidPage83)
		return append(items, metaItem{guidPage83, metaIsVirtualDisk | metaIsRequired, g[:]}), nil
	})
}

func (im *image) SetModificationUUID(u string) error {
	g, err := im.parseID(u)
	if err != nil {
		return err
	}
	if im.ro {
		return im.readOnlyErr(-1)
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := im.startSessionLocked(); err != nil {
		return err
	}
	h := im.hdr
	h.dataWrite = g
	if err := im.writeHeader(h); err != nil {
		return err
	}
	return im.f.Sync()
}

func (im *image) SetParentUUID(string) error {
	return driver.Unsupportedf(im.name, "a VHDX records no parent UUID (only the parent's data write GUID, its modification UUID)")
}

func (im *image) SetParentModificationUUID(u string) error {
	g, err := im.parseID(u)
	if err != nil {
		return err
	}
	return im.changeMetadata(func(items []metaItem) ([]metaItem, error) {
		if !im.p.hasParent || im.p.locator == nil {
			return nil, driver.Unsupportedf(im.name, "not a differencing VHDX: it records no parent")
		}
		l := im.p.locator
		vals := map[string]string{}
		for k, v := range l.vals {
			vals[k] = v
		}
		vals["parent_linkage"] = "{" + g.String() + "}"
		keys := l.keys
		if _, ok := l.vals["parent_linkage"]; !ok {
			keys = append([]string{"parent_linkage"}, keys...)
		}
		return setLocator(items, keys, vals)
	})
}

func delItem(items []metaItem, id guid) []metaItem {
	out := items[:0]
	for _, it := range items {
		if it.id != id {
			out = append(out, it)
		}
	}
	return out
}

func setLocator(items []metaItem, keys []string, vals map[string]string) ([]metaItem, error) {
	b := marshalLocator(keys, vals)
	if len(b) > maxLocatorSize {
		return nil, driver.OptionErrorf("parent path is too long for a VHDX parent locator")
	}
	for i := range items {
		if items[i].id == guidParentLoc {
			items[i].data = b
			return items, nil
		}
	}
	return append(items, metaItem{guidParentLoc, metaIsRequired, b}), nil
}

// SetParent rewrites the parent locator (rebase): parent_linkage from the
// new parent's modification UUID, relative_path and absolute_win32_path
// from its name relative to this image; volume_path and parent_linkage2
// (stale now) are dropped. A standalone image becomes differencing (its
// BAT gains the last chunk's sector bitmap entry, moving when the region
// is too small). nil makes the image standalone: partially present
// blocks become fully present (their sectors not present are zeroed: with
// no parent they read zeros), sector bitmaps are freed and the locator
// removed.
func (im *image) SetParent(ref *driver.ParentRef) error {
	if im.ro {
		return im.readOnlyErr(-1)
	}
	if ref == nil {
		return im.makeStandalone()
	}
	link := guid{}
	for _, s := range []string{ref.ModUUID, ref.UUID} {
		if g, err := parseGUID(strings.Trim(s, "{}")); err == nil && s != "" {
			link = g
			break
		}
	}
	if link.isZero() {
		link = newGUID()
	}
	rel, abs := ref.Name, ref.Name
	if filepath.IsAbs(ref.Name) {
		if r, err := filepath.Rel(filepath.Dir(absName(im.name)), ref.Name); err == nil {
			rel = r
		}
	} else {
		abs = filepath.Join(filepath.Dir(absName(im.name)), ref.Name)
	}
	keys := []string{"parent_linkage", "relative_path", "absolute_win32_path"}
	vals := map[string]string{
		"parent_linkage":      "{" + link.String() + "}",
		"relative_path":       toWindowsRel(rel),
		"absolute_win32_path": abs,
	}
	return im.changeMetadata(func(items []metaItem) ([]metaItem, error) {
		if !im.p.hasParent {
			if err := im.becomeDiffLocked(); err != nil {
				return nil, err
			}
			items = setFileParam(items, fpHasParent, true)
		}
		return setLocator(items, keys, vals)
	})
}

func absName(name string) string {
	if a, err := filepath.Abs(name); err == nil {
		return a
	}
	return name
}

func setFileParam(items []metaItem, bit uint32, on bool) []metaItem {
	for i := range items {
		if items[i].id == guidFileParam && len(items[i].data) >= 8 {
			d := append([]byte(nil), items[i].data...)
			fl := binary.LittleEndian.Uint32(d[4:])
			if on {
				fl |= bit
			} else {
				fl &^= bit
			}
			binary.LittleEndian.PutUint32(d[4:], fl)
			items[i].data = d
		}
	}
	return items
}

// becomeDiffLocked lays the BAT out for a differencing image: entries up
// to the end of the last chunk (its sector bitmap entry included).
func (im *image) becomeDiffLocked() error {
	if im.p.leaveAllocated {
		return driver.Unsupportedf(im.name, "a fixed VHDX cannot get a parent")
	}
	total := batEntries(im.nBlocks, im.chunkRatio, true)
	old := int64(len(im.bat))
	if total <= old {
		return nil
	}
	im.bat = append(im.bat, make([]uint64, total-old)...)
	for i := old; i < total; i++ {
		im.dirtyBAT[i*8/logSector] = true
	}
	if total*8 > im.batLen {
		return im.moveBATLocked()
	}
	return nil
}

func (im *image) makeStandalone() error {
	return im.changeMetadata(func(items []metaItem) ([]metaItem, error) {
		if !im.p.hasParent {
			return items, nil
		}
		lss := im.p.logicalSector
		for b := int64(0); b < im.nBlocks; b++ {
			i := im.payloadIndex(b)
			if im.bat[i]&7 != stPartial {
				continue
			}
			if why := im.bad[i]; why != "" {
				return nil, im.badErr(i)
			}
			foff := int64(im.bat[i] >> 20 << 20)
			base := b * im.p.blockSize
			for pos, end := base, base+im.blockLen(b); pos < end; {
				st, _, l, err := im.runLocked(pos, end-pos)
				if err != nil {
					return nil, err
				}
				if st == driver.Unallocated {
					if err := writeZeros(im.f, foff+pos-base, roundUp(l, lss)); err != nil {
						return nil, err
					}
				}
				pos += l
			}
			im.setEntryLocked(i, stFull, foff)
		}
		for c := int64(0); c*im.chunkRatio < im.nBlocks; c++ {
			if bi := im.bitmapIndex(c); bi < int64(len(im.bat)) {
				im.freeEntryLocked(bi)
			}
			delete(im.bitmaps, c)
			delete(im.dirtyBM, c)
		}
		total := batEntries(im.nBlocks, im.chunkRatio, false)
		for i := total; i < int64(len(im.bat)); i++ {
			im.freeEntryLocked(i)
		}
		im.bat = im.bat[:total]
		items = setFileParam(items, fpHasParent, false)
		return delItem(items, guidParentLoc), nil
	})
}

// changeMetadata rebuilds the metadata region with the items edit
// returns (called with mu held, the session started), logs the pages that
// differ and commits.
func (im *image) changeMetadata(edit func([]metaItem) ([]metaItem, error)) error {
	if im.ro {
		return im.readOnlyErr(-1)
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := im.startSessionLocked(); err != nil {
		return err
	}
	md := make([]byte, im.metaLen)
	if err := readFull(im.r, md, im.metaOff); err != nil {
		return err
	}
	for off, pg := range im.dirtyPg {
		if off >= im.metaOff && off < im.metaOff+im.metaLen {
			copy(md[off-im.metaOff:], pg)
		}
	}
	var items []metaItem
	for _, m := range im.metaEnt {
		if int64(m.off)+int64(m.length) > im.metaLen {
			return im.corrupt(im.metaOff, "metadata item %s lies outside the region", m.id)
		}
		items = append(items, metaItem{m.id, m.flags, append([]byte(nil), md[m.off:m.off+m.length]...)})
	}
	items, err := edit(items)
	if err != nil {
		return err
	}
	need := int64(metaTableSize)
	for _, it := range items {
		need += roundUp(int64(len(it.data)), 8)
	}
	if need > im.metaLen || 32+32*len(items) > metaTableSize {
		return driver.Unsupportedf(im.name, "the metadata items need %d bytes; the region has %d", need, im.metaLen)
	}
	nmd := marshalMetadata(items, im.metaLen)
	p, ents, err := im.parseMetadata(nmd, im.metaOff)
	if err != nil {
		return err
	}
	for pg := int64(0); pg < im.metaLen; pg += logSector {
		if string(nmd[pg:pg+logSector]) != string(md[pg:pg+logSector]) {
			im.dirtyPg[im.metaOff+pg] = nmd[pg : pg+logSector]
		}
	}
	p.diskSize = im.p.diskSize
	im.p, im.metaEnt = p, ents
	return im.commitLocked()
}
