package qed

import (
	"slices"
	"sync/atomic"

	"github.com/vdisk/vdisk/driver"
)

// WriteZeroes zeroes [off, off+n). Whole clusters become zero clusters
// where they would otherwise not read zeros by themselves (allocated, or
// unallocated over a backing file); with unmap allocated clusters are
// given back, without it they are zeroed in place. Partial clusters are
// written with zeros (asking for a fill where WriteAt would).
func (im *image) WriteZeroes(off, n int64, unmap bool) error {
	if err := im.writable(off); err != nil {
		return err
	}
	im.mu.RLock()
	defer im.mu.RUnlock()
	if err := driver.CheckRange(im.name, off, n, im.Size()); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	end := off + n
	diff := im.hasBacking()
	if err := im.needFill(off, end, diff); err != nil {
		return err
	}
	// Whole clusters: [lo, hi); the last cluster of the disk counts as
	// whole when the range reaches the end of the disk.
	lo := (off + im.cs - 1) &^ (im.cs - 1)
	hi := end &^ (im.cs - 1)
	if end == im.Size() {
		hi = end
	}
	if lo >= hi {
		return im.write(driver.Zeros(n), off, diff)
	}
	if off < lo {
		if err := im.write(driver.Zeros(lo-off), off, diff); err != nil {
			return err
		}
	}
	if hi < end {
		if err := im.write(driver.Zeros(end-hi), hi, diff); err != nil {
			return err
		}
	}
	return im.zeroClusters(lo>>im.shift, (hi+im.cs-1)>>im.shift, unmap, diff)
}

// zeroClusters makes clusters [c, stop) read zeros.
func (im *image) zeroClusters(c, stop int64, unmap, diff bool) error {
	for c < stop {
		e, span, err := im.entryAt(c)
		if err != nil {
			return err
		}
		switch {
		case kindOf(e) == kindZero || (e == 0 && !diff):
			c += min(span, stop-c)
		case kindOf(e) == kindData && !unmap:
			k := int64(1)
			for c+k < stop {
				ne, _, err := im.entryAt(c + k)
				if err != nil || int64(ne) != int64(e)+k*im.cs {
					break
				}
				k++
			}
			if err := driver.WriteZeros(im.f, int64(e), k*im.cs); err != nil {
				return driver.WithFile(err, "write", im.name)
			}
			c += k
		default:
			// A run of clusters in one table to turn into zero clusters.
			k := int64(1)
			for c+k < stop && (c+k)%im.nelems != 0 {
				ne, _, err := im.entryAt(c + k)
				if err != nil || kindOf(ne) == kindZero || (ne == 0 && !diff) || (kindOf(ne) == kindData && !unmap) {
					break
				}
				k++
			}
			if err := im.setRun(c, k, zeroEntry); err != nil {
				return err
			}
			c += k
		}
	}
	return nil
}

// Discard makes every whole cluster inside [off, off+n) unallocated
// (zeros in a base image, the backing file's content otherwise); partial
// clusters are left alone. Freed data clusters are packed away on Flush.
func (im *image) Discard(off, n int64) error {
	if err := im.writable(off); err != nil {
		return err
	}
	im.mu.RLock()
	defer im.mu.RUnlock()
	if err := driver.CheckRange(im.name, off, n, im.Size()); err != nil {
		return err
	}
	end := off + n
	lo := (off + im.cs - 1) &^ (im.cs - 1)
	hi := end &^ (im.cs - 1)
	if end == im.Size() {
		hi = end
	}
	for c, stop := lo>>im.shift, (hi+im.cs-1)>>im.shift; c < stop; {
		e, span, err := im.entryAt(c)
		if err != nil {
			return err
		}
		if e == 0 {
			c += min(span, stop-c)
			continue
		}
		k := int64(1)
		for c+k < stop && (c+k)%im.nelems != 0 {
			if ne, _, err := im.entryAt(c + k); err != nil || ne == 0 {
				break
			}
			k++
		}
		if err := im.setRun(c, k, 0); err != nil {
			return err
		}
		c += k
	}
	return nil
}

