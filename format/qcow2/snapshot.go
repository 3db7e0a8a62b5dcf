package qcow2

import (
	"encoding/binary"
	"strconv"
	"time"

	"github.com/vdisk/vdisk/driver"
)

// snapshot is one entry of the snapshot table.
type snapshot struct {
	l1Offset    uint64
	l1Size      uint32
	id, name    string
	dateSec     uint32
	dateNsec    uint32
	vmClockNsec uint64
	vmStateSize uint64
	diskSize    uint64
	icount      uint64
	hasICount   bool
	// extra is the entry's whole extra data, preserved when rewriting.
	extra []byte
}

// entrySize is the size of the snapshot's table entry.
func (s *snapshot) entrySize() int64 {
	return (40 + int64(len(s.extra)) + int64(len(s.id)) + int64(len(s.name)) + 7) &^ 7
}

func (im *image) snapTableSize() int64 {
	var n int64
	for i := range im.snaps {
		n += im.snaps[i].entrySize()
	}
	return n
}

// loadSnapshots reads and validates the snapshot table.
func (im *image) loadSnapshots() error {
	h := im.hdr
	off := int64(h.snapshotsOffset)
	fsize := im.fileEnd
	var total int64
	im.snaps = nil
	for i := uint32(0); i < h.nbSnapshots; i++ {
		var hb [40]byte
		if off+40 > fsize {
			return driver.Corruptf(im.name, off, "snapshot table entry %d past the end of the file", i)
		}
		if err := driver.ReadFullAt(im.f, hb[:], off); err != nil {
			return driver.Corruptf(im.name, off, "cannot read snapshot table entry %d: %v", i, err)
		}
		s := snapshot{
			l1Offset:    be64(hb[0:]),
			l1Size:      be32(hb[8:]),
			dateSec:     be32(hb[16:]),
			dateNsec:    be32(hb[20:]),
			vmClockNsec: be64(hb[24:]),
			vmStateSize: uint64(be32(hb[32:])),
		}
		idLen := int64(binary.BigEndian.Uint16(hb[12:]))
		nameLen := int64(binary.BigEndian.Uint16(hb[14:]))
		extraLen := int64(be32(hb[36:]))
		if extraLen > maxSnapshotExtra {
			return driver.Corruptf(im.name, off, "snapshot %d has %d bytes of extra data (at most %d)", i, extraLen, maxSnapshotExtra)
		}
		rest := extraLen + idLen + nameLen
		if off+40+rest > fsize {
			return driver.Corruptf(im.name, off, "snapshot table entry %d past the end of the file", i)
		}
		rb := make([]byte, rest)
		if err := driver.ReadFullAt(im.f, rb, off+40); err != nil {
			return driver.Corruptf(im.name, off, "cannot read snapshot table entry %d: %v", i, err)
		}
		s.extra = rb[:extraLen]
		s.id = string(rb[extraLen : extraLen+idLen])
		s.name = string(rb[extraLen+idLen:])
		if extraLen >= 8 {
			s.vmStateSize = be64(s.extra)
		}
		if extraLen >= 16 {
			s.diskSize = be64(s.extra[8:])
		} else {
			s.diskSize = uint64(im.size)
		}
		if extraLen >= 24 {
			s.icount, s.hasICount = be64(s.extra[16:]), true
		}
		if int64(s.l1Size) > maxL1Bytes/8 {
			return driver.Corruptf(im.name, off, "snapshot %q has an L1 table of %d entries (at most %d)", s.name, s.l1Size, maxL1Bytes/8)
		}
		if s.l1Size > 0 {
			if err := im.checkTable("L1 table of snapshot "+s.name, off, s.l1Offset, int64(s.l1Size)*8, fsize); err != nil {
				return err
			}
		}
		total += s.entrySize()
		if total > maxSnapshotTable {
			return driver.Corruptf(im.name, int64(h.snapshotsOffset), "snapshot table larger than %d bytes", maxSnapshotTable)
		}
		im.snaps = append(im.snaps, s)
		off += s.entrySize()
	}
	return nil
}

