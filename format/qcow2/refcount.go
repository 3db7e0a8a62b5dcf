package qcow2

import (
	"encoding/binary"

	"github.com/vdisk/vdisk/driver"
)

// Refcount handling. Every function here is called with im.mu held.
//
// Refcount blocks are cached and written back at flush (see flush.go for
// the ordering). Freed clusters are marked "pending" in their block and are
// not handed out again until a flush has made the metadata that dropped
// their last reference durable, so a crash can never leave an old L2 entry
// pointing at a cluster that was reused for other data.

// getRef reads entry i of a refcount block.
func (im *image) getRef(b []byte, i int64) uint64 {
	switch im.rorder {
	case 0, 1, 2:
		bits := int64(1) << im.rorder
		pos := i * bits
		return uint64(b[pos>>3]>>(pos&7)) & (1<<bits - 1)
	case 3:
		return uint64(b[i])
	case 4:
		return uint64(binary.BigEndian.Uint16(b[i*2:]))
	case 5:
		return uint64(binary.BigEndian.Uint32(b[i*4:]))
	default:
		return binary.BigEndian.Uint64(b[i*8:])
	}
}

// setRefRaw writes entry i of a refcount block.
func (im *image) setRefRaw(b []byte, i int64, v uint64) {
	switch im.rorder {
	case 0, 1, 2:
		bits := int64(1) << im.rorder
		pos := i * bits
		mask := byte(1<<bits-1) << (pos & 7)
		b[pos>>3] = b[pos>>3]&^mask | byte(v<<(pos&7))&mask
	case 3:
		b[i] = byte(v)
	case 4:
		binary.BigEndian.PutUint16(b[i*2:], uint16(v))
	case 5:
		binary.BigEndian.PutUint32(b[i*4:], uint32(v))
	default:
		binary.BigEndian.PutUint64(b[i*8:], v)
	}
}

// loadRB returns the refcount block for table index ti at host offset off.
func (im *image) loadRB(ti, off int64) (*table, error) {
	if t := im.rbc.get(off); t != nil {
		return t, nil
	}
	if off%im.cs != 0 || off <= 0 || off > im.fileEnd-im.cs {
		return nil, driver.Corruptf(im.name, off, "refcount block at %#x is misaligned or past the end of the file", off)
	}
	buf := make([]byte, im.cs)
	if err := driver.ReadFullAt(im.f, buf, off); err != nil {
		return nil, driver.Errorf(err, im.name, off, "cannot read refcount block")
	}
	t := &table{off: off, idx: ti, buf: buf}
	im.rbc.add(t)
	return t, nil
}

// rbFor returns the refcount block covering cluster c, or nil when none is
// allocated (all its refcounts are zero).
func (im *image) rbFor(c int64) (*table, error) {
	ti := c >> im.rbBits
	if ti >= int64(len(im.rt)) {
		return nil, nil
	}
	e := im.rt[ti]
	if e&0x1ff != 0 {
		return nil, driver.Corruptf(im.name, int64(im.hdr.refTableOffset)+ti*8, "refcount table entry %d has reserved bits set (%#x)", ti, e)
	}
	if e == 0 {
		return nil, nil
	}
	return im.loadRB(ti, int64(e))
}

// refcount returns the refcount of cluster c.
func (im *image) refcount(c int64) (uint64, error) {
	t, err := im.rbFor(c)
	if t == nil || err != nil {
		return 0, err
	}
	return im.getRef(t.buf, c&(im.rbn-1)), nil
}

// isFree reports whether cluster c may be allocated.
func (im *image) isFree(c int64) (bool, error) {
	if im.isMeta(c) {
		return false, nil
	}
	if c >= (im.fileEnd+im.cs-1)>>im.cbits {
		// Past the end of the file nothing is in use; a refcount there is
		// a leak (or garbage), which claiming the cluster overwrites.
		// This also bounds the scan on images with hostile refcounts.
		t, err := im.rbFor(c)
		if err != nil || t == nil {
			return err == nil, err
		}
		i := c & (im.rbn - 1)
		return t.pend == nil || t.pend[i>>6]&(1<<(i&63)) == 0, nil
	}
	t, err := im.rbFor(c)
	if t == nil || err != nil {
		return err == nil, err
	}
	i := c & (im.rbn - 1)
	if im.getRef(t.buf, i) != 0 {
		return false, nil
	}
	if t.pend != nil && t.pend[i>>6]&(1<<(i&63)) != 0 {
		return false, nil
	}
	return true, nil
}