// owner locates the L2 entry pointing at a data cluster.
type owner struct{ l1i, j int64 }

// layout maps the clusters pack may move to what points at them.
type layout struct {
	data   map[int64]owner // data cluster -> its entry
	tables map[int64]int64 // L2 table offset -> its L1 index
}

// pack moves the last clusters of the file into the reusable holes and
// truncates the file, so that no cluster is left unreferenced (qemu's
// check counts those as leaks). Each round copies, syncs, repoints the
// entries and syncs again, so a crash leaves at worst leaked copies. An
// L2 table at the end of the file moves into the lowest run of table_size
// holes below it; without such a run, the data clusters below it move
// down first so that the holes gather under it. At most table_size-1
// holes can be left that way (and the L1 table never moves). The caller
// holds mu exclusively.
func (im *image) pack() error {
	im.meta.Lock()
	defer im.meta.Unlock()
	if len(im.holes) == 0 {
		return nil
	}
	origEnd := im.fileEnd
	var buf []byte
	var lay *layout
	type move struct {
		src, dst int64
		o        owner
	}
	for {
		slices.Sort(im.holes)
		im.holes = slices.Compact(im.holes)
		for len(im.holes) > 0 && im.holes[len(im.holes)-1] == im.fileEnd-im.cs {
			im.holes = im.holes[:len(im.holes)-1]
			im.fileEnd -= im.cs
		}
		if len(im.holes) == 0 {
			break
		}
		if lay == nil {
			var ok bool
			if lay, ok = im.layoutLocked(); !ok {
				break
			}
		}
		isHole := make(map[int64]bool, len(im.holes))
		for _, h := range im.holes {
			isHole[h] = true
		}
		var moves []move
		hi := 0
		tableMoved := false
		stuck, stuckAt := int64(-1), int64(0)
		for pos := im.fileEnd - im.cs; hi < len(im.holes) && pos > im.holes[hi] && len(moves) < 256; pos -= im.cs {
			if isHole[pos] {
				continue
			}
			if o, ok := lay.data[pos]; ok {
				moves = append(moves, move{pos, im.holes[hi], o})
				hi++
				continue
			}
			tab := pos - (im.ts-1)*im.cs
			l1i, ok := lay.tables[tab]
			if !ok {
				break // the L1 table or the header: nothing moves past it
			}
			if len(moves) > 0 {
				break // shrink the file first
			}
			if run := holeRun(im.holes, im.ts, im.cs, tab); run >= 0 {
				if err := im.moveTableLocked(l1i, tab, run, lay); err != nil {
					return err
				}
				tableMoved = true
				break
			}
			// Gather the holes under the table: move the data below it.
			pos = tab
			stuck = l1i
			stuckAt = tab
		}
		if tableMoved {
			continue
		}
		if len(moves) == 0 {
			// Fewer than table_size holes, all right under an L2 table at
			// the end: move the table to the end of the file first, so
			// that its old place joins the holes into a run it fits.
			h := int64(len(im.holes))
			if stuck < 0 || h >= im.ts || im.holes[0] != stuckAt-h*im.cs || im.holes[h-1] != stuckAt-im.cs {
				break
			}
			dst, err := im.allocLocked(im.ts, true)
			if err != nil {
				return err
			}
			if err := im.moveTableLocked(stuck, stuckAt, dst, lay); err != nil {
				return err
			}
			continue
		}
		if buf == nil {
			buf = make([]byte, im.cs)
		}
		for _, m := range moves {
			if err := driver.ReadFullAt(im.f, buf, m.src); err != nil {
				return driver.WithFile(err, "read", im.name)
			}
			if _, err := im.f.WriteAt(buf, m.dst); err != nil {
				return driver.WithFile(err, "write", im.name)
			}
		}
		if err := im.f.Sync(); err != nil {
			return driver.WithFile(err, "sync", im.name)
		}
		for _, m := range moves {
			if err := im.setOneLocked(m.o, uint64(m.dst)); err != nil {
				return err
			}
			delete(lay.data, m.src)
			lay.data[m.dst] = m.o
		}
		if err := im.f.Sync(); err != nil {
			return driver.WithFile(err, "sync", im.name)
		}
		im.holes = im.holes[len(moves):]
		for _, m := range moves {
			im.holes = append(im.holes, m.src)
		}
	}
	if im.fileEnd < origEnd {
		if err := im.f.Truncate(im.fileEnd); err != nil {
			return driver.WithFile(err, "truncate", im.name)
		}
	}
	return nil
}

