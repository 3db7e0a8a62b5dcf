package vhdx

import (
	"context"
	"sort"

	"github.com/vdisk/vdisk/driver"
)

// Compact moves blocks and sector bitmaps down into the free space that
// discards, shrinks and moved BATs left, then cuts the file where its
// used space ends. Each pass copies blocks into free space below them
// (nothing committed points there), then commits their new BAT entries
// through the log (data synced first), and only then frees the old
// places: a crash leaves the old layout or the new, both reading the
// same. Passes repeat while a block can move down; then a BAT that a
// grow moved to the end comes down the same way (written into free space,
// switched by one log entry).
func (im *image) Compact(ctx context.Context, progress driver.Progress) error {
	if im.ro {
		return im.readOnlyErr(-1)
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if len(im.bad) > 0 {
		return im.corrupt(im.batOff, "the BAT has %d unusable entries; repair the image (check -r all) before compacting it", len(im.bad))
	}
	if err := im.commitLocked(); err != nil {
		return err
	}
	// Entries that read as unallocated but keep a file offset give
	// their space up.
	for b := int64(0); b < im.nBlocks; b++ {
		i := im.payloadIndex(b)
		if st := im.bat[i] & 7; (st == stNotPresent || st == stUndefined || st == stUnmapped) && im.bat[i]>>20 != 0 {
			if err := im.startSessionLocked(); err != nil {
				return err
			}
			im.freeEntryLocked(i)
			im.setEntryLocked(i, st, 0)
		}
	}
	if err := im.commitLocked(); err != nil {
		return err
	}
	var buf []byte
	moved, total := int64(0), int64(0)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		type ext struct{ i, off, size int64 }
		var exts []ext
		for i, e := range im.bat {
			if off := int64(e >> 20 << 20); off != 0 {
				size := im.p.blockSize
				if im.isBitmapIndex(int64(i)) {
					size = mib
				}
				exts = append(exts, ext{int64(i), off, size})
			}
		}
		sort.Slice(exts, func(a, b int) bool { return exts[a].off > exts[b].off })
		if total == 0 {
			total = int64(len(exts))
		}
		n := 0
		for _, x := range exts {
			// The destination reads zeros: only the source's data
			// ranges are copied.
			dst, err := im.takeFreeLocked(x.size, x.off, true)
			if err != nil {
				return err
			}
			if dst < 0 {
				continue
			}
			if err := ctx.Err(); err != nil {
				return err
			}
			if err := im.startSessionLocked(); err != nil {
				return err
			}
			if buf == nil {
				buf = make([]byte, min(im.p.blockSize, 4*mib))
			}
			if err := im.copySpace(buf, x.off, dst, x.size); err != nil {
				return err
			}
			im.punch = append(im.punch, span{x.off, x.off + x.size})
			im.setEntryLocked(x.i, im.bat[x.i]&7, dst)
			n++
			moved++
			if progress != nil {
				progress(min(moved, total), total)
			}
		}
		if n == 0 {
			break
		}
		if err := im.commitLocked(); err != nil {
			return err
		}
	}
	// A BAT moved by a grow sits at the end of the file: bring it down
	// into free space too, so the file can be cut.
	n := roundUp(int64(len(im.bat))*8, mib)
	for _, fs := range im.free {
		if fs.off+n <= im.batOff && fs.end-fs.off >= n {
			if err := im.startSessionLocked(); err != nil {
				return err
			}
			if err := im.moveBATLocked(); err != nil {
				return err
			}
			if err := im.commitLocked(); err != nil {
				return err
			}
			break
		}
	}
	if err := im.trimTailLocked(); err != nil {
		return err
	}
	if progress != nil {
		progress(total, total)
	}
	return nil
}

// copySpace copies n bytes from src to dst (which reads zeros), skipping
// the holes the file reports: a sparse block costs only its data.
func (im *image) copySpace(buf []byte, src, dst, n int64) error {
	hs, _ := im.f.(driver.HoleSeeker)
	for pos := int64(0); pos < n; {
		end := n
		if hs != nil {
			if d, err := hs.SeekData(src + pos); err == nil {
				if d >= src+n {
					return nil // holes to the end
				}
				pos = max(pos, d-src)
				if h, err := hs.SeekHole(src + pos); err == nil && h < src+n {
					end = h - src
				}
			}
			// On an error (no data past the end of the file, or no
			// support) the rest is copied as it reads.
		}
		for pos < end {
			c := min(int64(len(buf)), end-pos)
			if err := readData(im.f, buf[:c], src+pos); err != nil {
				return driver.WithFile(err, "compact", im.name)
			}
			if _, err := im.f.WriteAt(buf[:c], dst+pos); err != nil {
				return err
			}
			pos += c
		}
	}
	return nil
}