// setRefcount sets the refcount of cluster c to v, allocating the refcount
// block (and growing the refcount table) when needed. avoid is the first
// cluster index a new refcount block may be placed at (clusters below it
// may be in the middle of being allocated).
func (im *image) setRefcount(c int64, v uint64, avoid int64) error {
	if v > im.refMax {
		return driver.Errorf(driver.ErrUnsupported, im.name, c<<im.cbits, "refcount of cluster %d would exceed the maximum of %d (refcount_bits too small)", c, im.refMax)
	}
	t, err := im.rbFor(c)
	if err != nil {
		return err
	}
	if t == nil {
		if v == 0 {
			return nil
		}
		if t, err = im.newRefBlock(c>>im.rbBits, max(avoid, c+1)); err != nil {
			return err
		}
	}
	i := c & (im.rbn - 1)
	old := im.getRef(t.buf, i)
	if old == v {
		return nil
	}
	if v < old && !im.lazy && t.orig == nil {
		t.orig = append([]byte(nil), t.buf...)
	}
	im.setRefRaw(t.buf, i, v)
	t.dirty = true
	if v == 0 {
		if t.pend == nil {
			t.pend = make([]uint64, (im.rbn+63)/64)
			im.pendN++
		}
		t.pend[i>>6] |= 1 << (i & 63)
	}
	return nil
}

// addRef changes the refcount of cluster c by delta.
func (im *image) addRef(c int64, delta int64, avoid int64) error {
	old, err := im.refcount(c)
	if err != nil {
		return err
	}
	if delta < 0 && old < uint64(-delta) {
		return im.markCorrupt(c<<im.cbits, "refcount of cluster %d would drop below zero (it is %d)", c, old)
	}
	nv := old + uint64(delta)
	if delta > 0 && (nv < old || nv > im.refMax) {
		return driver.Errorf(driver.ErrUnsupported, im.name, c<<im.cbits, "refcount of cluster %d would exceed the maximum of %d", c, im.refMax)
	}
	return im.setRefcount(c, nv, avoid)
}

// freeClusters drops one reference from each of n clusters starting at c.
func (im *image) freeClusters(c, n int64) error {
	for i := int64(0); i < n; i++ {
		if err := im.addRef(c+i, -1, 0); err != nil {
			return err
		}
	}
	return nil
}

// newRefBlock allocates the refcount block for refcount table index ti.
func (im *image) newRefBlock(ti, avoid int64) (*table, error) {
	if ti >= int64(len(im.rt)) {
		if err := im.growRefTable(ti, avoid); err != nil {
			return nil, err
		}
		return im.loadRB(ti, int64(im.rt[ti]))
	}
	x, err := im.findContig(max(avoid, im.freeHint), 1)
	if err != nil {
		return nil, err
	}
	off := x << im.cbits
	t := &table{off: off, idx: ti, buf: make([]byte, im.cs), dirty: true}
	im.rbc.add(t)
	im.rt[ti] = uint64(off)
	im.rtDirty = true
	im.metaSet[x] = metaRB
	im.grow((x + 1) << im.cbits)
	if x>>im.rbBits == ti {
		im.setRefRaw(t.buf, x&(im.rbn-1), 1)
		return t, nil
	}
	if err := im.addRef(x, 1, x+1); err != nil {
		return nil, err
	}
	// The recursion may have evicted nothing (eviction happens only at safe
	// points), so t is still the cached block.
	return t, nil
}

