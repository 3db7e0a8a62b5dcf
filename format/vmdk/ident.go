package vmdk

import (
	"fmt"
	"strings"

	"github.com/vdisk/vdisk/driver"
)

// VMDK links a delta disk to its parent by content ID: the child records
// the parent's CID as parentCID, and every write session gives an image a
// new CID. The Identifier interface exposes the CID as the image's UUID
// (eight hex digits) so that parent references at create, rebase and
// commit record it; it doubles as the modification UUID, and Parent
// reports the recorded parentCID as the parent's modification UUID, so a
// stale one (the parent was written since) is a warning, not ErrCorrupt.
var (
	_ driver.Identifier       = (*image)(nil)
	_ driver.Geometry         = (*image)(nil)
	_ driver.Reparenter       = (*image)(nil)
	_ driver.Zeroer           = (*image)(nil)
	_ driver.Discarder        = (*image)(nil)
	_ driver.CompressedLender = (*image)(nil)
)

func (im *image) UUID() string {
	im.mu.Lock()
	defer im.mu.Unlock()
	return fmt.Sprintf("%08x", im.cid)
}

func (im *image) ParentUUID() string {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.parentCID == 0xffffffff {
		return ""
	}
	return fmt.Sprintf("%08x", im.parentCID)
}

// The CID is also what changes when an image is modified: the container
// refreshes a child's record of its parent's modification UUID after it
// writes into the parent (commit, merge), which keeps the CID chain valid.
func (im *image) ModificationUUID() string       { return im.UUID() }
func (im *image) ParentModificationUUID() string { return im.ParentUUID() }

func (im *image) SetModificationUUID(u string) error       { return im.SetUUID(u) }
func (im *image) SetParentModificationUUID(u string) error { return im.SetParentUUID(u) }

func parseCID(name, u string) (uint32, error) {
	v, ok := hex32(u)
	if !ok || len(strings.TrimSpace(u)) > 10 {
		return 0, driver.Errorf(driver.ErrInvalidOption, name, -1, "a VMDK content ID is 8 hex digits, not %q", u)
	}
	return v, nil
}

func (im *image) SetUUID(u string) error {
	v, err := parseCID(im.name, u)
	if err != nil {
		return err
	}
	return im.updateDesc(func() {
		im.cid = v
		im.desc.set("CID", fmt.Sprintf("%08x", v), false)
		im.cidDone = true
	})
}

func (im *image) SetParentUUID(u string) error {
	v := uint32(0xffffffff)
	if u != "" {
		var err error
		if v, err = parseCID(im.name, u); err != nil {
			return err
		}
	}
	return im.updateDesc(func() {
		im.parentCID = v
		im.desc.set("parentCID", fmt.Sprintf("%08x", v), false)
	})
}

// SetParent records ref as the parent (nil: none).
func (im *image) SetParent(ref *driver.ParentRef) error {
	if ref != nil && strings.ContainsAny(ref.Name, "\"\r\n") {
		return driver.OptionErrorf("backing file name %q cannot be recorded in a VMDK descriptor", ref.Name)
	}
	if ref != nil && ref.Format != "" && !strings.EqualFold(ref.Format, "vmdk") {
		return driver.Unsupportedf(im.name, "the backing file of a VMDK image must be a VMDK image, not %s", ref.Format)
	}
	var cid uint32 = 0xffffffff
	if ref != nil && ref.UUID != "" {
		v, err := parseCID(im.name, ref.UUID)
		if err != nil {
			return err
		}
		cid = v
	}
	return im.updateDesc(func() {
		if ref == nil || ref.Name == "" {
			im.desc.del("parentFileNameHint")
		} else {
			im.desc.set("parentFileNameHint", ref.Name, true)
		}
		if ref == nil || ref.UUID != "" {
			im.parentCID = cid
			im.desc.set("parentCID", fmt.Sprintf("%08x", cid), false)
		}
	})
}

// updateDesc applies change to the descriptor and writes it, restoring the
// old state when the write fails.
func (im *image) updateDesc(change func()) error {
	if im.ro {
		return driver.Errorf(driver.ErrReadOnly, im.name, -1, "image opened read-only")
	}
	if im.stream != nil {
		return driver.Unsupportedf(im.name, "a streamOptimized image being written cannot change its descriptor")
	}
	if im.noDesc {
		return driver.Unsupportedf(im.name, "the sparse file has no descriptor to record this in")
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	old := *im.desc
	old.lines = append([]descLine(nil), im.desc.lines...)
	cid, pcid, done := im.cid, im.parentCID, im.cidDone
	change()
	im.refreshParent()
	if err := im.writeDescriptor(); err != nil {
		*im.desc = old
		im.cid, im.parentCID, im.cidDone = cid, pcid, done
		im.refreshParent()
		return err
	}
	return nil
}

func (im *image) PCHS() (driver.CHS, bool) {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.chs("ddb.geometry.")
}

func (im *image) LCHS() (driver.CHS, bool) {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.chs("ddb.geometry.bios")
}

func (im *image) setCHS(prefix string, g driver.CHS) error {
	return im.updateDesc(func() {
		cap := func(s string) string {
			if prefix == "ddb.geometry.bios" {
				return strings.ToUpper(s[:1]) + s[1:]
			}
			return s
		}
		im.desc.set(prefix+cap("cylinders"), fmt.Sprint(g.Cylinders), true)
		im.desc.set(prefix+cap("heads"), fmt.Sprint(g.Heads), true)
		im.desc.set(prefix+cap("sectors"), fmt.Sprint(g.Sectors), true)
	})
}

func (im *image) SetPCHS(g driver.CHS) error { return im.setCHS("ddb.geometry.", g) }
func (im *image) SetLCHS(g driver.CHS) error { return im.setCHS("ddb.geometry.bios", g) }