// readL1 reads an inactive L1 table.
func (im *image) readL1(off uint64, n uint32) ([]uint64, error) {
	raw := make([]byte, int64(n)*8)
	if err := driver.ReadFullAt(im.f, raw, int64(off)); err != nil {
		return nil, driver.Corruptf(im.name, int64(off), "cannot read L1 table: %v", err)
	}
	out := make([]uint64, n)
	for i := range out {
		out[i] = be64(raw[i*8:])
	}
	return out, nil
}

// Snapshots lists the internal snapshots.
func (im *image) Snapshots() ([]driver.Snapshot, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	out := make([]driver.Snapshot, 0, len(im.snaps))
	for _, s := range im.snaps {
		out = append(out, driver.Snapshot{
			ID:          s.id,
			Name:        s.name,
			VMStateSize: int64(s.vmStateSize),
			DateSec:     int64(s.dateSec),
			DateNsec:    int64(s.dateNsec),
			VMClockSec:  int64(s.vmClockNsec / 1e9),
			VMClockNsec: int64(s.vmClockNsec % 1e9),
			ICount:      int64(s.icount),
		})
	}
	return out, nil
}

// findSnapshot returns the index of the snapshot whose ID or name is key.
func (im *image) findSnapshot(key string) int {
	for i := range im.snaps {
		if im.snaps[i].id == key {
			return i
		}
	}
	for i := range im.snaps {
		if im.snaps[i].name == key {
			return i
		}
	}
	return -1
}

// snapshotL1 finds the snapshot whose ID or name is key and reads its L1
// table. Callers hold mu.
func (im *image) snapshotL1(key string) (int, []uint64, error) {
	i := im.findSnapshot(key)
	if i < 0 {
		return -1, nil, driver.Errorf(driver.ErrNotFound, im.name, -1, "no snapshot %q", key)
	}
	l1, err := im.readL1(im.snaps[i].l1Offset, im.snaps[i].l1Size)
	if err != nil {
		return -1, nil, err
	}
	return i, l1, nil
}

// snapshotOp runs a snapshot operation with the image to itself.
func (im *image) snapshotOp(fn func() error) error {
	if err := im.beginOp(); err != nil {
		return err
	}
	defer im.unlockOps()
	if err := im.cwErrLocked(); err != nil {
		return err
	}
	if im.extData {
		return driver.Unsupportedf(im.name, "internal snapshots are not supported with an external data file")
	}
	// Start from a state where everything is on disk.
	if err := im.flushLocked(false); err != nil {
		return err
	}
	if err := fn(); err != nil {
		return err
	}
	return im.flushLocked(false)
}

// refTree changes by delta the refcount of every L2 table and data cluster
// an L1 table references. Callers hold mu.
func (im *image) refTree(l1 []uint64, delta int64) error {
	for i, e := range l1 {
		o := int64(e & offMask)
		if o == 0 {
			continue
		}
		if o%im.cs != 0 {
			return driver.Corruptf(im.name, -1, "L1 entry %d (%#x) is not cluster aligned", i, e)
		}
		t, err := im.loadL2(o)
		if err != nil {
			return err
		}
		// Collect first: addRef may load refcount blocks, never L2 tables,
		// but keep the table bytes stable anyway.
		var refs []int64
		for j := int64(0); j < im.l2n; j++ {
			e2, _ := im.entry(t.buf, j)
			switch {
			case e2&oflagCompressed != 0:
				first, last := im.compressedClusters(e2 &^ (oflagCompressed | oflagCopied))
				for c := first; c <= last; c++ {
					refs = append(refs, c)
				}
			case e2&offMask != 0:
				refs = append(refs, int64(e2&offMask)>>im.cbits)
			}
		}
		for _, c := range refs {
			if err := im.addRef(c, delta, 0); err != nil {
				return err
			}
		}
		if err := im.addRef(o>>im.cbits, delta, 0); err != nil {
			return err
		}
		im.shrinkCaches()
	}
	return nil
}

