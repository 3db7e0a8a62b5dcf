package parallels

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"

	"github.com/vdisk/vdisk/driver"
)

// scanResult is what a pass over a BAT found.
type scanResult struct {
	bat        []uint32 // the BAT with the entries that cannot be used cleared
	dataEnd    int64    // end of the highest usable cluster (>= the data offset)
	pastEOF    []int64  // clusters whose entry points at or past the end of the file
	unaligned  []int64  // entries before the data area or not on a cluster boundary
	dups       []int64  // clusters sharing their file cluster with an earlier one
	short      []int64  // clusters cut short by the end of the file
	allocated  int64
	fragmented int64
}

func (s *scanResult) problems() int {
	return len(s.pastEOF) + len(s.unaligned) + len(s.dups) + len(s.short)
}

// scan checks every BAT entry against the layout and the file size. It
// allocates in proportion to the BAT, which lies inside the file.
func (im *image) scan(raw []uint32, fileSize int64) *scanResult {
	l := im.l
	s := &scanResult{bat: make([]uint32, len(raw)), dataEnd: l.dataOff}
	seen := make(map[int64]bool)
	prev := int64(0)
	for i, e := range raw {
		if e == 0 {
			prev = 0
			continue
		}
		off := int64(e) * l.mult
		switch {
		case !l.onGrid(off):
			s.unaligned = append(s.unaligned, int64(i))
			continue
		case off >= fileSize:
			s.pastEOF = append(s.pastEOF, int64(i))
			continue
		}
		s.bat[i] = e
		s.allocated++
		if seen[off] {
			s.dups = append(s.dups, int64(i))
		}
		seen[off] = true
		if off+l.cs > fileSize {
			s.short = append(s.short, int64(i))
		}
		if prev != 0 && prev+l.cs != off {
			s.fragmented++
		}
		prev = off
		s.dataEnd = max(s.dataEnd, off+l.cs)
	}
	// A format extension cluster a reader keeps is in use too.
	if im.ro && im.hdr.extOff != 0 && im.hdr.extOff < math.MaxInt64/sectorSize {
		if eo := int64(im.hdr.extOff) * sectorSize; eo >= l.dataOff && eo < fileSize {
			s.dataEnd = max(s.dataEnd, eo+l.cs)
		}
	}
	return s
}

// Check reports (and with a repair mode fixes) what qemu's check does: an
// unclean close, BAT entries past the end of the file or off the cluster
// grid, clusters used twice, clusters cut short, and space leaked at the
// end of the file.
func (im *image) Check(ctx context.Context, mode driver.RepairMode) (*driver.CheckResult, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	fileSize, err := im.f.Size()
	if err != nil {
		return nil, driver.WithFile(err, "check", im.name)
	}
	raw, err := im.readBAT()
	if err != nil {
		return nil, err
	}
	var res *driver.CheckResult
	if mode != driver.RepairNone {
		if im.ro {
			return nil, driver.Errorf(driver.ErrReadOnly, im.name, -1, "cannot repair an image opened read-only")
		}
		if res, err = im.repair(ctx, mode, raw, fileSize); err != nil {
			return res, err
		}
	} else {
		res = im.report(im.scan(raw, fileSize), fileSize)
	}
	// A read-write open repairs the image before anyone can check it: say
	// what it fixed.
	if f := im.openFix; f != nil {
		im.openFix = nil
		res.CorruptionsFixed += f.CorruptionsFixed
		res.LeaksFixed += f.LeaksFixed
		for _, m := range f.Messages {
			res.Messages = append(res.Messages, "repaired on open: "+m)
		}
	}
	return res, nil
}

// readBAT reads the BAT as it is in the file.
func (im *image) readBAT() ([]uint32, error) {
	b := make([]byte, 4*len(im.bat))
	if err := driver.ReadFullAt(im.f, b, headerSize); err != nil {
		return nil, driver.WithFile(err, "read BAT", im.name)
	}
	raw := make([]uint32, len(im.bat))
	for i := range raw {
		raw[i] = binary.LittleEndian.Uint32(b[4*i:])
	}
	return raw, nil
}

