package vdisk

import (
	"context"

	"github.com/vdisk/vdisk/driver"
)

// ParentView returns the view of the chain below this layer (the VD
// PARENTSTATE interface): reads fall through the lower layers, zeros past
// their end and where there is no parent.
func (l *Layer) ParentView() driver.ParentView { return l.view }

// Resize changes the virtual size of the top image. Shrinking discards the
// tail; callers that want qemu-img's safety rules check first (see the
// resize command).
func (d *Disk) Resize(ctx context.Context, size int64, prealloc string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.writable(); err != nil {
		return err
	}
	if size < 0 {
		return driver.Errorf(ErrInvalidOption, d.name(), -1, "negative size %d", size)
	}
	top := d.layers[0]
	r, ok := top.Image.(driver.Resizer)
	if !ok {
		return driver.Errorf(ErrUnsupported, top.Name, -1, "format %s cannot resize images", top.Format.Name)
	}
	if err := r.Resize(ctx, size, prealloc); err != nil {
		return driver.WithFile(err, "resize", top.Name)
	}
	d.size = top.Image.Size()
	return nil
}

// Check checks (and with a repair mode, repairs) the top image.
func (d *Disk) Check(ctx context.Context, mode driver.RepairMode) (*driver.CheckResult, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, d.check(0, 0)
	}
	if mode != driver.RepairNone {
		if err := d.writable(); err != nil {
			return nil, err
		}
	}
	top := d.layers[0]
	c, ok := top.Image.(driver.Checker)
	if !ok {
		return nil, driver.Errorf(ErrUnsupported, top.Name, -1, "format %s does not support checks", top.Format.Name)
	}
	res, err := c.Check(ctx, mode)
	return res, driver.WithFile(err, "check", top.Name)
}

// Compact drops blocks of the top image that are all zeros or equal to the
// parent's content and shrinks its file, where the format supports it.
func (d *Disk) Compact(ctx context.Context, progress Progress) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.writable(); err != nil {
		return err
	}
	top := d.layers[0]
	c, ok := top.Image.(driver.Compacter)
	if !ok {
		return driver.Errorf(ErrUnsupported, top.Name, -1, "format %s cannot compact images", top.Format.Name)
	}
	return driver.WithFile(c.Compact(ctx, top.view, progress), "compact", top.Name)
}