// refTreeFits reports an error when adding one reference to everything l1
// references would overflow a refcount. Callers hold mu.
func (im *image) refTreeFits(l1 []uint64) error {
	adds := map[int64]uint64{}
	for _, e := range l1 {
		o := int64(e & offMask)
		if o == 0 {
			continue
		}
		adds[o>>im.cbits]++
		t, err := im.loadL2(o)
		if err != nil {
			return err
		}
		for j := int64(0); j < im.l2n; j++ {
			e2, _ := im.entry(t.buf, j)
			switch {
			case e2&oflagCompressed != 0:
				first, last := im.compressedClusters(e2 &^ (oflagCompressed | oflagCopied))
				for c := first; c <= last; c++ {
					adds[c]++
				}
			case e2&offMask != 0:
				adds[int64(e2&offMask)>>im.cbits]++
			}
		}
		im.shrinkCaches()
	}
	for c, n := range adds {
		r, err := im.refcount(c)
		if err != nil {
			return err
		}
		if r+n > im.refMax || r+n < r {
			return driver.Unsupportedf(im.name, "cluster %d would need a refcount of %d, more than refcount_bits=%d allows", c, r+n, 1<<im.rorder)
		}
	}
	return nil
}

// fixCopied sets the copied flags of the active L1 table and of the L2
// tables it references from the refcounts. Tables shared with a snapshot
// are updated in place too, as qemu does: the flags only matter as seen
// from the active table. Callers hold mu.
func (im *image) fixCopied() error {
	for i, e := range im.l1 {
		o := int64(e & offMask)
		if o == 0 {
			continue
		}
		ref, err := im.refcount(o >> im.cbits)
		if err != nil {
			return err
		}
		ne := e &^ oflagCopied
		if ref == 1 {
			ne |= oflagCopied
		}
		if ne != e {
			im.setL1(int64(i), ne)
		}
		t, err := im.loadL2(o)
		if err != nil {
			return err
		}
		for j := int64(0); j < im.l2n; j++ {
			e2, bm := im.entry(t.buf, j)
			if e2&oflagCompressed != 0 || e2&offMask == 0 {
				continue
			}
			r2, err := im.refcount(int64(e2&offMask) >> im.cbits)
			if err != nil {
				return err
			}
			n2 := e2 &^ oflagCopied
			if r2 == 1 {
				n2 |= oflagCopied
			}
			if n2 != e2 {
				im.setEntry(t.buf, j, n2, bm)
				t.dirty = true
			}
		}
		im.shrinkCaches()
	}
	return nil
}

// encodeSnapshots serializes a snapshot table.
func encodeSnapshots(snaps []snapshot) []byte {
	var b []byte
	for i := range snaps {
		s := &snaps[i]
		e := make([]byte, 40)
		binary.BigEndian.PutUint64(e[0:], s.l1Offset)
		binary.BigEndian.PutUint32(e[8:], s.l1Size)
		binary.BigEndian.PutUint16(e[12:], uint16(len(s.id)))
		binary.BigEndian.PutUint16(e[14:], uint16(len(s.name)))
		binary.BigEndian.PutUint32(e[16:], s.dateSec)
		binary.BigEndian.PutUint32(e[20:], s.dateNsec)
		binary.BigEndian.PutUint64(e[24:], s.vmClockNsec)
		binary.BigEndian.PutUint32(e[32:], uint32(min(s.vmStateSize, 0xffffffff)))
		binary.BigEndian.PutUint32(e[36:], uint32(len(s.extra)))
		e = append(e, s.extra...)
		e = append(e, s.id...)
		e = append(e, s.name...)
		for len(e)%8 != 0 {
			e = append(e, 0)
		}
		b = append(b, e...)
	}
	return b
}

// writeSnapshotTable writes snaps to new clusters, switches the header to
// them and frees the old table. Everything the new table references must
// be durable already. Callers hold mu.
func (im *image) writeSnapshotTable(snaps []snapshot) error {
	buf := encodeSnapshots(snaps)
	oldOff, oldSize := int64(im.hdr.snapshotsOffset), im.snapTableSize()
	oldN := im.hdr.nbSnapshots
	var off int64
	if len(buf) > 0 {
		n := (int64(len(buf)) + im.cs - 1) / im.cs
		s, err := im.allocContig(n)
		if err != nil {
			return err
		}
		off = s << im.cbits
		if _, err := im.f.WriteAt(buf, off); err != nil {
			return err
		}
		// The refcounts of the new table, then the table itself.
		if err := im.flushLocked(false); err != nil {
			return err
		}
	}
	if err := im.f.Sync(); err != nil {
		return err
	}
	im.hdr.nbSnapshots = uint32(len(snaps))
	im.hdr.snapshotsOffset = uint64(off)
	if err := im.writeHeaderSync(true, true); err != nil {
		im.hdr.nbSnapshots, im.hdr.snapshotsOffset = oldN, uint64(oldOff)
		return err
	}
	im.snaps = snaps
	if oldN > 0 && oldSize > 0 {
		if err := im.freeClusters(oldOff>>im.cbits, (oldSize+im.cs-1)/im.cs); err != nil {
			return err
		}
	}
	im.rebuildFixed()
	return nil
}