// holeRun returns the lowest offset of n contiguous holes (sorted) ending
// at or below limit, or -1.
func holeRun(holes []int64, n, cs, limit int64) int64 {
	for i := 0; i+int(n) <= len(holes); i++ {
		start := holes[i]
		if start+n*cs > limit {
			break
		}
		if holes[i+int(n)-1] == start+(n-1)*cs {
			return start
		}
	}
	return -1
}

// moveTableLocked moves the L2 table of L1 index l1i from src to the holes
// at dst: copy, sync, repoint the L1 entry, sync.
func (im *image) moveTableLocked(l1i, src, dst int64, lay *layout) error {
	buf := make([]byte, im.tableBytes)
	if err := driver.ReadFullAt(im.f, buf, src); err != nil {
		return driver.WithFile(err, "read L2 table", im.name)
	}
	if _, err := im.f.WriteAt(buf, dst); err != nil {
		return driver.WithFile(err, "write L2 table", im.name)
	}
	if err := im.f.Sync(); err != nil {
		return driver.WithFile(err, "sync", im.name)
	}
	if err := im.setL1Locked(l1i, uint64(dst)); err != nil {
		return err
	}
	if err := im.f.Sync(); err != nil {
		return driver.WithFile(err, "sync", im.name)
	}
	if t := im.l2[src]; t != nil {
		delete(im.l2, src)
		im.l2[dst] = t
	}
	delete(lay.tables, src)
	lay.tables[dst] = l1i
	out := im.holes[:0]
	for _, h := range im.holes {
		if h < dst || h >= dst+im.tableBytes {
			out = append(out, h)
		}
	}
	im.holes = out
	for k := range im.ts {
		im.holes = append(im.holes, src+k*im.cs)
	}
	return nil
}

// layoutLocked maps every data cluster and L2 table; ok is false when an
// entry cannot be trusted (a table fails to load, or a cluster is
// referenced twice), and nothing may move.
func (im *image) layoutLocked() (*layout, bool) {
	lay := &layout{data: map[int64]owner{}, tables: map[int64]int64{}}
	for i := range im.nelems {
		t, err := im.tableLocked(i)
		if err != nil {
			return nil, false
		}
		if t == nil {
			continue
		}
		off := int64(im.l1[i])
		if _, dup := lay.tables[off]; dup {
			return nil, false
		}
		lay.tables[off] = i
		for j := range t.e {
			e := atomic.LoadUint64(&t.e[j])
			if kindOf(e) != kindData {
				continue
			}
			if !im.validData(e, im.fileEnd) {
				return nil, false
			}
			if _, dup := lay.data[int64(e)]; dup {
				return nil, false
			}
			lay.data[int64(e)] = owner{i, int64(j)}
		}
	}
	return lay, true
}

// setOneLocked writes one L2 entry (its table exists).
func (im *image) setOneLocked(o owner, v uint64) error {
	t, err := im.tableLocked(o.l1i)
	if err != nil {
		return err
	}
	if t == nil {
		return driver.Corruptf(im.name, -1, "internal error: L2 table %d vanished", o.l1i)
	}
	if _, err := im.f.WriteAt(encodeEntries([]uint64{v}), int64(im.l1[o.l1i])+8*o.j); err != nil {
		return driver.WithFile(err, "write L2 table", im.name)
	}
	atomic.StoreUint64(&t.e[o.j], v)
	return nil
}
