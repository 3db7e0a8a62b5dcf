package iscsistore

import (
	"errors"
	"io"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/iscsi"
)

// maxSameBlocks bounds one WRITE SAME or UNMAP when the target states no
// limit (VPD B0 zero): 1 GiB of 512-byte blocks keeps each command short.
const maxSameBlocks = 1 << 21

// PunchHole makes [off, off+n) read zeros: whole blocks are unmapped when
// the LUN promises zeros for unmapped blocks (LBPRZ), else overwritten
// with WRITE SAME of a zero block; partial blocks are zeroed in place.
func (f *File) PunchHole(off, n int64) error {
	return f.zero(off, n, true)
}

// ZeroRange zeroes [off, off+n) and keeps it allocated.
func (f *File) ZeroRange(off, n int64) error {
	return f.zero(off, n, false)
}

func (f *File) zero(off, n int64, unmap bool) error {
	if err := f.alive("zero", off); err != nil {
		return err
	}
	if f.ro {
		return driver.Errorf(driver.ErrReadOnly, f.name, off, "opened read-only")
	}
	if off < 0 || n < 0 || off > f.size {
		return driver.Errorf(driver.ErrOutOfRange, f.name, off, "zeroing %d bytes outside the %d-byte LUN", n, f.size)
	}
	n = min(n, f.size-off)
	if n == 0 {
		return nil
	}
	a, b := f.blocks(off, n)
	lk := f.locks.Lock(a, b-a, true)
	defer f.locks.Unlock(lk)
	// Whole blocks inside the range.
	wa := (off + f.bs - 1) / f.bs * f.bs
	wb := (off + n) / f.bs * f.bs
	if wa >= wb {
		// No whole block: zero the bytes in place.
		return f.writeLocked(make([]byte, n), off, a, b)
	}
	if err := f.zeroBlocks(wa, wb, unmap); err != nil {
		return err
	}
	if off < wa {
		if err := f.writeLocked(make([]byte, wa-off), off, a, wa); err != nil {
			return err
		}
	}
	if wb < off+n {
		if err := f.writeLocked(make([]byte, off+n-wb), wb, wb, b); err != nil {
			return err
		}
	}
	return nil
}

func (f *File) zeroBlocks(a, b int64, unmap bool) error {
	ctx := f.ctx()
	lba, end := uint64(a/f.bs), uint64(b/f.bs)
	useUnmap := unmap && f.holes.Load() && f.d.Unmap
	useSameUnmap := unmap && f.holes.Load() && f.d.WriteSameUnmap
	limit := uint64(maxSameBlocks)
	if useUnmap && f.d.MaxUnmapLBAs > 0 {
		limit = min(limit, uint64(f.d.MaxUnmapLBAs))
	} else if !useUnmap && f.d.MaxWriteSameLBAs > 0 {
		limit = min(limit, f.d.MaxWriteSameLBAs)
	}
	zero := make([]byte, f.bs)
	for lba < end {
		k := min(end-lba, limit)
		var err error
		if useUnmap {
			err = f.d.UnmapBlocks(ctx, lba, k)
		} else {
			err = f.d.WriteSame(ctx, lba, k, useSameUnmap, zero)
		}
		if errors.Is(err, iscsi.ErrInvalidCommand) {
			// A target without UNMAP or WRITE SAME: write zeros.
			err = f.writeZeros(int64(lba)*f.bs, int64(k)*f.bs)
		}
		if err != nil {
			return mapError(err, "zero", f.name, int64(lba)*f.bs)
		}
		lba += k
	}
	return nil
}

func (f *File) writeZeros(off, n int64) error {
	buf := make([]byte, min(n, f.chunk*parallel))
	for n > 0 {
		k := min(n, int64(len(buf)))
		if err := f.writeBlocks(buf[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// maxStatusCalls bounds the GET LBA STATUS round trips of one seek; past
// it the rest is reported as data, which is never wrong.
const maxStatusCalls = 4096

// SeekData returns the first offset at or after off that holds data.
func (f *File) SeekData(off int64) (int64, error) {
	return f.seek(off, true)
}

// SeekHole returns the first hole at or after off (the end counts).
func (f *File) SeekHole(off int64) (int64, error) {
	return f.seek(off, false)
}

func (f *File) seek(off int64, data bool) (int64, error) {
	if err := f.alive("seek", off); err != nil {
		return 0, err
	}
	if off < 0 {
		return 0, driver.Errorf(driver.ErrOutOfRange, f.name, off, "negative offset")
	}
	if off >= f.size {
		return 0, io.EOF
	}
	if !f.holes.Load() {
		if data {
			return off, nil
		}
		return f.size, nil
	}
	lba := uint64(off / f.bs)
	for calls := 0; lba < f.d.Blocks; calls++ {
		if calls >= maxStatusCalls {
			if data {
				return max(off, int64(lba)*f.bs), nil
			}
			return f.size, nil
		}
		st, err := f.d.GetLBAStatus(f.ctx(), lba)
		if err != nil {
			if errors.Is(err, iscsi.ErrInvalidCommand) {
				f.holes.Store(false)
				return f.seek(off, data)
			}
			return 0, mapError(err, "block status", f.name, int64(lba)*f.bs)
		}
		for _, s := range st {
			hole := s.Provisioning != 0
			if hole != data {
				return max(off, int64(s.LBA)*f.bs), nil
			}
			lba = s.LBA + uint64(s.Blocks)
		}
	}
	if data {
		return 0, io.EOF
	}
	return f.size, nil
}

// AllocatedSize sums the mapped blocks (the whole LUN when it is not thin).
func (f *File) AllocatedSize() (int64, error) {
	if !f.holes.Load() {
		return f.size, nil
	}
	var total int64
	for off := int64(0); off < f.size; {
		d, err := f.SeekData(off)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return 0, err
		}
		h, err := f.SeekHole(d)
		if err != nil {
			return 0, err
		}
		total += h - d
		off = h
	}
	return total, nil
}

var (
	_ driver.File           = (*File)(nil)
	_ driver.HoleSeeker     = (*File)(nil)
	_ driver.ZeroRanger     = (*File)(nil)
	_ driver.AllocatedSizer = (*File)(nil)
)