// CreateSnapshot records the current disk content as an internal snapshot.
func (im *image) CreateSnapshot(name string) error {
	if name == "" {
		return driver.OptionErrorf("a snapshot needs a name")
	}
	return im.snapshotOp(func() error {
		for i := range im.snaps {
			if im.snaps[i].name == name {
				return driver.Errorf(driver.ErrInvalidOption, im.name, -1, "a snapshot named %q exists already", name)
			}
		}
		if len(im.snaps) >= maxSnapshots {
			return driver.Unsupportedf(im.name, "the image has the maximum of %d snapshots", maxSnapshots)
		}
		if len(name) > 65535 {
			return driver.OptionErrorf("snapshot name too long")
		}
		if err := im.refTreeFits(im.l1); err != nil {
			return err
		}
		// A copy of the active L1 table.
		var l1Off int64
		if n := int64(len(im.l1)); n > 0 {
			s, err := im.allocContig((n*8 + im.cs - 1) / im.cs)
			if err != nil {
				return err
			}
			l1Off = s << im.cbits
			buf := make([]byte, n*8)
			for i, e := range im.l1 {
				put64(buf[i*8:], e)
			}
			if _, err := im.f.WriteAt(buf, l1Off); err != nil {
				return err
			}
		}
		// Every table and cluster gains the snapshot's reference and so
		// loses its copied flag.
		if err := im.refTree(im.l1, 1); err != nil {
			return err
		}
		if err := im.fixCopied(); err != nil {
			return err
		}
		// Refcounts, copied flags and the L1 copy durable, then the table.
		if err := im.flushLocked(false); err != nil {
			return err
		}
		maxID := 0
		for i := range im.snaps {
			n := 0
			for _, c := range im.snaps[i].id {
				if c < '0' || c > '9' {
					n = -1
					break
				}
				n = n*10 + int(c-'0')
				if n > 1<<30 {
					break
				}
			}
			maxID = max(maxID, n)
		}
		now := time.Now()
		extra := make([]byte, 24)
		binary.BigEndian.PutUint64(extra[8:], uint64(im.size))
		sn := snapshot{
			l1Offset: uint64(l1Off), l1Size: uint32(len(im.l1)),
			id: strconv.Itoa(maxID + 1), name: name,
			dateSec: uint32(now.Unix()), dateNsec: uint32(now.Nanosecond()),
			diskSize: uint64(im.size), hasICount: true, extra: extra,
		}
		snaps := append(append([]snapshot(nil), im.snaps...), sn)
		return im.writeSnapshotTable(snaps)
	})
}

