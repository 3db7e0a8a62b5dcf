package vdisk

import (
	"bytes"
	"context"
	"errors"

	"github.com/vdisk/vdisk/driver"
)

// Resize changes the virtual size of the top image. Shrinking discards the
// tail; callers that want qemu-img's safety rules check first (see the
// resize command). Growing over a larger parent makes the new range read
// zeros (not the parent's old content beyond the top's former end), as
// qemu does.
func (d *Disk) Resize(ctx context.Context, size int64, prealloc string) error {
	if err := d.busy(); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.writable(); err != nil {
		return err
	}
	if size < 0 {
		return driver.Errorf(ErrInvalidOption, d.name(), -1, "negative size %d", size)
	}
	top := d.layers[0]
	r, ok := top.img.(driver.Resizer)
	if !ok {
		return driver.Errorf(ErrUnsupported, top.Name, -1, "format %s cannot resize images", top.Format.Name)
	}
	old := top.img.Size()
	if err := r.Resize(ctx, size, prealloc); err != nil {
		return driver.WithFile(err, "resize", top.Name)
	}
	d.reshape()
	return d.shadowGrowth(0, old)
}

// shadowGrowth makes the range a layer grew into (from old to its size)
// read zeros where the chain below it holds something there.
func (d *Disk) shadowGrowth(depth int, old int64) error {
	if depth+1 >= len(d.layers) {
		return nil
	}
	end := min(d.layers[depth].img.Size(), d.layers[depth+1].img.Size())
	if end <= old {
		return nil
	}
	return d.zeroLayer(depth, old, end-old, true, nil)
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
		if err := d.busy(); err != nil {
			return nil, err
		}
	}
	top := d.layers[0]
	c, ok := top.img.(driver.Checker)
	if !ok {
		return nil, driver.Errorf(ErrUnsupported, top.Name, -1, "format %s does not support checks", top.Format.Name)
	}
	res, err := c.Check(ctx, mode)
	if err == nil && mode != driver.RepairNone {
		d.reshape()
	}
	return res, driver.WithFile(err, "check", top.Name)
}

// Compact drops the units of the top image that are all zeros or equal to
// what the chain below shows there (VD's PARENTSTATE compaction), through
// the driver's Discarder (and, for zeros over a parent, its Zeroer), and
// then lets the driver pack its file (driver.Compacter) where it can. The
// disk reads the same before and after. Formats that can neither discard
// nor pack are refused.
func (d *Disk) Compact(ctx context.Context, progress Progress) error {
	if err := d.busy(); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.writable(); err != nil {
		return err
	}
	top := d.layers[0]
	dc, canDiscard := top.img.(driver.Discarder)
	pk, canPack := top.img.(driver.Compacter)
	if !canDiscard && !canPack {
		return driver.Errorf(ErrUnsupported, top.Name, -1, "format %s cannot compact images", top.Format.Name)
	}
	size := top.img.Size()
	total := size
	if canDiscard && canPack {
		total = 2 * size
	}
	if canDiscard {
		scanProg := progress
		if progress != nil {
			scanProg = func(done, _ int64) { progress(done, total) }
		}
		refused, err := d.dropRedundant(ctx, dc, scanProg)
		if err != nil {
			return err
		}
		if refused && !canPack {
			// A layout that cannot deallocate (a fixed image).
			return driver.Errorf(ErrUnsupported, top.Name, -1, "format %s cannot compact this image (its layout cannot deallocate blocks)", top.Format.Name)
		}
	}
	if !canPack {
		return driver.WithFile(top.img.Flush(), "flush", top.Name)
	}
	packProg := progress
	if progress != nil {
		base := total - size
		packProg = func(done, t int64) {
			if t > 0 {
				progress(base+done*size/t, total)
			}
		}
	}
	return driver.WithFile(pk.Compact(ctx, packProg), "compact", top.Name)
}

// dropRedundant discards every unit of the top that holds data equal to
// the chain below (zeros without a parent) and zeroes, where the format
// has an efficient zero state, units of zeros over a parent that is not.
// It reports whether the driver refused to discard (ErrUnsupported) where
// it should have. The caller holds d.mu exclusively.
func (d *Disk) dropRedundant(ctx context.Context, dc driver.Discarder, progress Progress) (refused bool, err error) {
	top := d.layers[0]
	size := top.img.Size()
	unit := top.img.Info().ClusterSize
	if unit <= 0 {
		unit = 64 << 10
	}
	unit = max(unit, 512)
	z, canZero := top.img.(driver.Zeroer)
	canZero = canZero && top.Format.Caps&driver.CapZero != 0
	mine := make([]byte, min(unit, size))
	below := make([]byte, min(unit, size))
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return refused, err
		}
		e, err := d.checkedStatus(0, off, size-off)
		if err != nil {
			return refused, err
		}
		end := off + e.Length
		if e.State != driver.Data {
			off = end
			continue
		}
		for u := off / unit * unit; u < end; u += unit {
			n := min(unit, size-u)
			m, b := mine[:n], below[:n]
			if err := d.readLayerView(0, m, u); err != nil {
				return refused, err
			}
			if err := d.readLayerView(1, b, u); err != nil {
				return refused, err
			}
			switch {
			case bytes.Equal(m, b):
				if err := dc.Discard(u, n); errors.Is(err, ErrUnsupported) {
					refused = true
				} else if err != nil {
					return refused, driver.WithFile(err, "discard", top.Name)
				}
			case canZero && driver.IsZero(m):
				if err := z.WriteZeroes(u, n, true); err != nil {
					if _, fill := driver.AsFill(err); !fill && !errors.Is(err, ErrUnsupported) {
						return refused, driver.WithFile(err, "write zeroes", top.Name)
					}
				}
			}
			if progress != nil {
				progress(min(u+n, size), size)
			}
		}
		off = max(end, off+1)
	}
	return refused, nil
}

// checkedStatus asks layer depth for the run at off and validates the
// driver's answer.
func (d *Disk) checkedStatus(depth int, off, n int64) (driver.Extent, error) {
	l := d.layers[depth]
	e, err := l.img.Status(off, n)
	if err != nil {
		return e, driver.WithFile(err, "status", l.Name)
	}
	if err := driver.CheckExtent(l.Format.Name, l.Name, off, n, e); err != nil {
		return e, err
	}
	return e, nil
}
