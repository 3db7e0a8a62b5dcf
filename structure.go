package vdisk

import (
	"context"

	"github.com/vdisk/vdisk/driver"
)

// Structural changes to an open Disk. Each runs under the Disk's exclusive
// lock (no request is in flight meanwhile) and refreshes what the Disk
// derives from its layers, so Size() stays true.

// change runs fn on the top layer's image as T under the exclusive lock.
func change[T any](d *Disk, op, what string, fn func(T) error) error {
	if err := d.busy(); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.writable(); err != nil {
		return err
	}
	top := d.layers[0]
	v, ok := top.img.(T)
	if !ok {
		return driver.Errorf(ErrUnsupported, top.Name, -1, "format %s %s", top.Format.Name, what)
	}
	if err := fn(v); err != nil {
		return driver.WithFile(err, op, top.Name)
	}
	d.reshape()
	return nil
}

// Snapshots lists the top image's internal snapshots (none when its format
// has none).
func (d *Disk) Snapshots() ([]driver.Snapshot, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.closed {
		return nil, d.check(0, 0)
	}
	top := d.layers[0]
	sn, ok := top.img.(driver.Snapshotter)
	if !ok {
		return nil, nil
	}
	list, err := sn.Snapshots()
	return list, driver.WithFile(err, "list snapshots", top.Name)
}

const noSnapshots = "does not support internal snapshots"

// CreateSnapshot records the top image's current state as internal
// snapshot name.
func (d *Disk) CreateSnapshot(name string) error {
	return change(d, "create snapshot", noSnapshots, func(s driver.Snapshotter) error { return s.CreateSnapshot(name) })
}

// ApplySnapshot reverts the top image to internal snapshot name (its size
// may change with it).
func (d *Disk) ApplySnapshot(name string) error {
	return change(d, "apply snapshot", noSnapshots, func(s driver.Snapshotter) error { return s.ApplySnapshot(name) })
}

// DeleteSnapshot deletes internal snapshot name of the top image.
func (d *Disk) DeleteSnapshot(name string) error {
	return change(d, "delete snapshot", noSnapshots, func(s driver.Snapshotter) error { return s.DeleteSnapshot(name) })
}

// Amend changes the top image's creation options in place (qemu-img
// amend); a size option resizes the disk.
func (d *Disk) Amend(ctx context.Context, opts []driver.KV) error {
	return change(d, "amend", "does not support option amendment", func(a driver.Amender) error {
		old := d.layers[0].img.Size()
		if err := a.Amend(ctx, opts); err != nil {
			return err
		}
		// Under the same lock: no reader sees the grown range show the
		// parent's old content.
		return d.shadowGrowth(0, old)
	})
}

// UUIDKind names one of the UUIDs an image may record.
type UUIDKind int

const (
	UUIDImage UUIDKind = iota
	UUIDParent
	UUIDModification
	UUIDParentModification
)

// SetUUID sets one UUID the top image records.
func (d *Disk) SetUUID(kind UUIDKind, u string) error {
	return change(d, "set UUID", "does not record UUIDs", func(id driver.Identifier) error {
		switch kind {
		case UUIDImage:
			return id.SetUUID(u)
		case UUIDParent:
			return id.SetParentUUID(u)
		case UUIDModification:
			return id.SetModificationUUID(u)
		case UUIDParentModification:
			return id.SetParentModificationUUID(u)
		}
		return driver.OptionErrorf("unknown UUID kind %d", kind)
	})
}

// SetGeometry sets the top image's physical and/or logical CHS geometry
// (nil leaves one as it is).
func (d *Disk) SetGeometry(pchs, lchs *driver.CHS) error {
	return change(d, "set geometry", "does not record a disk geometry", func(g driver.Geometry) error {
		if pchs != nil {
			if err := g.SetPCHS(*pchs); err != nil {
				return err
			}
		}
		if lchs != nil {
			return g.SetLCHS(*lchs)
		}
		return nil
	})
}

// SetComment sets the top image's comment.
func (d *Disk) SetComment(s string) error {
	return change(d, "set comment", "does not record a comment", func(c driver.Commenter) error { return c.SetComment(s) })
}

// SetParent rewrites the parent reference the top image records without
// copying anything (rebase -u); nil makes it standalone. The open chain is
// not changed: reopen the disk to follow the new reference.
func (d *Disk) SetParent(ref *driver.ParentRef) error {
	return change(d, "set parent", "cannot change its parent reference", func(r driver.Reparenter) error {
		if err := r.SetParent(ref); err != nil {
			return err
		}
		return d.layers[0].img.Flush()
	})
}