// ApplySnapshot reverts the disk to a snapshot (qemu-img snapshot -a).
func (im *image) ApplySnapshot(key string) error {
	return im.snapshotOp(func() error {
		i, snL1, err := im.snapshotL1(key)
		if err != nil {
			return err
		}
		sn := im.snaps[i]
		if err := im.refTreeFits(snL1); err != nil {
			return err
		}
		size := int64(sn.diskSize)
		need := (size + im.l2Span() - 1) / im.l2Span()
		n := max(int64(len(snL1)), need)
		// The snapshot's tables gain the active reference first.
		if err := im.refTree(snL1, 1); err != nil {
			return err
		}
		if err := im.flushLocked(false); err != nil {
			return err
		}
		oldL1 := im.l1
		newL1 := make([]uint64, n)
		copy(newL1, snL1)
		// Copied flags are only right in the active table; they are set
		// again once the refcounts are final.
		for k := range newL1 {
			newL1[k] &^= oflagCopied
		}
		oldClust := (int64(len(oldL1))*8 + im.cs - 1) / im.cs
		newClust := (n*8 + im.cs - 1) / im.cs
		if newClust > oldClust || len(oldL1) == 0 {
			// A larger L1 table goes to new clusters.
			s, err := im.allocContig(newClust)
			if err != nil {
				return err
			}
			if len(oldL1) > 0 {
				if err := im.freeClusters(int64(im.hdr.l1Offset)>>im.cbits, oldClust); err != nil {
					return err
				}
			}
			im.hdr.l1Offset = uint64(s << im.cbits)
		}
		im.l1 = newL1
		im.hdr.l1Size = uint32(n)
		for k := int64(0); k < newClust; k++ {
			im.l1Dirty[k] = true
		}
		im.size = size
		im.rebuildMeta()
		// The new L1 and the header durable, then the old tree released.
		if err := im.flushLocked(false); err != nil {
			return err
		}
		if err := im.refTree(oldL1, -1); err != nil {
			return err
		}
		// Refcount decreases durable before copied flags are set.
		if err := im.flushLocked(false); err != nil {
			return err
		}
		im.l2c = newCache(im.l2c.max)
		return im.fixCopied()
	})
}

// DeleteSnapshot removes a snapshot and frees what only it referenced.
func (im *image) DeleteSnapshot(key string) error {
	return im.snapshotOp(func() error {
		i, snL1, err := im.snapshotL1(key)
		if err != nil {
			return err
		}
		sn := im.snaps[i]
		snaps := append(append([]snapshot(nil), im.snaps[:i]...), im.snaps[i+1:]...)
		if err := im.writeSnapshotTable(snaps); err != nil {
			return err
		}
		if err := im.refTree(snL1, -1); err != nil {
			return err
		}
		if sn.l1Size > 0 {
			if err := im.freeClusters(int64(sn.l1Offset)>>im.cbits, (int64(sn.l1Size)*8+im.cs-1)/im.cs); err != nil {
				return err
			}
		}
		// Refcount decreases durable before copied flags are set.
		if err := im.flushLocked(false); err != nil {
			return err
		}
		return im.fixCopied()
	})
}

var _ driver.SnapshotOpener = (*image)(nil)

// OpenSnapshot returns a read-only image showing the snapshot with ID or
// name key. It shares the image's files: close it before the image.
func (im *image) OpenSnapshot(key string) (driver.Image, error) {
	im.drainCompressor()
	im.opMu.RLock()
	defer im.opMu.RUnlock()
	im.mu.Lock()
	defer im.mu.Unlock()
	i, l1, err := im.snapshotL1(key)
	if err != nil {
		return nil, err
	}
	sn := im.snaps[i]
	size := int64(sn.diskSize)
	if need := (size + im.l2Span() - 1) / im.l2Span(); need > int64(len(l1)) {
		return nil, driver.Corruptf(im.name, -1, "snapshot %q: its L1 table of %d entries is too small for %d bytes", sn.name, len(l1), size)
	}
	hdr := *im.hdr
	v := &image{
		name: im.name + "@" + sn.name, st: im.st, f: im.f, df: im.df, extData: im.extData, rawData: im.rawData,
		dfName: im.dfName, ro: true, log: im.log, shared: true, crypt: im.crypt,
		hdr: &hdr, size: size, l1: l1, l1Dirty: map[int64]bool{}, rt: im.rt,
		l2c: newCache(im.l2c.max), rbc: newCache(4), fileEnd: im.fileEnd, snaps: im.snaps,
	}
	v.cbits, v.cs, v.ext, v.nsc, v.scBits, v.scSize = im.cbits, im.cs, im.ext, im.nsc, im.scBits, im.scSize
	v.l2Bits, v.l2n, v.esz, v.rbBits, v.rbn, v.rorder, v.refMax = im.l2Bits, im.l2n, im.esz, im.rbBits, im.rbn, im.rorder, im.refMax
	v.cshift, v.cOffMask, v.cSecMask = im.cshift, im.cOffMask, im.cSecMask
	v.disk = im.disk
	v.rebuildMeta()
	return v, nil
}
