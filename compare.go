package vdisk

import (
	"bytes"
	"context"
)

// CompareResult is the outcome of Compare.
type CompareResult struct {
	Identical bool
	// Offset of the first difference when not identical.
	Offset int64
	// SizeMismatch is set when the sizes differ and Strict was asked.
	SizeMismatch bool
}

// CompareOptions tunes Compare.
type CompareOptions struct {
	// Strict treats a size difference as a mismatch (qemu-img compare -s);
	// otherwise the tail of the larger disk must read as zeros.
	Strict   bool
	Progress Progress
}

// Compare compares the content of two disks as qemu-img compare does,
// skipping ranges both report as zeros.
func Compare(ctx context.Context, a, b *Disk, o *CompareOptions) (CompareResult, error) {
	if o == nil {
		o = &CompareOptions{}
	}
	sa, sb := a.Size(), b.Size()
	if sa != sb && o.Strict {
		return CompareResult{SizeMismatch: true, Offset: min(sa, sb)}, nil
	}
	common := min(sa, sb)
	total := max(sa, sb)
	const chunk = 1 << 20
	bufA := make([]byte, chunk)
	bufB := make([]byte, chunk)
	off := int64(0)
	for off < common {
		if err := ctx.Err(); err != nil {
			return CompareResult{}, err
		}
		ea, err := a.Status(off, common-off)
		if err != nil {
			return CompareResult{}, err
		}
		eb, err := b.Status(off, min(ea.Length, common-off))
		if err != nil {
			return CompareResult{}, err
		}
		n := min(ea.Length, eb.Length)
		if !ea.IsData() && !eb.IsData() {
			off += n
			if o.Progress != nil {
				o.Progress(off, total)
			}
			continue
		}
		end := off + n
		for off < end {
			c := min(int64(chunk), end-off)
			if _, err := a.ReadAt(bufA[:c], off); err != nil {
				return CompareResult{}, err
			}
			if _, err := b.ReadAt(bufB[:c], off); err != nil {
				return CompareResult{}, err
			}
			if !bytes.Equal(bufA[:c], bufB[:c]) {
				for i := int64(0); i < c; i++ {
					if bufA[i] != bufB[i] {
						// qemu reports the first differing sector.
						return CompareResult{Offset: (off + i) &^ 511}, nil
					}
				}
			}
			off += c
			if o.Progress != nil {
				o.Progress(off, total)
			}
		}
	}
	// Tail of the larger disk must read as zeros.
	larger := a
	if sb > sa {
		larger = b
	}
	for off < total {
		e, err := larger.Status(off, total-off)
		if err != nil {
			return CompareResult{}, err
		}
		if !e.IsData() {
			off += e.Length
			continue
		}
		end := off + e.Length
		for off < end {
			c := min(int64(chunk), end-off)
			if _, err := larger.ReadAt(bufA[:c], off); err != nil {
				return CompareResult{}, err
			}
			for i := int64(0); i < c; i++ {
				if bufA[i] != 0 {
					return CompareResult{Offset: (off + i) &^ 511}, nil
				}
			}
			off += c
		}
	}
	if o.Progress != nil {
		o.Progress(total, total)
	}
	return CompareResult{Identical: true}, nil
}
