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
