package qcow2

import (
	"context"
	"fmt"
	"math"
	"sort"

	"github.com/vdisk/vdisk/driver"
)

// tally counts references per host cluster, sparsely.
type tally struct {
	chunks map[int64][]uint32
	max    int64 // highest cluster counted + 1
}

const tallyChunk = 1 << 16

func newTally() *tally { return &tally{chunks: map[int64][]uint32{}} }

func (t *tally) inc(c int64) {
	if c < 0 {
		return
	}
	ch := t.chunks[c/tallyChunk]
	if ch == nil {
		ch = make([]uint32, tallyChunk)
		t.chunks[c/tallyChunk] = ch
	}
	if v := &ch[c%tallyChunk]; *v < math.MaxUint32 {
		*v++
	}
	if c+1 > t.max {
		t.max = c + 1
	}
}

func (t *tally) get(c int64) uint64 {
	if ch := t.chunks[c/tallyChunk]; ch != nil {
		return uint64(ch[c%tallyChunk])
	}
	return 0
}

func (t *tally) dec(c int64) {
	if ch := t.chunks[c/tallyChunk]; ch != nil && ch[c%tallyChunk] > 0 {
		ch[c%tallyChunk]--
	}
}

// sortedChunks returns the chunk indexes in order.
func (t *tally) sortedChunks() []int64 {
	out := make([]int64, 0, len(t.chunks))
	for k := range t.chunks {
		out = append(out, k)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// Check checks the image's metadata: every reference is counted and
// compared with the refcounts (leaks and corruptions), L1/L2 entries are
// checked for alignment and for pointing inside the file, and the copied
// flags of the active tables for agreement with the refcounts. RepairLeaks
// drops leaked references; RepairAll also rebuilds the refcount structure
// when references are undercounted, fixes copied flags and entries
// pointing outside the file, and clears the corrupt bit.
func (im *image) Check(ctx context.Context, mode driver.RepairMode) (*driver.CheckResult, error) {
	im.lockOps()
	defer im.unlockOps()
	if im.closed {
		return nil, driver.Errorf(errClosed, im.name, -1, "image is closed")
	}
	if mode != driver.RepairNone && im.ro {
		return nil, driver.Errorf(driver.ErrReadOnly, im.name, -1, "repairing needs the image opened read-write")
	}
	return im.check(ctx, mode, false)
}

// checker holds the state of one check run.
type checker struct {
	im      *image
	mode    driver.RepairMode
	res     *driver.CheckResult
	t       *tally
	nfile   int64 // clusters in the file
	rebuild bool  // the refcount structure must be rebuilt
	lastOff int64 // for fragmentation counting
}

func (c *checker) msg(format string, args ...any) {
	if len(c.res.Messages) < 10000 {
		c.res.Messages = append(c.res.Messages, fmt.Sprintf(format, args...))
	}
}

func (c *checker) fixAll() bool { return c.mode == driver.RepairAll }

// check runs a check and the repairs mode asks for; after repairs it checks
// again and reports what is left. Callers hold mu (or own the image).
func (im *image) check(ctx context.Context, mode driver.RepairMode, fromOpen bool) (*driver.CheckResult, error) {
	res, err := im.checkOnce(ctx, mode)
	if err != nil || mode == driver.RepairNone {
		return res, err
	}
	if err := im.flushLocked(fromOpen || im.hdrDirty); err != nil {
		return res, err
	}
	again, err := im.checkOnce(ctx, driver.RepairNone)
	if err != nil {
		return res, err
	}
	again.LeaksFixed = res.LeaksFixed
	again.CorruptionsFixed = res.CorruptionsFixed
	again.Messages = append(res.Messages, again.Messages...)
	if mode == driver.RepairAll && again.Corruptions == 0 && again.CheckErrors == 0 && im.corrupt {
		im.corrupt = false
		im.hdr.incompat &^= incompatCorrupt
		if err := im.writeHeaderSync(false, false); err != nil {
			return again, err
		}
	}
	return again, nil
}

func (im *image) checkOnce(ctx context.Context, mode driver.RepairMode) (*driver.CheckResult, error) {
	c := &checker{im: im, mode: mode, res: &driver.CheckResult{}, t: newTally()}
	if im.ro && mode != driver.RepairNone {
		mode = driver.RepairNone
		c.mode = mode
	}
	cs := im.cs
	c.nfile = (im.fileEnd + cs - 1) / cs
	c.res.TotalClusters = (im.size + cs - 1) / cs
	if err := c.countAll(ctx); err != nil {
		return nil, err
	}
	// Compare with the refcounts.
	if err := c.compare(ctx); err != nil {
		return nil, err
	}
	if c.rebuild && c.fixAll() {
		n := c.res.Corruptions
		if err := im.rebuildRefcounts(c.t); err != nil {
			return nil, err
		}
		c.res.CorruptionsFixed += n
		c.rebuild = false
	}
	// Copied flags, against the (possibly repaired) refcounts.
	if err := c.checkCopied(ctx); err != nil {
		return nil, err
	}
	// Image end: the end of the last cluster in use.
	end := c.t.max
	c.res.ImageEndOffset = end * cs
	if c.res.ImageEndOffset == 0 {
		c.res.ImageEndOffset = cs
	}
	return c.res, nil
}

// walkL1 counts the L2 tables and clusters an L1 table references.
func (c *checker) walkL1(ctx context.Context, l1 []uint64, active bool) error {
	im := c.im
	walked := map[int64]bool{}
	for i, e := range l1 {
		if i%64 == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		o, ok := c.checkL1Entry(i, e, active)
		if !ok {
			continue
		}
		c.t.inc(o >> im.cbits)
		if walked[o] {
			// The same table twice in one L1 table: counted (so the
			// refcount mismatch shows) but not walked again, which also
			// bounds the work on hostile images.
			c.res.Corruptions++
			c.msg("ERROR L2 table %#x is referenced twice by one L1 table", o)
			continue
		}
		walked[o] = true
		tb, ok := c.l2Table(o)
		if !ok {
			continue
		}
		fixes := map[int64]l2Fix{}
		for j := int64(0); j < im.l2n; j++ {
			e2, bm := im.entry(tb, j)
			if e2 == 0 && bm == 0 {
				continue
			}
			voff := (int64(i)*im.l2n + j) << im.cbits
			var f l2Fix
			var fixed bool
			if e2&oflagCompressed != 0 {
				f, fixed = c.checkCompressed(voff, e2, bm, active)
			} else {
				f, fixed = c.checkCluster(voff, e2, bm, active)
			}
			if fixed {
				fixes[j] = f
			}
		}
		if err := c.applyL2Fixes(o, fixes); err != nil {
			return err
		}
	}
	return nil
}

// l2Fix is the repaired value of an L2 entry.
type l2Fix struct{ e, bm uint64 }

// checkL1Entry checks L1 entry i (e) and returns the offset of the L2
// table it references, if it references one that can be walked: reserved
// bits are reported (and cleared in the active table with RepairAll), a
// misaligned table or one outside the file is reported (and dropped).
func (c *checker) checkL1Entry(i int, e uint64, active bool) (int64, bool) {
	im := c.im
	cs := im.cs
	if e&l1ReservedMask != 0 {
		c.res.Corruptions++
		c.msg("ERROR L1 entry %d has reserved bits set (%#x)", i, e)
		if active && c.fixAll() {
			im.setL1(int64(i), e&^l1ReservedMask)
			e &^= l1ReservedMask
			c.res.CorruptionsFixed++
		}
	}
	o := int64(e & offMask)
	if o == 0 {
		return 0, false
	}
	if o%cs != 0 || o+cs > im.fileEnd {
		c.res.Corruptions++
		if o%cs != 0 {
			c.msg("ERROR l2_offset=%x: Table is not cluster aligned; L1 entry corrupted", o)
		} else {
			c.msg("ERROR l2_offset=%x: L2 table is outside the image", o)
		}
		if active && c.fixAll() {
			// The table is lost: its range reads from the backing file
			// (or zeros) from now on.
			im.setL1(int64(i), 0)
			delete(im.metaSet, o>>im.cbits)
			c.res.CorruptionsFixed++
		}
		return 0, false
	}
	return o, true
}

// l2Table returns the L2 table at o, from the cache or the file; a table
// that cannot be read is reported.
func (c *checker) l2Table(o int64) ([]byte, bool) {
	im := c.im
	if t := im.l2c.peek(o); t != nil {
		return t.buf, true
	}
	tb := make([]byte, im.cs)
	if err := driver.ReadFullAt(im.f, tb, o); err != nil {
		c.res.CheckErrors++
		c.msg("ERROR cannot read L2 table at %#x: %v", o, err)
		return nil, false
	}
	return tb, true
}

// checkCompressed checks and counts the compressed cluster entry e2 (bm
// its subcluster bitmap) for guest offset voff, and returns its repaired
// value if it has one.
func (c *checker) checkCompressed(voff int64, e2, bm uint64, active bool) (f l2Fix, fixed bool) {
	im := c.im
	if e2&oflagCopied != 0 {
		c.res.Corruptions++
		c.msg("ERROR: coffset=%x: copied flag must never be set for compressed clusters", e2&im.cOffMask)
		if active && c.fixAll() {
			e2 &^= oflagCopied
			f, fixed = l2Fix{e2, bm}, true
			c.res.CorruptionsFixed++
		}
	}
	if im.ext && bm != 0 {
		c.res.Corruptions++
		c.msg("ERROR compressed cluster %d: non-zero subcluster allocation bitmap %#x", voff>>im.cbits, bm)
		if active && c.fixAll() {
			f, fixed = l2Fix{e2, 0}, true
			c.res.CorruptionsFixed++
		}
	}
	hoff, _ := im.compressedRange(e2 &^ (oflagCompressed | oflagCopied))
	if hoff <= 0 || hoff >= im.fileEnd {
		c.res.Corruptions++
		c.msg("ERROR compressed cluster at guest offset %d: host offset %#x is outside the image", voff, hoff)
		return f, fixed
	}
	first, last := im.compressedClusters(e2 &^ (oflagCompressed | oflagCopied))
	for cl := first; cl <= last; cl++ {
		c.t.inc(cl)
	}
	if active {
		c.res.AllocatedClusters++
		c.res.CompressedClusters++
		c.res.FragmentedClusters++
	}
	return f, fixed
}

// checkCluster checks and counts the standard cluster entry e2 (bm its
// subcluster bitmap) for guest offset voff, and returns its repaired value
// if it has one.
func (c *checker) checkCluster(voff int64, e2, bm uint64, active bool) (f l2Fix, fixed bool) {
	im := c.im
	cs := im.cs
	ho := int64(e2 & offMask)
	hasHost := ho != 0 || (im.extData && e2&oflagCopied != 0)
	if !im.ext && e2&oflagZero != 0 && im.hdr.version < 3 {
		c.res.Corruptions++
		c.msg("ERROR zero cluster entry %#x at guest offset %d in a version 2 image", e2, voff)
		if active && c.fixAll() {
			e2 &^= oflagZero
			f, fixed = l2Fix{e2, 0}, true
			c.res.CorruptionsFixed++
		}
	}
	if im.ext {
		if bm&(bm>>32)&allAllocBits != 0 {
			c.res.Corruptions++
			c.msg("ERROR invalid subcluster bitmap %#x at guest offset %d: subclusters both allocated and zero", bm, voff)
		}
		if bm&allAllocBits != 0 && !hasHost {
			c.res.Corruptions++
			c.msg("ERROR guest offset %d: allocated subclusters without a host cluster", voff)
		}
	}
	if !hasHost {
		return f, fixed
	}
	if im.extData {
		if active {
			c.res.AllocatedClusters++
		}
		return f, fixed
	}
	zero := !im.ext && e2&oflagZero != 0
	if ho%cs != 0 {
		c.res.Corruptions++
		c.msg("ERROR offset=%x: Cluster is not properly aligned; L2 entry corrupted", ho)
		if active && c.fixAll() && zero {
			f, fixed = l2Fix{oflagZero, 0}, true
			c.res.CorruptionsFixed++
		}
		return f, fixed
	}
	if ho >= im.fileEnd {
		c.res.Corruptions++
		c.msg("ERROR offset=%x: Data cluster at guest offset %d is outside the image", ho, voff)
		if active && c.fixAll() {
			// Reads zeros instead of data that is not there.
			if im.hdr.version >= 3 && !im.ext {
				f = l2Fix{oflagZero, 0}
			} else if im.ext {
				f = l2Fix{0, allZeroBits}
			} else {
				f = l2Fix{0, 0}
			}
			fixed = true
			c.res.CorruptionsFixed++
		}
		return f, fixed
	}
	c.t.inc(ho >> im.cbits)
	if active {
		c.res.AllocatedClusters++
		if c.lastOff != 0 && ho != c.lastOff+cs {
			c.res.FragmentedClusters++
		}
		c.lastOff = ho
	}
	return f, fixed
}

// applyL2Fixes writes the repaired entries into the L2 table at o.
func (c *checker) applyL2Fixes(o int64, fixes map[int64]l2Fix) error {
	if len(fixes) == 0 {
		return nil
	}
	im := c.im
	t, err := im.loadL2(o)
	if err != nil {
		return err
	}
	for j, f := range fixes {
		im.setEntry(t.buf, j, f.e, f.bm)
	}
	t.dirty = true
	im.shrinkCaches()
	return nil
}

// compare compares the counted references with the refcounts.
func (c *checker) compare(ctx context.Context) error {
	im := c.im
	seen := map[int64]bool{} // tally chunks compared through refcount blocks
	var leaks []int64
	cmp1 := func(cl int64, ref uint64) {
		exp := c.t.get(cl)
		if exp > im.refMax {
			c.res.Corruptions++
			c.rebuild = true
			c.msg("ERROR cluster %d has %d references, more than refcount_bits=%d can count", cl, exp, 1<<im.rorder)
			return
		}
		switch {
		case ref == exp:
		case ref > exp:
			c.res.Leaks++
			c.msg("Leaked cluster %d refcount=%d reference=%d", cl, ref, exp)
			leaks = append(leaks, cl)
		default:
			c.res.Corruptions++
			c.rebuild = true
			c.msg("ERROR cluster %d refcount=%d reference=%d", cl, ref, exp)
		}
	}
	blocks := map[int64]bool{}
	for ti, e := range im.rt {
		if err := ctx.Err(); err != nil {
			return err
		}
		o := int64(e & refTableOffMask)
		if e == 0 || e&0x1ff != 0 || o%im.cs != 0 || o <= 0 || o+im.cs > im.fileEnd {
			continue
		}
		if blocks[o] {
			c.res.Corruptions++
			c.rebuild = true
			c.msg("ERROR refcount block %d at %#x is also used for another range", ti, o)
			continue
		}
		blocks[o] = true
		t, err := im.loadRB(int64(ti), o)
		if err != nil {
			c.res.CheckErrors++
			c.rebuild = true
			c.msg("ERROR cannot read refcount block %d: %v", ti, err)
			continue
		}
		buf := t.buf
		base := int64(ti) << im.rbBits
		for i := int64(0); i < im.rbn; i++ {
			cl := base + i
			cmp1(cl, im.getRef(buf, i))
		}
		for ch := base / tallyChunk; ch <= (base+im.rbn-1)/tallyChunk; ch++ {
			if base <= ch*tallyChunk && (ch+1)*tallyChunk <= base+im.rbn {
				seen[ch] = true
			}
		}
		im.shrinkCaches()
	}
	// References to clusters no refcount block covers.
	for _, ch := range c.t.sortedChunks() {
		if seen[ch] {
			continue
		}
		for i := int64(0); i < tallyChunk; i++ {
			cl := ch*tallyChunk + i
			if c.t.get(cl) == 0 {
				continue
			}
			ti := cl >> im.rbBits
			if ti < int64(len(im.rt)) {
				e := im.rt[ti]
				o := int64(e & refTableOffMask)
				if e != 0 && e&0x1ff == 0 && o%im.cs == 0 && o > 0 && o+im.cs <= im.fileEnd {
					continue // compared above
				}
			}
			cmp1(cl, 0)
		}
	}
	if len(leaks) > 0 && c.mode != driver.RepairNone && !(c.rebuild && c.fixAll()) {
		for _, cl := range leaks {
			if err := im.setRefcount(cl, c.t.get(cl), 0); err != nil {
				return err
			}
			c.res.LeaksFixed++
		}
		im.shrinkCaches()
	}
	if c.rebuild && c.fixAll() {
		c.res.LeaksFixed += len(leaks)
	}
	return nil
}

// checkCopied compares the copied flags of the active tables with the
// refcounts, fixing them with RepairAll.
func (c *checker) checkCopied(ctx context.Context) error {
	im := c.im
	for i, e := range im.l1 {
		if err := ctx.Err(); err != nil {
			return err
		}
		o := int64(e & offMask)
		if o == 0 || o%im.cs != 0 || o+im.cs > im.fileEnd {
			continue
		}
		ref, err := im.refcount(o >> im.cbits)
		if err != nil {
			return err
		}
		if (ref == 1) != (e&oflagCopied != 0) {
			c.res.Corruptions++
			c.msg("ERROR OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%x refcount=%d", i, e, ref)
			if c.fixAll() {
				ne := e &^ oflagCopied
				if ref == 1 {
					ne |= oflagCopied
				}
				im.setL1(int64(i), ne)
				c.res.CorruptionsFixed++
			}
		}
		t, err := im.loadL2(o)
		if err != nil {
			c.res.CheckErrors++
			continue
		}
		changed := false
		for j := int64(0); j < im.l2n; j++ {
			e2, bm := im.entry(t.buf, j)
			if e2&oflagCompressed != 0 {
				continue
			}
			ho := int64(e2 & offMask)
			if im.extData {
				if ho != 0 && e2&oflagCopied == 0 {
					c.res.Corruptions++
					c.msg("ERROR OFLAG_COPIED data cluster: l2_entry=%x (external data file)", e2)
					if c.fixAll() {
						im.setEntry(t.buf, j, e2|oflagCopied, bm)
						changed = true
						c.res.CorruptionsFixed++
					}
				}
				continue
			}
			if ho == 0 || ho%im.cs != 0 {
				continue
			}
			ref, err := im.refcount(ho >> im.cbits)
			if err != nil {
				return err
			}
			if (ref == 1) != (e2&oflagCopied != 0) {
				c.res.Corruptions++
				c.msg("ERROR OFLAG_COPIED data cluster: l2_entry=%x refcount=%d", e2, ref)
				if c.fixAll() {
					ne := e2 &^ oflagCopied
					if ref == 1 {
						ne |= oflagCopied
					}
					im.setEntry(t.buf, j, ne, bm)
					changed = true
					c.res.CorruptionsFixed++
				}
			}
		}
		if changed {
			t.dirty = true
		}
		im.shrinkCaches()
	}
	return nil
}

// rebuildRefcounts writes a new refcount structure holding the counted
// references, past every cluster in use, and switches the header to it.
// The old structure stays valid until the header is switched.
func (im *image) rebuildRefcounts(t *tally) error {
	cs := im.cs
	// The old table and blocks are no longer referenced afterwards.
	h := im.hdr
	for cl := int64(h.refTableOffset) >> im.cbits; cl < (int64(h.refTableOffset)+int64(h.refTableClust)*cs)>>im.cbits; cl++ {
		t.dec(cl)
	}
	for _, e := range im.rt {
		o := int64(e & refTableOffMask)
		if e != 0 && e&0x1ff == 0 && o%cs == 0 && o > 0 && o+cs <= im.fileEnd {
			t.dec(o >> im.cbits)
		}
	}
	// Blocks that hold a non-zero count below the new area.
	used := map[int64]bool{}
	for _, ch := range t.sortedChunks() {
		for i := int64(0); i < tallyChunk; i++ {
			cl := ch*tallyChunk + i
			if t.get(cl) != 0 {
				used[cl>>im.rbBits] = true
			}
		}
	}
	start := max(t.max, (im.fileEnd+cs-1)/cs, 1)
	perCluster := cs / 8
	var nb, nt int64
	var area map[int64]bool
	for {
		end := start + nb + nt
		area = map[int64]bool{}
		for ti := start >> im.rbBits; ti <= (end-1)>>im.rbBits; ti++ {
			if !used[ti] {
				area[ti] = true
			}
		}
		lastTi := (end - 1) >> im.rbBits
		for ti := range used {
			lastTi = max(lastTi, ti)
		}
		nb2 := int64(len(used) + len(area))
		nt2 := (lastTi + 1 + perCluster - 1) / perCluster
		if nb2 == nb && nt2 == nt {
			break
		}
		nb, nt = nb2, nt2
	}
	if nt*cs > maxRefTableBytes {
		return driver.Unsupportedf(im.name, "the rebuilt refcount table would exceed %d bytes", maxRefTableBytes)
	}
	var tis []int64
	for ti := range used {
		tis = append(tis, ti)
	}
	for ti := range area {
		tis = append(tis, ti)
	}
	sort.Slice(tis, func(i, j int) bool { return tis[i] < tis[j] })
	rt := make([]uint64, nt*perCluster)
	blocks := map[int64][]byte{}
	for i, ti := range tis {
		cl := start + int64(i)
		rt[ti] = uint64(cl << im.cbits)
		blocks[ti] = make([]byte, cs)
	}
	for cl := start; cl < start+nb+nt; cl++ {
		t.inc(cl)
	}
	for ti, b := range blocks {
		base := ti << im.rbBits
		for i := int64(0); i < im.rbn; i++ {
			v := t.get(base + i)
			if v > im.refMax {
				return driver.Corruptf(im.name, (base+i)<<im.cbits, "cluster %d has %d references, more than refcount_bits can count", base+i, v)
			}
			if v != 0 {
				im.setRefRaw(b, i, v)
			}
		}
	}
	// Write the blocks, then the table, then switch the header.
	for ti, b := range blocks {
		if _, err := im.f.WriteAt(b, int64(rt[ti])); err != nil {
			return err
		}
	}
	tbuf := make([]byte, nt*cs)
	for i, e := range rt {
		put64(tbuf[i*8:], e)
	}
	rtOff := (start + nb) << im.cbits
	if _, err := im.f.WriteAt(tbuf, rtOff); err != nil {
		return err
	}
	if err := im.f.Sync(); err != nil {
		return err
	}
	im.grow((start + nb + nt) << im.cbits)
	h.refTableOffset = uint64(rtOff)
	h.refTableClust = uint32(nt)
	if err := im.writeHeaderSync(true, false); err != nil {
		return err
	}
	// Drop every cached block, dirty or not: the new structure replaces it.
	im.rbc = newCache(im.rbc.max)
	im.pendN = 0
	im.rt = rt
	im.rtDirty = false
	im.freeHint = 1
	im.rebuildMeta()
	return nil
}

// countAll counts every reference to every cluster of the file into c.t:
// header, L1, refcount table and blocks, snapshots, bitmaps and the L2
// tables and data they reach. Damage found on the way is recorded in
// c.res.
func (c *checker) countAll(ctx context.Context) error {
	im := c.im
	cs := im.cs
	incRange := func(off uint64, n int64) {
		if n <= 0 {
			return
		}
		for cl := int64(off) >> im.cbits; cl <= (int64(off)+n-1)>>im.cbits; cl++ {
			c.t.inc(cl)
		}
	}
	h := im.hdr
	incRange(0, cs)
	if len(im.l1) > 0 {
		incRange(h.l1Offset, int64(len(im.l1))*8)
	}
	incRange(h.refTableOffset, int64(h.refTableClust)*cs)
	if len(im.snaps) > 0 {
		incRange(h.snapshotsOffset, im.snapTableSize())
	}
	if h.hasCrypto {
		incRange(h.cryptoOff, int64(h.cryptoLen))
	}
	// Bitmaps.
	if b := h.bitmaps; b != nil {
		incRange(b.dirOffset, int64(b.dirSize))
		for i := range im.bitmaps {
			bm := &im.bitmaps[i]
			if bm.tableSize == 0 {
				continue
			}
			incRange(bm.tableOffset, int64(bm.tableSize)*8)
			tbl, err := im.bitmapTable(bm)
			if err != nil {
				c.res.CheckErrors++
				c.msg("ERROR cannot read the table of bitmap %q: %v", bm.name, err)
				continue
			}
			for _, e := range tbl {
				o := int64(e & offMask)
				if o == 0 {
					continue
				}
				if o%cs != 0 || o >= im.fileEnd {
					c.res.Corruptions++
					c.msg("ERROR bitmap %q: table entry %#x is misaligned or past the end of the file", bm.name, e)
					continue
				}
				c.t.inc(o >> im.cbits)
			}
		}
	}
	// Refcount blocks.
	for i, e := range im.rt {
		if e == 0 {
			continue
		}
		o := int64(e & refTableOffMask)
		if e&0x1ff != 0 || o%cs != 0 || o <= 0 {
			c.res.Corruptions++
			c.rebuild = true
			c.msg("ERROR refcount block %d is not cluster aligned; refcount table entry corrupted", i)
			continue
		}
		if o+cs > im.fileEnd {
			c.res.Corruptions++
			c.rebuild = true
			c.msg("ERROR refcount block %d is outside the image", i)
			continue
		}
		c.t.inc(o >> im.cbits)
	}
	// Snapshots' L1 tables and everything they reference.
	for i := range im.snaps {
		s := &im.snaps[i]
		if s.l1Size == 0 {
			continue
		}
		incRange(s.l1Offset, int64(s.l1Size)*8)
		l1, err := im.readL1(s.l1Offset, s.l1Size)
		if err != nil {
			c.res.CheckErrors++
			c.msg("ERROR snapshot %q: %v", s.name, err)
			continue
		}
		if err := c.walkL1(ctx, l1, false); err != nil {
			return err
		}
	}
	// The active L1 table.
	if err := c.walkL1(ctx, im.l1, true); err != nil {
		return err
	}
	return nil
}
