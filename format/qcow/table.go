package qcow

import (
	"container/list"
	"encoding/binary"
	"errors"
	"io"

	"github.com/vdisk/vdisk/driver"
)

// l2CacheBytes bounds the memory the L2 cache holds (qemu's qcow keeps 16
// tables; we keep more so that big sequential jobs do not reread them).
const l2CacheBytes = 32 << 20

// l2Table is one cached L2 table.
type l2Table struct {
	idx  int64 // L1 index
	off  int64 // file offset
	ents []uint64
	used int // non-zero entries
	elem *list.Element
}

// count recounts the table's non-zero entries.
func (t *l2Table) count() {
	t.used = 0
	for _, e := range t.ents {
		if e != 0 {
			t.used++
		}
	}
}

// l2Cache is an LRU cache of L2 tables keyed by L1 index. Tables are
// written through, so they are never dirty and can be dropped at will.
// The image's meta mutex guards it.
type l2Cache struct {
	max    int
	tables map[int64]*l2Table
	lru    list.List // front: most recently used
}

func (c *l2Cache) init(l2Bytes int64) {
	c.max = max(16, int(l2CacheBytes/l2Bytes))
	c.reset()
}

func (c *l2Cache) reset() {
	c.tables = map[int64]*l2Table{}
	c.lru.Init()
}

func (c *l2Cache) get(idx int64) *l2Table {
	t := c.tables[idx]
	if t != nil {
		c.lru.MoveToFront(t.elem)
	}
	return t
}

func (c *l2Cache) put(t *l2Table) {
	if len(c.tables) >= c.max {
		if last := c.lru.Back(); last != nil {
			old := last.Value.(*l2Table)
			c.lru.Remove(last)
			delete(c.tables, old.idx)
		}
	}
	t.elem = c.lru.PushFront(t)
	c.tables[t.idx] = t
}

// table returns L2 table idx, loading it, or nil when the L1 entry is
// empty. The caller holds meta.
func (im *image) table(idx int64) (*l2Table, error) {
	if im.closed {
		return nil, driver.Errorf(driver.ErrClosed, im.name, -1, "image closed")
	}
	if t := im.cache.get(idx); t != nil {
		return t, nil
	}
	off := im.l1[idx]
	if off == 0 {
		return nil, nil
	}
	lo := &im.lo
	l1e := lo.l1Off + idx*8
	if off > uint64(im.end) || int64(off) > im.end-lo.l2Bytes {
		return nil, driver.Corruptf(im.name, l1e, "L1 entry %d points at an L2 table at %d, past the end of the file", idx, off)
	}
	if int64(off) < lo.metaEnd {
		return nil, driver.Corruptf(im.name, l1e, "L1 entry %d points at an L2 table at %d, inside the header or L1 table", idx, off)
	}
	raw := make([]byte, lo.l2Bytes)
	if err := driver.ReadFullAt(im.f, raw, int64(off)); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, driver.Corruptf(im.name, int64(off), "L2 table %d is cut short by the end of the file", idx)
		}
		return nil, driver.WithFile(err, "read L2 table", im.name)
	}
	t := &l2Table{idx: idx, off: int64(off), ents: make([]uint64, lo.l2Len())}
	for i := range t.ents {
		t.ents[i] = binary.BigEndian.Uint64(raw[i*8:])
	}
	t.count()
	im.cache.put(t)
	return t, nil
}

// entries copies the L2 entries of clusters c, c+1, ... into dst, up to
// len(dst) entries or the end of c's L2 table, and returns how many it
// copied (at least 1). Clusters without an L2 table have entry 0.
func (im *image) entries(c int64, dst []uint64) (int, error) {
	lo := &im.lo
	idx, in := c>>lo.l2Bits, c&(lo.l2Len()-1)
	n := min(int64(len(dst)), lo.l2Len()-in)
	im.meta.Lock()
	defer im.meta.Unlock()
	t, err := im.table(idx)
	if err != nil {
		return 0, err
	}
	if t == nil {
		clear(dst[:n])
	} else {
		copy(dst[:n], t.ents[in:in+n])
	}
	return int(n), nil
}