// report turns a scan into a check result. While we have the image open
// for writing, the space past the data is our preallocation, not a leak.
func (im *image) report(s *scanResult, fileSize int64) *driver.CheckResult {
	res := &driver.CheckResult{
		TotalClusters:      int64(len(s.bat)),
		AllocatedClusters:  s.allocated,
		FragmentedClusters: s.fragmented,
		ImageEndOffset:     s.dataEnd,
	}
	add := func(list []int64, what string) {
		for _, c := range list {
			res.Corruptions++
			res.Messages = append(res.Messages, fmt.Sprintf("cluster %d: %s", c, what))
		}
	}
	if im.dirty {
		res.Corruptions++
		res.Messages = append(res.Messages, "image was not closed cleanly (inuse flag set)")
	}
	add(s.pastEOF, "BAT entry points past the end of the file")
	add(s.unaligned, "BAT entry is outside the data area or not cluster aligned")
	add(s.dups, "BAT entry points at a cluster another entry uses")
	add(s.short, "cluster is cut short by the end of the file")
	if im.ro && fileSize > s.dataEnd {
		res.Leaks = int((fileSize - s.dataEnd + im.l.cs - 1) / im.l.cs)
		res.Messages = append(res.Messages, fmt.Sprintf("%d bytes leaked at the end of the file", fileSize-s.dataEnd))
	}
	return res
}

// repair fixes what scan finds: unusable entries are cleared, clusters cut
// short are completed with zeros, clusters used twice get a copy of their
// own, the file is cut at the end of the data and the inuse flag is
// dropped. The caller holds mu exclusively (or has the image to itself).
func (im *image) repair(ctx context.Context, mode driver.RepairMode, raw []uint32, fileSize int64) (*driver.CheckResult, error) {
	s := im.scan(raw, fileSize)
	res := im.report(s, fileSize)
	if !im.ro && fileSize > s.dataEnd {
		// The tail past the data is leaked (or our own preallocation).
		res.Leaks = int((fileSize - s.dataEnd + im.l.cs - 1) / im.l.cs)
	}
	if mode == driver.RepairLeaks {
		if err := im.cutTail(s.dataEnd, fileSize); err != nil {
			res.CheckErrors++
			return res, err
		}
		res.LeaksFixed = res.Leaks
		return res, nil
	}
	fixed := 0
	if len(s.short) > 0 {
		if err := im.f.Truncate(s.dataEnd); err != nil {
			res.CheckErrors++
			return res, driver.WithFile(err, "repair", im.name)
		}
		fileSize = max(fileSize, s.dataEnd)
	}
	fixed += len(s.pastEOF) + len(s.unaligned) + len(s.short)
	// Clusters used twice get a copy at the end of the data.
	end := s.dataEnd
	for _, c := range s.dups {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		if im.l.alignUp(end)/im.l.mult > math.MaxUint32 {
			res.CheckErrors++
			return res, driver.Errorf(driver.ErrUnsupported, im.name, -1, "no room to copy cluster %d", c)
		}
		pos := im.l.alignUp(end)
		if err := im.copyCluster(im.off(s.bat[c]), pos); err != nil {
			res.CheckErrors++
			return res, err
		}
		s.bat[c] = uint32(pos / im.l.mult)
		end = pos + im.l.cs
		fixed++
	}
	fileSize = max(fileSize, end)
	if len(s.dups) > 0 {
		if err := im.f.Sync(); err != nil { // the copies before the entries
			res.CheckErrors++
			return res, driver.WithFile(err, "repair", im.name)
		}
	}
	if fixed > 0 {
		b := make([]byte, 4*len(s.bat))
		for i, e := range s.bat {
			binary.LittleEndian.PutUint32(b[4*i:], e)
		}
		if _, err := im.f.WriteAt(b, headerSize); err != nil {
			res.CheckErrors++
			return res, driver.WithFile(err, "repair", im.name)
		}
	}
	im.meta.Lock()
	im.bat = s.bat
	im.dataEnd = end
	im.fileLen = fileSize
	im.meta.Unlock()
	if im.dirty {
		fixed++
		im.dirty = false
	}
	res.CorruptionsFixed = fixed
	if err := im.cutTail(end, fileSize); err != nil {
		res.CheckErrors++
		return res, err
	}
	res.LeaksFixed = res.Leaks
	if err := im.f.Sync(); err != nil {
		res.CheckErrors++
		return res, driver.WithFile(err, "repair", im.name)
	}
	return res, nil
}

// cutTail truncates the file at end (the data's end) and rebuilds the
// free list.
func (im *image) cutTail(end, fileSize int64) error {
	im.meta.Lock()
	defer im.meta.Unlock()
	im.dataEnd = max(end, im.l.dataOff)
	if fileSize > im.dataEnd {
		if err := im.f.Truncate(im.dataEnd); err != nil {
			return driver.WithFile(err, "truncate", im.name)
		}
	}
	im.fileLen = min(fileSize, im.dataEnd)
	if fileSize < im.dataEnd {
		im.fileLen = fileSize
	}
	return im.collectFreeLocked()
}
