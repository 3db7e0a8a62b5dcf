package vdisk

import (
	"context"

	"github.com/vdisk/vdisk/driver"
)

// Measure computes the size an image of format (with create options opts)
// needs to hold src's content (qemu-img measure), or, with src nil, an
// image of size bytes.
func Measure(ctx context.Context, format string, opts []driver.KV, size int64, src *Disk) (driver.MeasureResult, error) {
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
		top := src.Top().Image
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
				if !e.Data {
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
