package qcow2

import (
	"errors"

	"github.com/vdisk/vdisk/driver"
)

// Sources of the bytes of a unit (cluster or subcluster) a write does not
// cover, when the unit is (re)written whole.
const (
	srcParent = iota // unallocated: the backing chain (zeros without one)
	srcZero          // zero cluster or subcluster
	srcHost          // allocated: the old host data
	srcComp          // compressed: the decompressed old cluster
)

// cplan is what one write does to one cluster.
type cplan struct {
	vstart     int64 // virtual offset of the cluster
	ws, we     int64 // written bytes within the cluster
	pOff       int64 // offset in the write buffer of vstart+ws
	oldE       uint64
	oldBm      uint64
	host       int64 // host cluster offset written to
	alloc      bool  // host is newly allocated (refcount taken)
	fresh      bool  // host lies past the old end of the file: it reads zeros
	a, b       int64 // range of the cluster (re)written
	newE       uint64
	newBm      uint64
	changed    bool   // the L2 entry changes
	freeHost   int64  // old host cluster losing a reference (shared), or -1
	freeComp   uint64 // old compressed descriptor to release, or 0
	hasFreeCmp bool
}

// WriteAt writes guest data.
func (im *image) WriteAt(p []byte, off int64) (int, error) {
	if err := im.beginWrite(off); err != nil {
		return 0, err
	}
	im.opMu.RLock()
	defer im.opMu.RUnlock()
	im.drainCompressor()
	if err := im.cwErr(); err != nil {
		return 0, err
	}
	size := im.Size()
	if err := driver.CheckRange(im.name, off, int64(len(p)), size); err != nil {
		return 0, err
	}
	// Copy-on-write needs the backing chain's bytes around a write into
	// part of an unallocated unit: ask for them before writing anything.
	end := off + int64(len(p))
	if start, stop, err := im.fillRange(off, end, size); err != nil {
		return 0, err
	} else if start != off || stop != end {
		return 0, driver.NeedFill(im.name, start, stop)
	}
	span := im.l2Span()
	done := int64(0)
	for done < int64(len(p)) {
		pos := off + done
		n := min(int64(len(p))-done, span-pos%span)
		if err := im.writeChunk(p[done:done+n], pos); err != nil {
			return int(done), err
		}
		done += n
	}
	return len(p), nil
}

