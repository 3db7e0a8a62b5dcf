package qcow2

import (
	mbits "math/bits"

	"github.com/vdisk/vdisk/driver"
)

// Flush makes every completed write durable.
//
// Metadata is written back in an order that keeps the image consistent
// after a crash at any point, with syncs between dependent steps:
//
//  1. guest data (sync of the data file);
//  2. refcount blocks, each as the maximum of its old and new counts, so
//     that new references are counted before any L2 entry uses them and
//     dropped references are still counted (sync); then the refcount table
//     and the header if the table moved (sync each);
//  3. L2 tables (sync);
//  4. the L1 table and the header if it changed (sync);
//  5. refcount blocks with their final counts, releasing dropped references
//     (sync).
//
// A crash can therefore only leak clusters. With lazy refcounts steps 2 and
// 5 are skipped; the dirty bit is set (and synced) before the first L2 or
// L1 write that refcounts do not cover, and the refcounts are written and
// the bit cleared on close.
func (im *image) Flush() error {
	if im.ro {
		return nil
	}
	im.drainCompressor()
	im.opMu.RLock()
	defer im.opMu.RUnlock()
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.closed {
		return driver.Errorf(errClosed, im.name, -1, "image is closed")
	}
	if err := im.cwErrLocked(); err != nil {
		return err
	}
	if im.corrupt {
		return nil
	}
	return im.flushLocked(false)
}

// flushLocked writes back all dirty metadata. final also writes lazy
// refcounts and clears the dirty bit (close). Callers hold mu.
func (im *image) flushLocked(final bool) error {
	if im.dataDirty.Swap(false) {
		if err := im.syncFile(im.df); err != nil {
			im.dataDirty.Store(true)
			return err
		}
	}
	l2d := im.l2c.dirtyTables()
	rbd := im.rbc.dirtyTables()
	l1d := len(im.l1Dirty) > 0
	writeRefs := !im.lazy || final
	_, l1Stale := im.headerStale()
	if im.lazy && !final && !im.hdrDirty && (len(rbd) > 0 || im.rtDirty) && (len(l2d) > 0 || l1d || l1Stale) {
		im.hdr.incompat |= incompatDirty
		if err := im.writeHeaderSync(false, false); err != nil {
			return err
		}
		im.hdrDirty = true
	}
	if writeRefs && len(rbd) > 0 {
		for _, t := range rbd {
			data := t.buf
			if t.orig != nil {
				data = im.maxRefs(t.orig, t.buf)
			}
			if _, err := im.f.WriteAt(data, t.off); err != nil {
				return err
			}
		}
		if err := im.syncFile(im.f); err != nil {
			return err
		}
	}
	if im.rtDirty {
		if err := im.writeRefTable(); err != nil {
			return err
		}
		if err := im.syncFile(im.f); err != nil {
			return err
		}
		im.rtDirty = false
		if rtStale, _ := im.headerStale(); rtStale {
			if err := im.writeHeaderSync(true, false); err != nil {
				return err
			}
		}
	}
	if len(l2d) > 0 {
		for _, t := range l2d {
			if _, err := im.f.WriteAt(t.buf, t.off); err != nil {
				return err
			}
		}
		if err := im.syncFile(im.f); err != nil {
			return err
		}
		for _, t := range l2d {
			t.dirty = false
		}
	}
	if l1d {
		if err := im.writeL1(); err != nil {
			return err
		}
		if err := im.syncFile(im.f); err != nil {
			return err
		}
	}
	if rtStale, l1Stale := im.headerStale(); rtStale || l1Stale {
		if err := im.writeHeaderSync(true, true); err != nil {
			return err
		}
	}
	if writeRefs && len(rbd) > 0 {
		wrote := false
		for _, t := range rbd {
			if t.orig != nil {
				if _, err := im.f.WriteAt(t.buf, t.off); err != nil {
					return err
				}
				t.orig = nil
				wrote = true
			}
		}
		if wrote {
			if err := im.syncFile(im.f); err != nil {
				return err
			}
		}
		for _, t := range rbd {
			t.dirty = false
		}
	}
	im.releasePending()
	if final && im.hdrDirty {
		im.hdr.incompat &^= incompatDirty
		if err := im.writeHeaderSync(true, true); err != nil {
			return err
		}
		im.hdrDirty = false
	}
	return nil
}

