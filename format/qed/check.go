package qed

import (
	"context"
	"encoding/binary"
	"fmt"
	"sync/atomic"

	"github.com/vdisk/vdisk/driver"
)

// Check walks the L1 table and every L2 table, as qemu's qed-check does:
// entries that are misaligned, inside the header or past the end of the
// file, and clusters referenced twice, are corruptions; clusters past the
// header that nothing references are leaks. RepairAll clears the bad and
// the second of duplicate entries; RepairLeaks and RepairAll pack the
// leaked clusters away. A repair that leaves no corruption clears the
// need-check flag.
func (im *image) Check(ctx context.Context, mode driver.RepairMode) (*driver.CheckResult, error) {
	if mode != driver.RepairNone && im.ro {
		return nil, driver.Errorf(driver.ErrReadOnly, im.name, -1, "cannot repair an image opened read-only")
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.check(ctx, mode)
}

// check does Check's work; the caller holds mu exclusively (or owns the
// image alone, during open).
func (im *image) check(ctx context.Context, mode driver.RepairMode) (*driver.CheckResult, error) {
	res := &driver.CheckResult{}
	fix := mode == driver.RepairAll
	im.meta.Lock()
	n := im.fileEnd / im.cs
	used := make([]uint64, (n+63)/64)
	test := func(c int64) bool { return used[c/64]&(1<<(c%64)) != 0 }
	set := func(c int64) { used[c/64] |= 1 << (c % 64) }
	for c := range min(int64(im.hdr.headerSize), n) {
		set(c)
	}
	l1c := int64(im.hdr.l1Offset) / im.cs
	for c := l1c; c < l1c+im.ts && c < n; c++ {
		set(c)
	}
	msg := func(format string, args ...any) {
		if len(res.Messages) < 100 {
			res.Messages = append(res.Messages, fmt.Sprintf(format, args...))
		}
	}
	var err error
	for i := range im.nelems {
		if err = ctx.Err(); err != nil {
			break
		}
		off := im.l1[i]
		if off == 0 {
			continue
		}
		bad := ""
		if !validTable(int64(im.hdr.headerSize), im.cs, im.ts, im.fileEnd, off) {
			bad = "misaligned, inside the header or past the end of the file"
		} else {
			for c := int64(off) / im.cs; c < int64(off)/im.cs+im.ts; c++ {
				if test(c) {
					bad = "overlapping other metadata or data"
					break
				}
			}
		}
		if bad != "" {
			res.Corruptions++
			msg("L1 entry %d: L2 table at %#x is %s", i, off, bad)
			if fix {
				if err = im.setL1Locked(i, 0); err != nil {
					break
				}
				res.CorruptionsFixed++
			}
			continue
		}
		for c := int64(off) / im.cs; c < int64(off)/im.cs+im.ts; c++ {
			set(c)
		}
		im.dropTableLocked(int64(off)) // read it fresh
		var t *l2Table
		if t, err = im.tableLocked(i); err != nil {
			res.CheckErrors++
			break
		}
		for j := range t.e {
			e := atomic.LoadUint64(&t.e[j])
			if kindOf(e) != kindData {
				continue
			}
			c := int64(e) / im.cs
			switch {
			case !im.validData(e, im.fileEnd):
				bad = "misaligned, inside the header or past the end of the file"
			case test(c):
				bad = "referenced twice"
			default:
				set(c)
				res.AllocatedClusters++
				continue
			}
			res.Corruptions++
			msg("L2 entry %d of table %d: cluster %#x is %s", j, i, e, bad)
			if fix {
				if err = im.setOneLocked(owner{i, int64(j)}, 0); err != nil {
					break
				}
				res.CorruptionsFixed++
			}
		}
		if err != nil {
			break
		}
	}
	if err != nil {
		im.meta.Unlock()
		return res, err
	}
	var leaks []int64
	for c := int64(im.hdr.headerSize); c < n; c++ {
		if !test(c) {
			leaks = append(leaks, c*im.cs)
		}
	}
	res.Leaks = len(leaks)
	if len(leaks) > 0 {
		msg("%d leaked clusters", len(leaks))
	}
	res.TotalClusters = (im.Size() + im.cs - 1) / im.cs
	res.ImageEndOffset = im.fileEnd
	remaining := res.Corruptions - res.CorruptionsFixed
	if mode != driver.RepairNone && len(leaks) > 0 && remaining == 0 {
		// Leaked clusters are referenced by nothing on disk: reusable now.
		im.holes = append(im.holes, leaks...)
		im.meta.Unlock()
		err = im.pack()
		im.meta.Lock()
		left := 0
		for _, h := range im.holes {
			if h < im.fileEnd {
				left++
			}
		}
		res.LeaksFixed = max(0, len(leaks)-left)
		res.ImageEndOffset = im.fileEnd
	}
	defer im.meta.Unlock()
	if err != nil {
		return res, err
	}
	if remaining > 0 && !im.ro {
		// Found damage left unrepaired: writes could spread it (a
		// cross-linked cluster written through one entry changes the
		// other), so they wait for a repair.
		im.broken = "check found invalid or cross-linked table entries"
	}
	if mode != driver.RepairNone && remaining == 0 {
		im.broken = ""
		if im.hdr.features&featNeedCheck != 0 {
			// Fixes reach the disk before the flag goes.
			if err := im.f.Sync(); err != nil {
				return res, driver.WithFile(err, "sync", im.name)
			}
			im.hdr.features &^= featNeedCheck
			if err := im.writeHeader(); err != nil {
				return res, err
			}
		}
	}
	if fix {
		res.Corruptions -= res.CorruptionsFixed
	}
	res.Leaks -= res.LeaksFixed
	return res, nil
}

// setL1Locked writes L1 entry i.
func (im *image) setL1Locked(i int64, v uint64) error {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	if _, err := im.f.WriteAt(b[:], int64(im.hdr.l1Offset)+8*i); err != nil {
		return driver.WithFile(err, "write L1 table", im.name)
	}
	atomic.StoreUint64(&im.l1[i], v)
	return nil
}