// fillRange returns [off, end) extended to the whole units (subclusters
// with extended L2, else clusters) at its head and tail that the range
// covers only in part and whose other bytes would come from the backing
// chain: unallocated units of an image that records a backing file. A
// write of [off, end) must be given that range whole (driver.FillError).
// Units the image holds itself (zero, compressed, allocated) are composed
// by the write; without a backing file unallocated units read zeros and
// need nothing. size is the virtual size; callers hold opMu shared.
func (im *image) fillRange(off, end, size int64) (start, stop int64, err error) {
	start, stop = off, end
	if !im.backed() {
		return
	}
	// Compressed clusters, the only units larger than a subcluster with
	// extended L2, never need the chain: subcluster alignment suffices.
	head := off&(im.scSize-1) != 0
	tail := end&(im.scSize-1) != 0 && end < size
	if !head && !tail {
		return
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if head {
		us, _, back, err := im.unitAt(off)
		if err != nil {
			return 0, 0, err
		}
		if back {
			start = us
		}
	}
	if tail {
		_, ue, back, err := im.unitAt(end - 1)
		if err != nil {
			return 0, 0, err
		}
		if back {
			stop = min(ue, size)
		}
	}
	return start, stop, nil
}

// unitAt returns the unit [us, ue) holding virtual offset pos (a
// subcluster with extended L2 unless compressed, else a cluster) and
// whether its content is not the image's own (unallocated). It changes
// nothing. Callers hold mu.
func (im *image) unitAt(pos int64) (us, ue int64, unalloc bool, err error) {
	l2off, err := im.l2Offset(pos / im.l2Span())
	if err != nil {
		return 0, 0, false, err
	}
	var e, bm uint64
	if l2off != 0 {
		t, err := im.loadL2(l2off)
		if err != nil {
			return 0, 0, false, err
		}
		e, bm = im.entry(t.buf, (pos>>im.cbits)&(im.l2n-1))
	}
	unit := im.scSize
	if e&oflagCompressed != 0 {
		unit = im.cs
	}
	us = pos &^ (unit - 1)
	src, _ := im.unitSource(&cplan{oldE: e, oldBm: bm}, pos&(im.cs-1))
	return us, us + unit, src == srcParent, nil
}

// errFillMissed reports a copy-on-write that would need the backing chain
// but reached the write path without the FillError check (a bug).
var errFillMissed = errors.New("copy-on-write of an unallocated unit needs the backing chain")

// writeChunk writes p at off; the range lies within one L2 table.
func (im *image) writeChunk(p []byte, off int64) error {
	end := off + int64(len(p))
	l1i := off / im.l2Span()
	im.mu.Lock()
	tb, err := im.l2ForWrite(l1i)
	if err != nil {
		im.mu.Unlock()
		return err
	}
	var plans []cplan
	needAlloc := 0
	for v := off &^ (im.cs - 1); v < end; v += im.cs {
		ci := (v >> im.cbits) & (im.l2n - 1)
		e, bm := im.entry(tb.buf, ci)
		pl := cplan{vstart: v, ws: max(off, v) - v, we: min(end, v+im.cs) - v, oldE: e, oldBm: bm, freeHost: -1}
		pl.pOff = v + pl.ws - off
		if err := im.planCluster(&pl); err != nil {
			im.mu.Unlock()
			return err
		}
		if pl.host < 0 {
			needAlloc++
		}
		plans = append(plans, pl)
	}
	// Allocate host clusters for the clusters that need them, in runs.
	if needAlloc > 0 {
		if err := im.allocPlans(plans); err != nil {
			im.mu.Unlock()
			return err
		}
	}
	// Refuse to write data over metadata (a hostile or corrupt L2 entry).
	if !im.extData {
		for i := range plans {
			pl := &plans[i]
			if !pl.alloc && im.isMeta(pl.host>>im.cbits) {
				err := im.markCorrupt(pl.vstart, "L2 entry for guest offset %d points at metadata (host cluster %#x)", pl.vstart, pl.host)
				im.releasePlans(plans)
				im.mu.Unlock()
				return err
			}
		}
	}
	im.mu.Unlock()

	// Data phase, without the metadata lock.
	err = im.writeData(plans, p)

	im.mu.Lock()
	defer im.mu.Unlock()
	if err != nil {
		im.releasePlans(plans)
		return err
	}
	im.dataDirty.Store(true)
	return im.commitPlans(l1i, plans)
}

// planCluster decides how to write one cluster: in place, or into a new
// host cluster (pl.host = -1 until allocated), and which range to write.
func (im *image) planCluster(pl *cplan) error {
	e, bm := pl.oldE, pl.oldBm
	cs := im.cs
	o := int64(e & offMask)
	hasHost := e&oflagCompressed == 0 && (o != 0 || (im.extData && e&oflagCopied != 0))
	if hasHost && o%cs != 0 {
		return driver.Corruptf(im.name, pl.vstart, "L2 entry %#x for guest offset %d is not cluster aligned", e, pl.vstart)
	}
	// Subcluster-aligned range the write touches.
	scLo := pl.ws &^ (im.scSize - 1)
	scHi := (pl.we + im.scSize - 1) &^ (im.scSize - 1)
	touched := uint64(0)
	if im.ext {
		for s := scLo >> im.scBits; s < scHi>>im.scBits; s++ {
			touched |= 1 << s
		}
	}
	pl.host = -1
	switch {
	case e&oflagCompressed != 0:
		pl.a, pl.b = 0, cs
		pl.freeComp, pl.hasFreeCmp = e&^(oflagCompressed|oflagCopied), true
		pl.newBm = allAllocBits
	case hasHost && (e&oflagCopied != 0 || im.extData):
		// In place.
		pl.host = o
		if !im.ext {
			if e&oflagZero != 0 {
				pl.a, pl.b = 0, cs
			} else {
				pl.a, pl.b = pl.ws, pl.we
			}
		} else {
			pl.newBm = (bm | touched) &^ (touched << 32)
			first, last := scLo>>im.scBits, (scHi>>im.scBits)-1
			if bm&(1<<first) != 0 && bm&(1<<last) != 0 {
				pl.a, pl.b = pl.ws, pl.we
			} else {
				pl.a, pl.b = scLo, scHi
			}
		}
	case hasHost:
		// Shared with a snapshot: copy on write into a new cluster.
		pl.freeHost = o
		if im.ext {
			pl.newBm = (bm | touched) &^ (touched << 32)
		}
		pl.a, pl.b = 0, cs
	default:
		// Unallocated or zero without a host cluster.
		if im.ext {
			pl.newBm = (bm | touched) &^ (touched << 32)
			pl.a, pl.b = scLo, scHi
		} else {
			pl.a, pl.b = 0, cs
		}
		if im.extData {
			pl.host = pl.vstart
		}
	}
	if pl.host >= 0 && im.extData && !hasHost {
		pl.changed = true
	}
	newE := uint64(0)
	if pl.host >= 0 {
		newE = uint64(pl.host) | oflagCopied
	}
	if im.ext && pl.newBm != bm {
		pl.changed = true
	}
	if !im.ext && e&oflagZero != 0 {
		pl.changed = true
	}
	pl.newE = newE
	return nil
}

// allocPlans gives new host clusters to the plans that need one, using
// contiguous runs where possible.
func (im *image) allocPlans(plans []cplan) error {
	oldEnd := im.fileEnd
	for i := 0; i < len(plans); {
		if plans[i].host >= 0 {
			i++
			continue
		}
		j := i
		for j < len(plans) && plans[j].host < 0 {
			j++
		}
		s, k, err := im.allocRun(int64(j - i))
		if err != nil {
			im.releasePlans(plans)
			return err
		}
		for n := int64(0); n < k; n++ {
			pl := &plans[i+int(n)]
			pl.host = (s + n) << im.cbits
			pl.alloc = true
			pl.fresh = pl.host >= oldEnd
			pl.newE = uint64(pl.host) | oflagCopied
			pl.changed = true
		}
		i += int(k)
	}
	return nil
}

// releasePlans frees the clusters allocated for plans that were not
// committed.
func (im *image) releasePlans(plans []cplan) {
	for i := range plans {
		if plans[i].alloc {
			_ = im.setRefcount(plans[i].host>>im.cbits, 0, 0)
			plans[i].alloc = false
		}
	}
}

// writeData writes the data of every plan, merging writes that are
// contiguous both in the buffer and on the host.
func (im *image) writeData(plans []cplan, p []byte) error {
	if im.crypt != nil {
		return im.writeEncrypted(plans, p)
	}
	type wop struct {
		host int64
		data []byte
		pOff int64 // offset in p when data is a slice of p, else -1
	}
	var ops []wop
	add := func(o wop) {
		if n := len(ops); n > 0 && o.pOff >= 0 {
			l := &ops[n-1]
			if l.pOff >= 0 && l.host+int64(len(l.data)) == o.host && l.pOff+int64(len(l.data)) == o.pOff {
				l.data = p[l.pOff : o.pOff+int64(len(o.data))]
				return
			}
		}
		ops = append(ops, o)
	}
	// A new cluster past the old end of the file reads zeros already:
	// when the rest of it must read zeros too, only the data is written,
	// and the file is extended over the cluster by one byte at its end
	// (instead of a cluster of zeros).
	var tail int64
	for i := range plans {
		pl := &plans[i]
		skipZeros := pl.fresh && im.restIsZero(pl)
		if pl.a == pl.ws && pl.b == pl.we || skipZeros {
			add(wop{host: pl.host + pl.ws, data: p[pl.pOff : pl.pOff+pl.we-pl.ws], pOff: pl.pOff})
			if skipZeros && pl.we < im.cs {
				tail = max(tail, pl.host+im.cs)
			}
			continue
		}
		buf, err := im.compose(pl, p)
		if err != nil {
			return err
		}
		add(wop{host: pl.host + pl.a, data: buf, pOff: -1})
	}
	for _, o := range ops {
		if _, err := im.df.WriteAt(o.data, o.host); err != nil {
			return err
		}
		if o.host+int64(len(o.data)) >= tail {
			tail = 0
		}
	}
	if tail > 0 {
		if _, err := im.df.WriteAt([]byte{0}, tail-1); err != nil {
			return err
		}
	}
	return nil
}

// writeEncrypted is writeData for an encrypted image: every plan's range
// widened to whole sectors, composed in plaintext into one buffer, then
// encrypted (on every core for large batches) with the host sector numbers
// and written, merging runs contiguous on the host.
func (im *image) writeEncrypted(plans []cplan, p []byte) error {
	c, err := im.cipherForWrite(plans[0].vstart + plans[0].ws)
	if err != nil {
		return err
	}
	total := int64(0)
	for i := range plans {
		pl := &plans[i]
		pl.a &^= 511
		pl.b = min((pl.b+511)&^511, im.cs)
		total += pl.b - pl.a
	}
	all := make([]byte, total)
	defer clear(all)
	var runs []encRun
	at := int64(0)
	for i := range plans {
		pl := &plans[i]
		buf := all[at : at+pl.b-pl.a : at+pl.b-pl.a]
		if err := im.composeInto(buf, pl, p); err != nil {
			return err
		}
		host := pl.host + pl.a
		if n := len(runs); n > 0 && runs[n-1].host+int64(len(runs[n-1].buf)) == host {
			runs[n-1].buf = all[at-int64(len(runs[n-1].buf)) : at+pl.b-pl.a]
		} else {
			runs = append(runs, encRun{host: host, buf: buf})
		}
		at += pl.b - pl.a
	}
	encryptRuns(c, runs)
	for _, r := range runs {
		if _, err := im.df.WriteAt(r.buf, r.host); err != nil {
			return err
		}
	}
	return nil
}

// restIsZero reports whether every byte of [pl.a, pl.b) outside the
// written range must read zeros (no backing data, no old data).
func (im *image) restIsZero(pl *cplan) bool {
	unit := im.scSize
	if !im.ext || pl.oldE&oflagCompressed != 0 {
		unit = im.cs
	}
	for u := pl.a &^ (unit - 1); u < pl.b; u += unit {
		if u >= pl.ws && u+unit <= pl.we {
			continue
		}
		switch src, _ := im.unitSource(pl, u); src {
		case srcZero:
		case srcParent:
			if im.needsChain(pl, u) {
				return false // compose reports it
			}
		default:
			return false
		}
	}
	return true
}

// compose builds the bytes [pl.a, pl.b) of a cluster: the written data
// where the write covers it, the unit's old content elsewhere.
func (im *image) compose(pl *cplan, p []byte) ([]byte, error) {
	buf := make([]byte, pl.b-pl.a)
	return buf, im.composeInto(buf, pl, p)
}

// composeInto is compose into buf (pl.b-pl.a bytes). Old data of an
// encrypted image is decrypted.
func (im *image) composeInto(buf []byte, pl *cplan, p []byte) error {
	var dec []byte
	unit := im.scSize
	if !im.ext || pl.oldE&oflagCompressed != 0 {
		unit = im.cs
	}
	// Units are walked from their aligned starts: an encrypted write's
	// range is widened to sectors only, so pl.a may fall inside a unit.
	for u0 := pl.a &^ (unit - 1); u0 < pl.b; u0 += unit {
		u, ue := max(u0, pl.a), min(u0+unit, pl.b)
		// Parts of [u, ue) not covered by [ws, we).
		var holes [2][2]int64
		nh := 0
		if u < pl.ws {
			holes[nh] = [2]int64{u, min(ue, pl.ws)}
			nh++
		}
		if ue > pl.we {
			holes[nh] = [2]int64{max(u, pl.we), ue}
			nh++
		}
		if nh == 0 {
			continue
		}
		src, hostOff := im.unitSource(pl, u0)
		for _, h := range holes[:nh] {
			dst := buf[h[0]-pl.a : h[1]-pl.a]
			switch src {
			case srcZero:
				clear(dst)
			case srcParent:
				// Zeros: no backing file, past the end of the disk, or a
				// unit that stays unallocated (its bytes do not count).
				// fillRange made the write cover any other one whole.
				if im.needsChain(pl, u0) && pl.vstart+h[0] < im.sizeShared() {
					return driver.Errorf(errFillMissed, im.name, pl.vstart+h[0], "internal error")
				}
				clear(dst)
			case srcHost:
				if err := im.readData(dst, hostOff+(h[0]-u0), pl.vstart+h[0]); err != nil {
					return err
				}
			case srcComp:
				if dec == nil {
					dec = make([]byte, im.cs)
					if err := im.decompressCluster(dec, pl.freeComp); err != nil {
						return err
					}
				}
				copy(dst, dec[h[0]:h[1]])
			}
		}
	}
	copy(buf[pl.ws-pl.a:], p[pl.pOff:pl.pOff+pl.we-pl.ws])
	return nil
}

// unitSource says where the old content of the unit at in-cluster offset u
// comes from.
func (im *image) unitSource(pl *cplan, u int64) (int, int64) {
	e, bm := pl.oldE, pl.oldBm
	if e&oflagCompressed != 0 {
		return srcComp, 0
	}
	o := int64(e & offMask)
	hasHost := o != 0 || (im.extData && e&oflagCopied != 0)
	if !im.ext {
		switch {
		case e&oflagZero != 0:
			return srcZero, 0
		case hasHost:
			return srcHost, o
		}
		return srcParent, 0
	}
	sc := u >> im.scBits
	switch {
	case bm&(1<<sc) != 0:
		return srcHost, o + u
	case bm&(1<<(32+sc)) != 0:
		return srcZero, 0
	}
	return srcParent, 0
}

// needsChain reports whether the unallocated unit at in-cluster offset u
// becomes allocated by the write while the image records a backing file:
// its unwritten bytes would have to come from the chain.
func (im *image) needsChain(pl *cplan, u int64) bool {
	if !im.backed() {
		return false
	}
	if !im.ext {
		return true
	}
	return pl.newBm&(1<<(u>>im.scBits)) != 0
}

func (im *image) sizeShared() int64 {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.size
}

// commitPlans points the L2 entries at the written data and drops the
// references the old entries held. Callers hold mu.
func (im *image) commitPlans(l1i int64, plans []cplan) error {
	any := false
	for i := range plans {
		if plans[i].changed || plans[i].freeHost >= 0 || plans[i].hasFreeCmp {
			any = true
			break
		}
	}
	if !any {
		return nil
	}
	l2off, err := im.l2Offset(l1i)
	if err != nil {
		return err
	}
	t, err := im.loadL2(l2off)
	if err != nil {
		return err
	}
	for i := range plans {
		pl := &plans[i]
		if !pl.changed {
			continue
		}
		ci := (pl.vstart >> im.cbits) & (im.l2n - 1)
		im.setEntry(t.buf, ci, pl.newE, pl.newBm)
		t.dirty = true
		pl.alloc = false
	}
	for i := range plans {
		pl := &plans[i]
		if pl.freeHost >= 0 {
			if err := im.addRef(pl.freeHost>>im.cbits, -1, 0); err != nil {
				return err
			}
		}
		if pl.hasFreeCmp {
			if err := im.releaseCompressed(pl.freeComp); err != nil {
				return err
			}
		}
	}
	im.shrinkCaches()
	return nil
}

// releaseCompressed drops the references of a compressed cluster's bytes.
func (im *image) releaseCompressed(desc uint64) error {
	off, n := im.compressedRange(desc)
	first := (off &^ 511) >> im.cbits
	last := ((off &^ 511) + ((n + (off & 511) + 511) &^ 511) - 1) >> im.cbits
	for c := first; c <= last; c++ {
		if err := im.addRef(c, -1, 0); err != nil {
			return err
		}
	}
	im.invalidateDecompressed()
	return nil
}

// compressedClusters returns the host clusters a compressed descriptor's
// data occupies (as refcounts account for it).
func (im *image) compressedClusters(desc uint64) (first, last int64) {
	off, n := im.compressedRange(desc)
	start := off &^ 511
	end := start + ((n + (off & 511) + 511) &^ 511)
	return start >> im.cbits, (end - 1) >> im.cbits
}

// l2ForWrite returns the L2 table for L1 index l1i ready to be modified:
// allocated, and not shared with a snapshot. Callers hold mu.
func (im *image) l2ForWrite(l1i int64) (*table, error) {
	old, err := im.l2Offset(l1i)
	if err != nil {
		return nil, err
	}
	e := im.l1[l1i]
	if old != 0 && e&oflagCopied != 0 {
		return im.loadL2(old)
	}
	var src []byte
	if old != 0 {
		ot, err := im.loadL2(old)
		if err != nil {
			return nil, err
		}
		src = append([]byte(nil), ot.buf...)
	}
	s, _, err := im.allocRun(1)
	if err != nil {
		return nil, err
	}
	off := s << im.cbits
	t := &table{off: off, buf: make([]byte, im.cs), dirty: true}
	if src != nil {
		copy(t.buf, src)
	}
	im.l2c.add(t)
	im.setL1(l1i, uint64(off)|oflagCopied)
	im.metaSet[s] = metaL2
	if old != 0 {
		delete(im.metaSet, old>>im.cbits)
		if err := im.addRef(old>>im.cbits, -1, 0); err != nil {
			return nil, err
		}
	}
	return t, nil
}

// setL1 changes an active L1 entry.
func (im *image) setL1(i int64, v uint64) {
	im.l1[i] = v
	im.l1Dirty[i*8/im.cs] = true
}
