package vdisk

import (
	"context"

	"github.com/vdisk/vdisk/driver"
)

// MeasureOptions says what Measure measures.
type MeasureOptions struct {
	// Options are the new image's create options.
	Options []driver.KV
	// Source is the disk whose content the image would hold; when nil,
	// an empty image of Size bytes is measured (qemu-img measure --size).
	Source *Disk
	Size   int64
}

// Measure computes the size an image of format needs (qemu-img measure).
func Measure(ctx context.Context, format string, o *MeasureOptions) (driver.MeasureResult, error) {
	if o == nil {
		o = &MeasureOptions{}
	}
	opts, size, src := o.Options, o.Size, o.Source
	if src != nil && size != 0 {
		return driver.MeasureResult{}, driver.OptionErrorf("measure: give a source or a size, not both")
	}
	f, err := driver.Lookup(format)
	if err != nil {
		return driver.MeasureResult{}, err
	}
	if f.Measure == nil {
		return driver.MeasureResult{}, driver.Errorf(ErrUnsupported, "", -1, "format %s does not support size measurement", f.Name)
	}
	vals, err := driver.ParseOptions(f.Name, f.CreateOptions, opts)
	if err != nil {
		return driver.MeasureResult{}, err
	}
	p := &driver.MeasureParams{Size: size, Options: vals}
	if src != nil {
		p.Size = src.Size()
		top := src.Top().img
		if si, ok := top.(*snapshotImage); ok {
			// A snapshot's image keeps the image's bitmaps.
			top = si.owner
		}
		if bl, ok := top.(driver.BitmapLister); ok {
			bms, err := bl.PersistentBitmaps()
			if err != nil {
				return driver.MeasureResult{}, err
			}
			p.SourceBitmaps, p.SourceHasBitmaps = bms, true
		}
		cache := map[int64]int64{}
		p.Allocated = func(unit int64) (int64, error) {
			if unit <= 0 {
				unit = 512
			}
			if v, ok := cache[unit]; ok {
				return v, nil
			}
			var total, lastEnd int64 = 0, -1
			err := src.Map(ctx, 0, src.Size(), func(e Extent) error {
				if !e.IsData() {
					return nil
				}
				start := e.Start / unit * unit
				end := (e.Start + e.Length + unit - 1) / unit * unit
				if start < lastEnd {
					start = lastEnd
				}
				if end > start {
					total += end - start
				}
				lastEnd = max(lastEnd, end)
				return nil
			})
			if err != nil {
				return 0, err
			}
			cache[unit] = total
			return total, nil
		}
	}
	return f.Measure(p)
}