// growRefTable moves the refcount table to a larger area at the end of the
// covered range, with refcount blocks for every new table index up to need
// and for the area itself.
func (im *image) growRefTable(need, avoid int64) error {
	oldN := int64(len(im.rt))
	perCluster := im.cs / refTableEntrySize
	a := max(avoid, oldN<<im.rbBits)
	var nb, nt, entries int64
	for {
		last := max(need, (a+nb+nt-1)>>im.rbBits)
		nb2 := last - oldN + 1
		entries = last + 1
		entries += entries / 2 // headroom
		entries = (entries + perCluster - 1) / perCluster * perCluster
		nt2 := entries / perCluster
		if nb2 == nb && nt2 == nt {
			break
		}
		nb, nt = nb2, nt2
	}
	if entries*refTableEntrySize > maxRefTableBytes {
		return driver.Unsupportedf(im.name, "the refcount table would exceed %d bytes; the image cannot grow further with %d-byte clusters", maxRefTableBytes, im.cs)
	}
	rt := make([]uint64, entries)
	copy(rt, im.rt)
	for i := int64(0); i < nb; i++ {
		c := a + i
		off := c << im.cbits
		im.rbc.add(&table{off: off, idx: oldN + i, buf: make([]byte, im.cs), dirty: true})
		rt[oldN+i] = uint64(off)
		im.metaSet[c] = metaRB
	}
	oldOff, oldClust := int64(im.hdr.refTableOffset), int64(im.hdr.refTableClust)
	im.rt = rt
	im.rtDirty = true
	im.hdr.refTableOffset = uint64(a+nb) << im.cbits
	im.hdr.refTableClust = uint32(nt)
	im.grow((a + nb + nt) << im.cbits)
	// Refcounts of the new area, all inside the new blocks.
	for c := a; c < a+nb+nt; c++ {
		t, err := im.rbFor(c)
		if err != nil {
			return err
		}
		im.setRefRaw(t.buf, c&(im.rbn-1), 1)
	}
	im.rebuildFixed()
	// The old table is freed (pending until the next flush completes).
	return im.freeClusters(oldOff>>im.cbits, oldClust)
}

// rebuildFixed refreshes the fixed metadata ranges after a table moved.
func (im *image) rebuildFixed() {
	saved := im.metaSet
	im.rebuildMeta()
	for k, v := range saved {
		im.metaSet[k] = v
	}
}

// grow records that the qcow2 file now extends to at least end.
func (im *image) grow(end int64) {
	if end > im.fileEnd {
		im.fileEnd = end
	}
}

// findRun returns the first free cluster at or after start and the length
// of the free run there, at most max.
func (im *image) findRun(start, maxN int64) (int64, int64, error) {
	c := max(start, 1)
	for {
		ok, err := im.isFree(c)
		if err != nil {
			return 0, 0, err
		}
		if ok {
			break
		}
		c++
		if c > maxHostOffset>>im.cbits {
			return 0, 0, driver.Unsupportedf(im.name, "no free cluster below the 64 PiB host offset limit")
		}
	}
	n := int64(1)
	for n < maxN {
		ok, err := im.isFree(c + n)
		if err != nil {
			return 0, 0, err
		}
		if !ok {
			break
		}
		n++
	}
	return c, n, nil
}

// findContig returns the first cluster at or after start that begins n free
// clusters.
func (im *image) findContig(start, n int64) (int64, error) {
	c := start
	for {
		s, k, err := im.findRun(c, n)
		if err != nil {
			return 0, err
		}
		if k == n {
			return s, nil
		}
		c = s + k
	}
}

// allocRun allocates up to n contiguous clusters (at least one) with
// refcount 1 and returns the first cluster index and the count.
func (im *image) allocRun(n int64) (int64, int64, error) {
	s, k, err := im.findRun(im.freeHint, n)
	if err != nil {
		return 0, 0, err
	}
	if err := im.claim(s, k); err != nil {
		return 0, 0, err
	}
	im.freeHint = s + k
	return s, k, nil
}

// allocContig allocates exactly n contiguous clusters.
func (im *image) allocContig(n int64) (int64, error) {
	s, err := im.findContig(im.freeHint, n)
	if err != nil {
		return 0, err
	}
	if err := im.claim(s, n); err != nil {
		return 0, err
	}
	if s == im.freeHint {
		im.freeHint = s + n
	}
	return s, nil
}

// claim sets the refcount of the free clusters [s, s+n) to 1.
func (im *image) claim(s, n int64) error {
	for i := int64(0); i < n; i++ {
		if err := im.setRefcount(s+i, 1, s+n); err != nil {
			// Undo what was claimed so far; they were free.
			for j := int64(0); j < i; j++ {
				_ = im.setRefcount(s+j, 0, 0)
			}
			return err
		}
	}
	im.grow((s + n) << im.cbits)
	return nil
}
