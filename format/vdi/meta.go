package vdi

import (
	"github.com/vdisk/vdisk/driver"
)

var (
	_ driver.Identifier = (*image)(nil)
	_ driver.Geometry   = (*image)(nil)
	_ driver.Commenter  = (*image)(nil)
	_ driver.Reparenter = (*image)(nil)
	_ driver.Zeroer     = (*image)(nil)
	_ driver.Discarder  = (*image)(nil)
	_ driver.Resizer    = (*image)(nil)
	_ driver.Checker    = (*image)(nil)
	_ driver.Compacter  = (*image)(nil)
)

func (im *image) getUUID(f func(h *header) UUID) string {
	im.meta.Lock()
	defer im.meta.Unlock()
	return uuidString(f(&im.hdr))
}

// UUID is the image's creation UUID.
func (im *image) UUID() string { return im.getUUID(func(h *header) UUID { return h.uuid }) }

// ModificationUUID changes on the first write of every open-for-write session.
func (im *image) ModificationUUID() string {
	return im.getUUID(func(h *header) UUID { return h.modUUID })
}

// ParentUUID is the UUID of the parent of a differencing image.
func (im *image) ParentUUID() string {
	return im.getUUID(func(h *header) UUID { return h.parentUUID })
}

// ParentModificationUUID is the parent's modification UUID when the
// differencing image was made (or last rebased).
func (im *image) ParentModificationUUID() string {
	return im.getUUID(func(h *header) UUID { return h.parentModUUID })
}

// updateHeader changes the header with fn and writes it.
func (im *image) updateHeader(fn func(h *header) error) error {
	if im.ro {
		return driver.Errorf(driver.ErrReadOnly, im.name, -1, "image opened read-only")
	}
	im.meta.Lock()
	defer im.meta.Unlock()
	h := im.hdr
	if err := fn(&h); err != nil {
		return err
	}
	im.hdr = h
	im.hdrDirty = true
	return im.writeHeaderLocked(false)
}

func (im *image) setUUID(s string, f func(h *header) *UUID) error {
	u, err := parseUUID(s)
	if err != nil {
		return err
	}
	return im.updateHeader(func(h *header) error {
		*f(h) = u
		return nil
	})
}

// SetUUID sets the image UUID ("" clears it).
func (im *image) SetUUID(s string) error {
	return im.setUUID(s, func(h *header) *UUID { return &h.uuid })
}

// SetModificationUUID sets the modification UUID; it then stays for the
// rest of the session instead of being refreshed on the first write.
func (im *image) SetModificationUUID(s string) error {
	err := im.setUUID(s, func(h *header) *UUID { return &h.modUUID })
	if err == nil {
		im.modDone.Store(true)
	}
	return err
}

// SetParentUUID sets the parent UUID (the image type is kept; see SetParent).
func (im *image) SetParentUUID(s string) error {
	u, err := parseUUID(s)
	if err != nil {
		return err
	}
	return im.updateHeader(func(h *header) error {
		if u == nilUUID && h.typ == typeDiff {
			return driver.OptionErrorf("a differencing image needs a parent UUID; make it standalone with rebase instead")
		}
		h.parentUUID = u
		return nil
	})
}

// SetParentModificationUUID sets the recorded parent modification UUID.
func (im *image) SetParentModificationUUID(s string) error {
	u, err := parseUUID(s)
	if err != nil {
		return err
	}
	return im.updateHeader(func(h *header) error {
		if h.major() == 0 {
			return driver.Unsupportedf(im.name, "a version 0 VDI header has no parent modification UUID")
		}
		h.parentModUUID = u
		return nil
	})
}

// SetParent rewrites the parent reference: nil makes a differencing image
// standalone (a dynamic base); otherwise the reference must carry the
// parent's UUID (VDI records no file name) and the image becomes a
// differencing image of it.
func (im *image) SetParent(ref *driver.ParentRef) error {
	if ref == nil {
		return im.updateHeader(func(h *header) error {
			if h.typ == typeDiff {
				h.typ = typeNormal
			}
			h.parentUUID, h.parentModUUID = nilUUID, nilUUID
			return nil
		})
	}
	if ref.UUID == "" {
		return driver.Unsupportedf(im.name, "VDI records its parent by UUID only, and the new parent has none")
	}
	pu, err := parseUUID(ref.UUID)
	if err != nil {
		return err
	}
	pm, err := parseUUID(ref.ModUUID)
	if err != nil {
		return err
	}
	return im.updateHeader(func(h *header) error {
		if h.typ == typeFixed {
			return driver.Unsupportedf(im.name, "a fixed VDI image cannot become a differencing image")
		}
		if h.major() == 0 && pm != nilUUID {
			pm = nilUUID // not recordable in a version 0 header
		}
		h.typ = typeDiff
		h.parentUUID, h.parentModUUID = pu, pm
		return nil
	})
}

// PCHS returns the physical geometry, kept in the header's legacy geometry
// field (where older VirtualBox versions stored it).
func (im *image) PCHS() (driver.CHS, bool) {
	im.meta.Lock()
	defer im.meta.Unlock()
	return im.hdr.legacy.chs(), im.hdr.legacy.set()
}

// LCHS returns the logical geometry of a version 1.1 header.
func (im *image) LCHS() (driver.CHS, bool) {
	im.meta.Lock()
	defer im.meta.Unlock()
	if !im.hdr.hasLCHS() {
		return driver.CHS{}, false
	}
	return im.hdr.lchs.chs(), im.hdr.lchs.set()
}

// SetPCHS records the physical geometry.
func (im *image) SetPCHS(g driver.CHS) error {
	return im.updateHeader(func(h *header) error {
		h.legacy = geometry{g.Cylinders, g.Heads, g.Sectors, sectorSize}
		return nil
	})
}

// SetLCHS records the logical geometry. A 384-byte version 1 header (as
// qemu writes) grows to the 400-byte form when the block map leaves room.
func (im *image) SetLCHS(g driver.CHS) error {
	return im.updateHeader(func(h *header) error {
		if !h.hasLCHS() {
			if h.major() != 1 || h.offBlocks < preHeaderSize+hdrV1PlusSize {
				return driver.Unsupportedf(im.name, "this VDI header has no room for a logical geometry")
			}
			h.size = hdrV1PlusSize
		}
		h.lchs = geometry{g.Cylinders, g.Heads, g.Sectors, sectorSize}
		return nil
	})
}

// Comment returns the image comment.
func (im *image) Comment() string {
	im.meta.Lock()
	defer im.meta.Unlock()
	return im.hdr.commentString()
}

// SetComment sets the image comment (at most 255 bytes).
func (im *image) SetComment(s string) error {
	return im.updateHeader(func(h *header) error { return h.setComment(s) })
}