// maxRefs returns a block holding, for every entry, the larger of a and b.
func (im *image) maxRefs(a, b []byte) []byte {
	out := append([]byte(nil), b...)
	for i := int64(0); i < im.rbn; i++ {
		if x := im.getRef(a, i); x > im.getRef(out, i) {
			im.setRefRaw(out, i, x)
		}
	}
	return out
}

// writeRefTable writes the whole refcount table at its header offset.
func (im *image) writeRefTable() error {
	buf := make([]byte, int64(im.hdr.refTableClust)*im.cs)
	for i, e := range im.rt {
		if int64(i*8) >= int64(len(buf)) {
			break
		}
		put64(buf[i*8:], e)
	}
	_, err := im.f.WriteAt(buf, int64(im.hdr.refTableOffset))
	return err
}

// writeL1 writes the dirty clusters of the active L1 table.
func (im *image) writeL1() error {
	n := int64(len(im.l1))
	per := im.cs / 8
	for k := range im.l1Dirty {
		lo := k * per
		if lo >= n {
			continue
		}
		hi := min(lo+per, n)
		buf := make([]byte, (hi-lo)*8)
		for i := lo; i < hi; i++ {
			put64(buf[(i-lo)*8:], im.l1[i])
		}
		if _, err := im.f.WriteAt(buf, int64(im.hdr.l1Offset)+lo*8); err != nil {
			return err
		}
	}
	clear(im.l1Dirty)
	return nil
}

// releasePending makes the clusters freed before this flush allocatable
// again and punches holes where they were.
func (im *image) releasePending() {
	if im.pendN == 0 {
		return
	}
	var runs []span
	im.rbc.each(func(t *table) {
		if t.pend == nil {
			return
		}
		base := t.idx << im.rbBits
		for w, bits := range t.pend {
			for bits != 0 {
				b := int64(mbits.TrailingZeros64(bits))
				bits &^= 1 << b
				i := int64(w)*64 + b
				if im.getRef(t.buf, i) != 0 {
					continue
				}
				c := base + i
				if n := len(runs); n > 0 && runs[n-1].hi == c {
					runs[n-1].hi++
				} else {
					runs = append(runs, span{c, c + 1})
				}
				if c < im.freeHint {
					im.freeHint = c
				}
			}
		}
		t.pend = nil
	})
	im.pendN = 0
	for _, r := range runs {
		off, n := r.lo<<im.cbits, (r.hi-r.lo)<<im.cbits
		if off >= im.fileEnd {
			continue
		}
		n = min(n, im.fileEnd-off)
		// Best effort: the clusters are free whether or not the hole is
		// punched.
		_ = im.f.PunchHole(off, n)
	}
}

// shrinkCaches brings the caches back within their capacity at a safe
// point, writing back metadata when only dirty entries are left. Callers
// hold mu.
func (im *image) shrinkCaches() {
	if !im.l2c.over() && !im.rbc.over() {
		return
	}
	cleanL2 := func(t *table) bool { return !t.dirty }
	cleanRB := func(t *table) bool { return !t.dirty && t.pend == nil && t.orig == nil }
	okL2 := im.l2c.evictClean(cleanL2)
	okRB := im.rbc.evictClean(cleanRB)
	if okL2 && okRB {
		return
	}
	// Only dirty entries left: write everything back. Errors surface at
	// the next explicit flush, which retries.
	if err := im.flushLocked(false); err != nil {
		im.log.Warn("write-back of metadata caches failed", "error", err)
		return
	}
	if im.lazy && im.rbc.over() {
		for _, t := range im.rbc.dirtyTables() {
			if t.pend != nil {
				continue
			}
			if _, err := im.f.WriteAt(t.buf, t.off); err != nil {
				im.log.Warn("write-back of refcount blocks failed", "error", err)
				return
			}
			t.dirty = false
		}
	}
	im.l2c.evictClean(cleanL2)
	im.rbc.evictClean(cleanRB)
}

// syncFile syncs f, unless the image is being closed without syncing
// (see Close).
func (im *image) syncFile(f interface{ Sync() error }) error {
	if im.noSync {
		return nil
	}
	return f.Sync()
}
