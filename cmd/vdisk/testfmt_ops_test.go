package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/vdisk/vdisk/driver"
)

// The optional driver interfaces of the test-only vdtest format, so that
// the image-operation commands run their generic paths: Reparenter and
// Emptier (commit, merge, rebase), Resizer, Checker, Compacter,
// Snapshotter, Identifier, Geometry, Commenter and the amend interface.
//
// Snapshots record the allocation map only (applying one restores which
// clusters are allocated, not their old data): enough to drive the
// snapshot command, not a real snapshot implementation.

var (
	_ driver.Reparenter  = (*vdtImage)(nil)
	_ driver.Emptier     = (*vdtImage)(nil)
	_ driver.Resizer     = (*vdtImage)(nil)
	_ driver.Checker     = (*vdtImage)(nil)
	_ driver.Discarder   = (*vdtImage)(nil)
	_ driver.Snapshotter = (*vdtImage)(nil)
	_ driver.Identifier  = (*vdtImage)(nil)
	_ driver.Geometry    = (*vdtImage)(nil)
	_ driver.Commenter   = (*vdtImage)(nil)
	_ driver.Amender     = (*vdtImage)(nil)
)

func vdtUUID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// update changes the metadata under the lock and writes the header.
func (im *vdtImage) update(fn func() error) error {
	if im.ro {
		return driver.ErrReadOnly
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := fn(); err != nil {
		return err
	}
	return im.writeHeader()
}

func (im *vdtImage) SetParent(ref *driver.ParentRef) error {
	return im.update(func() error {
		im.meta.Backing, im.meta.BackingFmt, im.meta.ParentUUID, im.meta.ParentModUUID = "", "", "", ""
		if ref != nil {
			im.meta.Backing, im.meta.BackingFmt = ref.Name, ref.Format
			im.meta.ParentUUID, im.meta.ParentModUUID = ref.UUID, ref.ModUUID
		}
		return nil
	})
}

func (im *vdtImage) MakeEmpty() error {
	return im.update(func() error {
		clear(im.alloc)
		return im.f.Truncate(vdtHeader)
	})
}

func (im *vdtImage) Resize(ctx context.Context, size int64, prealloc string) error {
	if prealloc != "" && prealloc != "off" {
		return driver.Unsupportedf(im.f.Name(), "Unsupported preallocation mode: %s", prealloc)
	}
	return im.update(func() error {
		old := im.meta.Size
		if size < old {
			for c := range im.alloc {
				if c*vdtCluster >= size {
					delete(im.alloc, c)
				}
			}
			// The tail of a partial last cluster reads zeros if it grows again.
			if err := im.f.Truncate(vdtHeader + size); err != nil {
				return err
			}
		} else if last := (old - 1) / vdtCluster; old > 0 && im.alloc[last] {
			end := vdtHeader + min(size, (last+1)*vdtCluster)
			if fs, err := im.f.Size(); err == nil && fs < end {
				if err := im.f.Truncate(end); err != nil {
					return err
				}
			}
		}
		im.meta.Size = size
		return nil
	})
}

// corruptClusters are allocated clusters whose data lies past the end of
// the file.
func (im *vdtImage) corruptClusters() ([]int64, int64, error) {
	fsize, err := im.f.Size()
	if err != nil {
		return nil, 0, err
	}
	var out []int64
	for c := range im.alloc {
		if vdtHeader+min((c+1)*vdtCluster, im.meta.Size) > fsize {
			out = append(out, c)
		}
	}
	slices.Sort(out)
	return out, fsize, nil
}

func (im *vdtImage) Check(ctx context.Context, mode driver.RepairMode) (*driver.CheckResult, error) {
	if mode != driver.RepairNone && im.ro {
		return nil, driver.ErrReadOnly
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	bad, fsize, err := im.corruptClusters()
	if err != nil {
		return nil, err
	}
	res := &driver.CheckResult{
		TotalClusters:     (im.meta.Size + vdtCluster - 1) / vdtCluster,
		AllocatedClusters: int64(len(im.alloc)),
		ImageEndOffset:    fsize,
		Corruptions:       len(bad),
		Leaks:             im.meta.Leaks,
		CheckErrors:       im.meta.CheckErrors,
	}
	for _, c := range bad {
		res.Messages = append(res.Messages, fmt.Sprintf("ERROR cluster %d: data past the end of the file", c))
	}
	for i := 0; i < im.meta.Leaks; i++ {
		res.Messages = append(res.Messages, fmt.Sprintf("Leaked cluster %d refcount=1 reference=0", 1000+i))
	}
	changed := false
	if mode >= driver.RepairLeaks && im.meta.Leaks > 0 {
		res.LeaksFixed, res.Leaks, im.meta.Leaks = im.meta.Leaks, 0, 0
		changed = true
	}
	if mode == driver.RepairAll && len(bad) > 0 {
		for _, c := range bad {
			delete(im.alloc, c)
		}
		res.CorruptionsFixed, res.Corruptions = len(bad), 0
		res.AllocatedClusters = int64(len(im.alloc))
		changed = true
	}
	if changed {
		if err := im.writeHeader(); err != nil {
			return nil, err
		}
	}
	return res, nil
}

// Discard frees the whole clusters of [off, off+n): they read through to
// the parent again (the container's compaction relies on it).
func (im *vdtImage) Discard(off, n int64) error {
	if im.ro {
		return driver.ErrReadOnly
	}
	for c := (off + vdtCluster - 1) / vdtCluster; ; c++ {
		start := c * vdtCluster
		end := min(start+vdtCluster, im.meta.Size)
		if start >= off+n || end > off+n {
			break
		}
		im.mu.Lock()
		had := im.alloc[c]
		delete(im.alloc, c)
		im.mu.Unlock()
		if had {
			if err := im.f.PunchHole(vdtHeader+start, end-start); err != nil {
				return err
			}
		}
	}
	return nil
}

func (im *vdtImage) Snapshots() ([]driver.Snapshot, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	return slices.Clone(im.meta.Snapshots), nil
}

func (im *vdtImage) findSnapshot(name string) int {
	for i, s := range im.meta.Snapshots {
		if s.ID == name {
			return i
		}
	}
	for i, s := range im.meta.Snapshots {
		if s.Name == name {
			return i
		}
	}
	return -1
}

func (im *vdtImage) CreateSnapshot(name string) error {
	return im.update(func() error {
		id := 1
		for _, s := range im.meta.Snapshots {
			if n, err := strconv.Atoi(s.ID); err == nil && n >= id {
				id = n + 1
			}
		}
		now := time.Now()
		s := driver.Snapshot{ID: strconv.Itoa(id), Name: name, DateSec: now.Unix(), DateNsec: int64(now.Nanosecond())}
		im.meta.Snapshots = append(im.meta.Snapshots, s)
		if im.meta.SnapAlloc == nil {
			im.meta.SnapAlloc = map[string][]int64{}
		}
		var alloc []int64
		for c := range im.alloc {
			alloc = append(alloc, c)
		}
		slices.Sort(alloc)
		im.meta.SnapAlloc[s.ID] = alloc
		return nil
	})
}

func (im *vdtImage) ApplySnapshot(name string) error {
	return im.update(func() error {
		i := im.findSnapshot(name)
		if i < 0 {
			return driver.Errorf(driver.ErrNotFound, im.f.Name(), -1, "snapshot not found")
		}
		clear(im.alloc)
		for _, c := range im.meta.SnapAlloc[im.meta.Snapshots[i].ID] {
			im.alloc[c] = true
		}
		return nil
	})
}

func (im *vdtImage) DeleteSnapshot(name string) error {
	return im.update(func() error {
		i := im.findSnapshot(name)
		if i < 0 {
			return driver.Errorf(driver.ErrNotFound, im.f.Name(), -1, "snapshot not found")
		}
		delete(im.meta.SnapAlloc, im.meta.Snapshots[i].ID)
		im.meta.Snapshots = slices.Delete(im.meta.Snapshots, i, i+1)
		return nil
	})
}

func (im *vdtImage) UUID() string {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.meta.UUID
}

func (im *vdtImage) ModificationUUID() string {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.meta.ModUUID
}

func (im *vdtImage) ParentUUID() string {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.meta.ParentUUID
}

func (im *vdtImage) ParentModificationUUID() string {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.meta.ParentModUUID
}

func (im *vdtImage) SetUUID(u string) error {
	return im.update(func() error { im.meta.UUID = u; return nil })
}

func (im *vdtImage) SetModificationUUID(u string) error {
	return im.update(func() error { im.meta.ModUUID = u; return nil })
}

func (im *vdtImage) SetParentUUID(u string) error {
	return im.update(func() error { im.meta.ParentUUID = u; return nil })
}

func (im *vdtImage) SetParentModificationUUID(u string) error {
	return im.update(func() error { im.meta.ParentModUUID = u; return nil })
}

func (im *vdtImage) PCHS() (driver.CHS, bool) {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.meta.PCHS == nil {
		return driver.CHS{}, false
	}
	return *im.meta.PCHS, true
}

func (im *vdtImage) LCHS() (driver.CHS, bool) {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.meta.LCHS == nil {
		return driver.CHS{}, false
	}
	return *im.meta.LCHS, true
}

func (im *vdtImage) SetPCHS(g driver.CHS) error {
	if g.Heads > 16 || g.Sectors > 63 {
		return driver.OptionErrorf("invalid physical geometry %d/%d/%d (at most 16 heads and 63 sectors)", g.Cylinders, g.Heads, g.Sectors)
	}
	return im.update(func() error { im.meta.PCHS = &g; return nil })
}

func (im *vdtImage) SetLCHS(g driver.CHS) error {
	return im.update(func() error { im.meta.LCHS = &g; return nil })
}

func (im *vdtImage) Comment() string {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.meta.Comment
}

func (im *vdtImage) SetComment(s string) error {
	if len(s) > 1024 {
		return driver.OptionErrorf("comment longer than 1024 bytes")
	}
	return im.update(func() error { im.meta.Comment = s; return nil })
}

// Amend changes the label (the only amendable option).
func (im *vdtImage) Amend(ctx context.Context, opts []driver.KV) error {
	for _, kv := range opts {
		if kv.Key != "label" {
			return driver.OptionErrorf("Invalid parameter '%s'", kv.Key)
		}
	}
	return im.update(func() error {
		for _, kv := range opts {
			im.meta.Label = kv.Value
		}
		return nil
	})
}