// absentTable returns, when cluster c has no L2 table or one with no
// entries at all, the number of clusters from c to the end of that
// table's span, else 0 (also when the table cannot be read: the lookup
// that follows reports that).
func (im *image) absentTable(c int64) int64 {
	lo := &im.lo
	idx := c >> lo.l2Bits
	im.meta.Lock()
	defer im.meta.Unlock()
	if im.l1[idx] != 0 {
		t, err := im.table(idx)
		if err != nil || t == nil || t.used > 0 {
			return 0
		}
	}
	return lo.l2Len() - c&(lo.l2Len()-1)
}

// reserve takes n bytes of file space at the end of the file, at a
// cluster boundary when aligned (data clusters and tables) or right at
// the end (compressed streams), and returns their offset. The caller
// holds meta.
func (im *image) reserveLocked(n int64, aligned bool) (int64, error) {
	off := im.end
	if aligned {
		off = (off + im.lo.cs - 1) &^ (im.lo.cs - 1)
	}
	if off < 0 || off > int64(flagCompressed>>1)-n {
		return 0, driver.Errorf(driver.ErrUnsupported, im.name, -1, "the image file cannot grow any further")
	}
	im.end = off + n
	return off, nil
}

func (im *image) reserve(n int64, aligned bool) (int64, error) {
	im.meta.Lock()
	defer im.meta.Unlock()
	if im.closed {
		return 0, driver.Errorf(driver.ErrClosed, im.name, -1, "image closed")
	}
	return im.reserveLocked(n, aligned)
}

// release gives back space reserved at the end of the file whose write
// failed, when nothing was reserved after it.
func (im *image) release(off, n int64) {
	im.meta.Lock()
	defer im.meta.Unlock()
	if im.end == off+n {
		im.end = off
	}
}

// setEntries points clusters c, c+1, ... (all in one L2 table) at vals.
// The data they point at is written already. A missing L2 table is
// written whole (with these entries) before the L1 entry that points at
// it.
func (im *image) setEntries(c int64, vals []uint64) error {
	lo := &im.lo
	idx, in := c>>lo.l2Bits, c&(lo.l2Len()-1)
	raw := make([]byte, 8*len(vals))
	for i, v := range vals {
		binary.BigEndian.PutUint64(raw[8*i:], v)
	}
	im.meta.Lock()
	defer im.meta.Unlock()
	t, err := im.table(idx)
	if err != nil {
		return err
	}
	if t != nil {
		if _, err := im.f.WriteAt(raw, t.off+8*in); err != nil {
			// The entries on disk are unknown now; reload them next time.
			delete(im.cache.tables, idx)
			im.cache.lru.Remove(t.elem)
			return driver.WithFile(err, "write L2 entries", im.name)
		}
		copy(t.ents[in:], vals)
		t.count()
		return nil
	}
	// A new L2 table, written before the L1 entry pointing at it.
	off, err := im.reserveLocked(lo.l2Bytes, true)
	if err != nil {
		return err
	}
	t = &l2Table{idx: idx, off: off, ents: make([]uint64, lo.l2Len())}
	copy(t.ents[in:], vals)
	t.count()
	tb := make([]byte, lo.l2Bytes)
	copy(tb[8*in:], raw)
	if _, err := im.f.WriteAt(tb, off); err != nil {
		if im.end == off+lo.l2Bytes {
			im.end = off
		}
		return driver.WithFile(err, "write L2 table", im.name)
	}
	var e [8]byte
	binary.BigEndian.PutUint64(e[:], uint64(off))
	if _, err := im.f.WriteAt(e[:], lo.l1Off+8*idx); err != nil {
		return driver.WithFile(err, "write L1 entry", im.name)
	}
	im.l1[idx] = uint64(off)
	im.cache.put(t)
	return nil
}
