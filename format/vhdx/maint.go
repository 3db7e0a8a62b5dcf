package vhdx

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/vdisk/vdisk/driver"
)

// Identifier: UUID is the page 83 data (the disk's identity), the
// modification UUID is the data write GUID (what a child's parent_linkage
// records), and the parent modification UUID is this image's
// parent_linkage.
func (im *image) UUID() string {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.p.page83.isZero() {
		return ""
	}
	return im.p.page83.String()
}

func (im *image) ModificationUUID() string {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.hdr.dataWrite.String()
}

func (im *image) ParentUUID() string { return "" }

func (im *image) ParentModificationUUID() string {
	im.mu.Lock()
	defer im.mu.Unlock()
	return strings.Trim(im.p.locator.get("parent_linkage"), "{}")
}

func (im *image) unsupportedID(what string) error {
	return driver.Unsupportedf(im.name, "changing the %s of a VHDX is not supported", what)
}

func (im *image) SetUUID(string) error             { return im.unsupportedID("page 83 data") }
func (im *image) SetModificationUUID(string) error { return im.unsupportedID("data write GUID") }
func (im *image) SetParentUUID(string) error       { return im.unsupportedID("parent UUID") }
func (im *image) SetParentModificationUUID(string) error {
	return im.unsupportedID("parent linkage")
}

// Resize grows the disk: the new blocks' BAT entries (which must fit in
// the BAT region) start NOT_PRESENT (fixed images: allocated, ZERO) and
// the virtual disk size item is rewritten, both through the log.
func (im *image) Resize(ctx context.Context, size int64, prealloc string) error {
	if im.ro {
		return im.readOnlyErr(-1)
	}
	if prealloc != "" && prealloc != "off" {
		return driver.Unsupportedf(im.name, "preallocation=%s on resize", prealloc)
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	size = roundUp(size, im.p.logicalSector)
	if size == im.p.diskSize {
		return nil
	}
	if size < im.p.diskSize {
		return driver.Unsupportedf(im.name, "shrinking a VHDX is not supported")
	}
	if size > maxDiskSize {
		return driver.OptionErrorf("VHDX disk size %d is larger than 64 TiB", size)
	}
	bs := im.p.blockSize
	nb := (size + bs - 1) / bs
	total := batEntries(nb, im.chunkRatio, im.p.hasParent)
	if total*8 > im.batLen {
		return driver.Unsupportedf(im.name, "growing to %d bytes needs %d BAT entries; the BAT region holds %d (moving the BAT is not supported)", size, total, im.batLen/8)
	}
	var md *metaEntry
	for i := range im.metaEnt {
		if im.metaEnt[i].id == guidDiskSize {
			md = &im.metaEnt[i]
		}
	}
	if md == nil {
		return im.corrupt(im.metaOff, "no virtual disk size item")
	}
	if err := im.startSessionLocked(); err != nil {
		return err
	}
	pageOff := im.metaOff + int64(md.off)/logSector*logSector
	page := make([]byte, logSector)
	if err := readFull(im.f, page, pageOff); err != nil {
		return err
	}
	if im.dirtyMD != nil {
		copy(page, im.dirtyMD.data)
	}
	in := (int64(md.off) % logSector)
	if in+8 > logSector {
		return driver.Unsupportedf(im.name, "the virtual disk size item crosses a 4 KiB page")
	}
	putU64(page[in:], uint64(size))
	im.dirtyMD = &logWrite{pageOff, page}
	old := int64(len(im.bat))
	im.bat = append(im.bat, make([]uint64, total-old)...)
	for i := old; i < total; i++ {
		im.dirtyBAT[i*8/logSector] = true
	}
	for b := im.nBlocks; b < nb; b++ {
		if im.p.leaveAllocated {
			im.setEntryLocked(im.payloadIndex(b), stZero, im.allocLocked(bs))
		}
	}
	// What this image still holds past the old end of its last block
	// must read zeros in the grown range.
	if last := im.nBlocks - 1; last >= 0 && im.p.diskSize%bs != 0 {
		st, foff, err := im.blockEntryLocked(last)
		if err == nil && (st == stFull || st == stPartial) && foff != 0 {
			tail := im.p.diskSize % bs
			if err := writeZeros(im.f, foff+tail, bs-tail); err != nil {
				return err
			}
		}
	}
	im.nBlocks = nb
	im.p.diskSize = size
	return im.commitLocked()
}

// Check reports BAT entries that are unusable (invalid state, outside the
// file, into metadata or another block) as corruptions; -r all makes them
// NOT_PRESENT (through the log). The log was replayed on open.
func (im *image) Check(ctx context.Context, mode driver.RepairMode) (*driver.CheckResult, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	res := &driver.CheckResult{}
	idx := make([]int64, 0, len(im.bad))
	for i := range im.bad {
		idx = append(idx, i)
	}
	sort.Slice(idx, func(a, b int) bool { return idx[a] < idx[b] })
	for _, i := range idx {
		res.Corruptions++
		res.Messages = append(res.Messages, "ERROR "+im.bad[i])
	}
	for _, s := range im.issues {
		res.Messages = append(res.Messages, "WARNING "+s)
	}
	if im.replayedInMemory {
		res.Messages = append(res.Messages, "WARNING the log needs replaying (open the image read-write)")
	}
	for b := int64(0); b < im.nBlocks; b++ {
		st := im.bat[im.payloadIndex(b)] & 7
		res.TotalClusters++
		if st == stFull || st == stPartial {
			res.AllocatedClusters++
		}
	}
	if sz, err := im.f.Size(); err == nil {
		res.ImageEndOffset = sz
	}
	if mode == driver.RepairAll && len(idx) > 0 {
		if im.ro {
			return res, im.readOnlyErr(-1)
		}
		if err := im.startSessionLocked(); err != nil {
			return res, err
		}
		for _, i := range idx {
			im.setEntryLocked(i, stNotPresent, 0)
			delete(im.bad, i)
			res.CorruptionsFixed++
		}
		if err := im.commitLocked(); err != nil {
			return res, fmt.Errorf("%s: repair: %w", im.name, err)
		}
		res.Corruptions -= res.CorruptionsFixed
	}
	return res, nil
}
