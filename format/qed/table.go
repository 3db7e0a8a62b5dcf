package qed

import (
	"encoding/binary"
	"sync/atomic"

	"github.com/vdisk/vdisk/driver"
)

// Entry kinds.
const (
	kindUnalloc = iota
	kindZero
	kindData
)

// kindOf classifies an L2 entry.
func kindOf(e uint64) int {
	switch e {
	case 0:
		return kindUnalloc
	case zeroEntry:
		return kindZero
	}
	return kindData
}

// validData reports whether e may be the offset of a data cluster: aligned,
// past the header and inside the file (the caller holds meta, or reads
// fileEnd under it).
func (im *image) validData(e uint64, fileEnd int64) bool {
	return e&uint64(im.cs-1) == 0 && e >= uint64(im.hdrBytes) && e < uint64(fileEnd)
}

// l1Entry reads L1 entry i atomically.
func (im *image) l1Entry(i int64) uint64 { return atomic.LoadUint64(&im.l1[i]) }

// table returns the L2 table of L1 index i, loading it into the cache; nil
// when the L1 entry is 0. The caller holds meta.
func (im *image) tableLocked(i int64) (*l2Table, error) {
	off := im.l1[i]
	if off == 0 {
		return nil, nil
	}
	if t := im.l2[int64(off)]; t != nil {
		return t, nil
	}
	if !validTable(int64(im.hdr.headerSize), im.cs, im.ts, im.fileEnd, off) {
		return nil, driver.Corruptf(im.name, int64(off), "L1 entry %d points to an L2 table that is misaligned, inside the header or past the end of the file (run check -r all)", i)
	}
	raw := make([]byte, im.tableBytes)
	if err := driver.ReadFullAt(im.f, raw, int64(off)); err != nil {
		return nil, driver.WithFile(err, "read L2 table", im.name)
	}
	t := &l2Table{e: make([]uint64, im.nelems)}
	for j := range t.e {
		t.e[j] = binary.LittleEndian.Uint64(raw[8*j:])
	}
	for len(im.l2) > 0 && im.l2Bytes+im.tableBytes > im.cacheMax {
		for k := range im.l2 { // drop any: tables are never dirty
			im.dropTableLocked(k)
			break
		}
	}
	im.l2[int64(off)] = t
	im.l2Bytes += im.tableBytes
	return t, nil
}

// dropTableLocked removes the table at off from the cache.
func (im *image) dropTableLocked(off int64) {
	if _, ok := im.l2[off]; ok {
		delete(im.l2, off)
		im.l2Bytes -= im.tableBytes
	}
}

// lookup returns the L2 entry of cluster c and, when the cluster's L1
// entry is 0, the number of clusters from c to the end of its table (all
// unallocated); span is 1 otherwise.
func (im *image) lookup(c int64) (e uint64, span int64, err error) {
	i, j := c/im.nelems, c%im.nelems
	if im.l1Entry(i) == 0 {
		return 0, im.nelems - j, nil
	}
	im.meta.Lock()
	t, err := im.tableLocked(i)
	im.meta.Unlock()
	if err != nil || t == nil {
		return 0, im.nelems - j, err
	}
	return atomic.LoadUint64(&t.e[j]), 1, nil
}

// setEntries points clusters c..c+k-1 (inside one L2 table) at v, v+cs,
// ... (or at v for each when v is 0 or the zero entry), allocating the L2
// table if the L1 entry is 0: a new table is written whole, then the L1
// entry. The caller holds meta and has set the need-check flag. It returns
// the entries it replaced (for the caller to free data clusters).
func (im *image) setEntriesLocked(c, k int64, v uint64) ([]uint64, error) {
	i, j := c/im.nelems, c%im.nelems
	next := func(n int64) uint64 {
		if v <= zeroEntry {
			return v
		}
		return v + uint64(n*im.cs)
	}
	t, err := im.tableLocked(i)
	if err != nil {
		return nil, err
	}
	if t == nil {
		if v == 0 {
			return make([]uint64, k), nil
		}
		t = &l2Table{e: make([]uint64, im.nelems)}
		for n := range k {
			t.e[j+n] = next(n)
		}
		off, err := im.allocLocked(im.ts, true)
		if err != nil {
			return nil, err
		}
		if _, err := im.f.WriteAt(encodeEntries(t.e), off); err != nil {
			return nil, driver.WithFile(err, "write L2 table", im.name)
		}
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], uint64(off))
		if _, err := im.f.WriteAt(b[:], int64(im.hdr.l1Offset)+8*i); err != nil {
			return nil, driver.WithFile(err, "write L1 table", im.name)
		}
		atomic.StoreUint64(&im.l1[i], uint64(off))
		im.l2[off] = t
		im.l2Bytes += im.tableBytes
		return make([]uint64, k), nil
	}
	vals := make([]uint64, k)
	for n := range k {
		vals[n] = next(n)
	}
	if _, err := im.f.WriteAt(encodeEntries(vals), int64(im.l1[i])+8*j); err != nil {
		return nil, driver.WithFile(err, "write L2 table", im.name)
	}
	old := make([]uint64, k)
	for n := range k {
		old[n] = atomic.SwapUint64(&t.e[j+n], vals[n])
	}
	return old, nil
}

func encodeEntries(e []uint64) []byte {
	b := make([]byte, 8*len(e))
	for i, v := range e {
		binary.LittleEndian.PutUint64(b[8*i:], v)
	}
	return b
}

// allocLocked reserves n contiguous clusters: a hole for a single data
// cluster when one is reusable, else the end of the file. table asks for
// an L2 table (always at the end). The caller holds meta.
func (im *image) allocLocked(n int64, table bool) (int64, error) {
	if n == 1 && !table && len(im.holes) > 0 {
		h := im.holes[len(im.holes)-1]
		im.holes = im.holes[:len(im.holes)-1]
		return h, nil
	}
	off := im.fileEnd
	if off > (1<<62)-n*im.cs {
		return 0, driver.Errorf(driver.ErrUnsupported, im.name, off, "the image file cannot grow further")
	}
	im.fileEnd += n * im.cs
	return off, nil
}

// freeLocked records data clusters no entry points at any more. They are
// reused after the next flush and packed away then.
func (im *image) freeLocked(old []uint64) {
	for _, e := range old {
		if kindOf(e) == kindData && im.validData(e, im.fileEnd) {
			im.pending = append(im.pending, int64(e))
		}
	}
}
