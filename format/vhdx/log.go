package vhdx

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"sort"

	"github.com/vdisk/vdisk/driver"
)

const (
	logSector     = 4096
	logEntryHdr   = 64
	logDescSize   = 32
	logDataBytes  = 4084
	logSigEntry   = "loge"
	logSigData    = "data"
	logSigDesc    = "desc"
	logSigZero    = "zero"
	maxCRCWorkMul = 8 // the log search checksums at most this many times the log's size
	// maxLogGrowth bounds how far past the end of the file a log entry's
	// last file offset may lie.
	maxLogGrowth = 1 << 40
)

// logDesc is one descriptor of a log entry: a 4 KiB sector of data, or a
// run of zeros, for a file offset.
type logDesc struct {
	off  int64
	zero int64  // zero descriptor: bytes of zeros
	data []byte // data descriptor: the 4096 bytes
}

// logEntry is a validated log entry.
type logEntry struct {
	pos, length     int64
	tail            int64
	seq             uint64
	flushed, last   int64
	descs           []logDesc
	descSectorCount int64
}

func descSectors(n int64) int64 { return (n + 2 + 127) / 128 }

// logReader reads the circular log held in memory.
type logReader struct {
	buf  []byte
	g    guid
	work int64 // bytes checksummed so far
}

// at returns n bytes at log position pos, wrapping around the end.
func (l *logReader) at(pos, n int64) []byte {
	size := int64(len(l.buf))
	pos %= size
	if pos+n <= size {
		return l.buf[pos : pos+n]
	}
	out := make([]byte, 0, n)
	for n > 0 {
		c := min(n, size-pos)
		out = append(out, l.buf[pos:pos+c]...)
		n -= c
		pos = 0
	}
	return out
}

// entryAt validates the entry at pos; nil when there is none.
func (l *logReader) entryAt(pos int64) *logEntry {
	size := int64(len(l.buf))
	h := l.buf[pos : pos+logEntryHdr]
	if string(h[:4]) != logSigEntry {
		return nil
	}
	e := &logEntry{pos: pos}
	e.length = int64(binary.LittleEndian.Uint32(h[8:]))
	e.tail = int64(binary.LittleEndian.Uint32(h[12:]))
	e.seq = binary.LittleEndian.Uint64(h[16:])
	nd := int64(binary.LittleEndian.Uint32(h[24:]))
	var g guid
	copy(g[:], h[32:48])
	e.flushed = int64(binary.LittleEndian.Uint64(h[48:]))
	e.last = int64(binary.LittleEndian.Uint64(h[56:]))
	if e.length <= 0 || e.length%logSector != 0 || e.length > size || e.seq == 0 || g != l.g ||
		e.tail%logSector != 0 || e.tail >= size || e.flushed < 0 || e.last < 0 {
		return nil
	}
	ds := descSectors(nd)
	if ds*logSector > e.length {
		return nil
	}
	if l.work += e.length; l.work > maxCRCWorkMul*size+16*mib {
		return nil
	}
	raw := l.at(pos, e.length)
	if binary.LittleEndian.Uint32(raw[4:]) != checksumEntry(raw) {
		return nil
	}
	e.descSectorCount = ds
	dataSec := ds
	for i := int64(0); i < nd; i++ {
		d := raw[logEntryHdr+logDescSize*i:]
		dseq := binary.LittleEndian.Uint64(d[24:])
		off := int64(binary.LittleEndian.Uint64(d[16:]))
		if dseq != e.seq || off < 0 || off%logSector != 0 {
			return nil
		}
		switch string(d[:4]) {
		case logSigZero:
			z := int64(binary.LittleEndian.Uint64(d[8:]))
			if z < 0 || z%logSector != 0 {
				return nil
			}
			e.descs = append(e.descs, logDesc{off: off, zero: z})
		case logSigDesc:
			if (dataSec+1)*logSector > e.length {
				return nil
			}
			s := raw[dataSec*logSector : (dataSec+1)*logSector]
			dataSec++
			sseq := uint64(binary.LittleEndian.Uint32(s[4:]))<<32 | uint64(binary.LittleEndian.Uint32(s[4092:]))
			if string(s[:4]) != logSigData || sseq != e.seq {
				return nil
			}
			data := make([]byte, logSector)
			copy(data[:8], d[8:16])
			copy(data[8:], s[8:4092])
			copy(data[4092:], d[4:8])
			e.descs = append(e.descs, logDesc{off: off, data: data})
		default:
			return nil
		}
	}
	return e
}

func checksumEntry(raw []byte) uint32 { return checksum(raw, 4) }

// findSequence returns the entries of the active log sequence, oldest
// first ([MS-VHDX] 2.3.3): the chain of consecutive valid entries (each
// starting where the previous one ends, sequence numbers increasing by
// one) whose last entry has the highest sequence number, replayed from
// the entry its tail points at (or from the chain's start when the tail
// points elsewhere, as qemu replays).
func findSequence(buf []byte, g guid) []*logEntry {
	l := &logReader{buf: buf, g: g}
	size := int64(len(buf))
	byPos := map[int64]*logEntry{}
	var all []*logEntry
	for pos := int64(0); pos+logEntryHdr <= size; pos += logSector {
		if e := l.entryAt(pos); e != nil {
			byPos[pos] = e
			all = append(all, e)
		}
	}
	if len(all) == 0 {
		return nil
	}
	next := func(e *logEntry) *logEntry {
		n := byPos[(e.pos+e.length)%size]
		if n != nil && n.seq == e.seq+1 {
			return n
		}
		return nil
	}
	prev := map[*logEntry]*logEntry{}
	for _, e := range all {
		if n := next(e); n != nil && prev[n] == nil {
			prev[n] = e
		}
	}
	// The head: the entry with the highest sequence number that has no
	// successor.
	sort.Slice(all, func(a, b int) bool { return all[a].seq > all[b].seq })
	var head *logEntry
	for _, e := range all {
		if next(e) == nil {
			head = e
			break
		}
	}
	if head == nil {
		return nil // a cycle of consecutive sequence numbers: impossible
	}
	chain := []*logEntry{head}
	for e := head; e.pos != head.tail; {
		p := prev[e]
		if p == nil || len(chain) > len(all) {
			break
		}
		chain = append(chain, p)
		e = p
	}
	for i, j := 0, len(chain)-1; i < j; i, j = i+1, j-1 {
		chain[i], chain[j] = chain[j], chain[i]
	}
	return chain
}

// patch is a replayed log write kept in memory (read-only opens).
type patch struct {
	off, n int64
	data   []byte // nil for zeros
}

// overlay is the file as it reads after replaying the log in memory.
type overlay struct {
	r       io.ReaderAt
	size    int64 // the file's size
	patches []patch
}

func (o *overlay) ReadAt(p []byte, off int64) (int, error) {
	n := len(p)
	if off >= o.size {
		clear(p)
	} else {
		c := min(int64(n), o.size-off)
		if err := readFull(o.r, p[:c], off); err != nil {
			return 0, err
		}
		clear(p[c:])
	}
	end := off + int64(n)
	for _, pt := range o.patches {
		lo, hi := max(pt.off, off), min(pt.off+pt.n, end)
		if lo >= hi {
			continue
		}
		if pt.data == nil {
			clear(p[lo-off : hi-off])
		} else {
			copy(p[lo-off:hi-off], pt.data[lo-pt.off:hi-pt.off])
		}
	}
	return n, nil
}

func readFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// logWrite is one 4 KiB page of metadata to write through the log.
type logWrite struct {
	off  int64
	data []byte
}

// maxLogWrites is how many pages one entry of a log of size bytes holds.
func maxLogWrites(size int64) int {
	sectors := size / logSector
	n := sectors - 1
	for n > 0 && n+descSectors(n) > sectors {
		n--
	}
	return int(n)
}

// encodeEntry builds a log entry writing ws (all-zero pages become zero
// descriptors).
func encodeEntry(seq uint64, tail int64, g guid, flushed, last int64, ws []logWrite) []byte {
	nd := int64(len(ws))
	ndata := int64(0)
	for _, w := range ws {
		if !isZero(w.data) {
			ndata++
		}
	}
	ds := descSectors(nd)
	length := (ds + ndata) * logSector
	b := make([]byte, length)
	copy(b, logSigEntry)
	binary.LittleEndian.PutUint32(b[8:], uint32(length))
	binary.LittleEndian.PutUint32(b[12:], uint32(tail))
	binary.LittleEndian.PutUint64(b[16:], seq)
	binary.LittleEndian.PutUint32(b[24:], uint32(nd))
	copy(b[32:], g[:])
	binary.LittleEndian.PutUint64(b[48:], uint64(flushed))
	binary.LittleEndian.PutUint64(b[56:], uint64(last))
	sec := ds
	for i, w := range ws {
		d := b[logEntryHdr+logDescSize*i:]
		binary.LittleEndian.PutUint64(d[16:], uint64(w.off))
		binary.LittleEndian.PutUint64(d[24:], seq)
		if isZero(w.data) {
			copy(d, logSigZero)
			binary.LittleEndian.PutUint64(d[8:], logSector)
			continue
		}
		copy(d, logSigDesc)
		copy(d[4:8], w.data[4092:])
		copy(d[8:16], w.data[:8])
		s := b[sec*logSector : (sec+1)*logSector]
		sec++
		copy(s, logSigData)
		binary.LittleEndian.PutUint32(s[4:], uint32(seq>>32))
		copy(s[8:4092], w.data[8:4092])
		binary.LittleEndian.PutUint32(s[4092:], uint32(seq))
	}
	binary.LittleEndian.PutUint32(b[4:], crc32.Checksum(b, castagnoli))
	return b
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// replayRange checks that a replayed descriptor stays inside the file
// (as the log's entry says it may grow), outside the headers and outside
// the log itself.
func (im *image) replayRange(off, n, limit int64) error {
	if off < region1Off || n < 0 || off > limit || n > limit-off {
		return im.corrupt(im.logOff, "the log writes %d bytes at %d, outside the %d-byte file", n, off, limit)
	}
	if off < im.logOff+im.logLen && im.logOff < off+n {
		return im.corrupt(im.logOff, "the log writes %d bytes at %d, into the log itself", n, off)
	}
	return nil
}

// replay applies the active log sequence: to the file when writable,
// else into an overlay the image reads through. It returns whether the
// log held entries.
func (im *image) replay(fsize int64) (bool, error) {
	h := &im.hdr
	if h.logGUID.isZero() || h.logLength == 0 {
		return false, nil
	}
	if im.logLen > maxLogSize {
		return false, driver.Unsupportedf(im.name, "a %d-byte log needs replaying; at most %d bytes are supported", im.logLen, int64(maxLogSize))
	}
	buf := make([]byte, im.logLen)
	if err := readFull(im.f, buf, im.logOff); err != nil {
		return false, fmt.Errorf("%s: reading the log: %w", im.name, err)
	}
	seq := findSequence(buf, h.logGUID)
	if len(seq) == 0 {
		return false, nil
	}
	headEnt := seq[len(seq)-1]
	im.logSeq = headEnt.seq
	if headEnt.flushed > fsize {
		return false, im.corrupt(im.logOff+headEnt.pos, "the log says the file was at least %d bytes, but it is %d bytes: the file was truncated", headEnt.flushed, fsize)
	}
	// The entry may grow the file to its last file offset (a crash can
	// lose extensions not yet synced), but not without bound.
	if headEnt.last > fsize+maxLogGrowth {
		return false, im.corrupt(im.logOff+headEnt.pos, "the log says the file was %d bytes, far past its %d bytes", headEnt.last, fsize)
	}
	limit := max(fsize, roundUp(headEnt.last, mib))
	for _, e := range seq {
		for _, d := range e.descs {
			n := d.zero
			if d.data != nil {
				n = logSector
			}
			if err := im.replayRange(d.off, n, limit); err != nil {
				return false, err
			}
		}
	}
	if im.ro {
		ov := &overlay{r: im.f, size: fsize}
		for _, e := range seq {
			for _, d := range e.descs {
				if d.data != nil {
					ov.patches = append(ov.patches, patch{d.off, logSector, d.data})
				} else if d.zero > 0 {
					ov.patches = append(ov.patches, patch{d.off, d.zero, nil})
				}
			}
		}
		ov.size = max(fsize, headEnt.last)
		im.r = ov
		im.replayedInMemory = true
		return true, nil
	}
	for _, e := range seq {
		for _, d := range e.descs {
			var err error
			if d.data != nil {
				_, err = im.f.WriteAt(d.data, d.off)
			} else if d.off < fsize {
				// Past the end of the file the growth below reads zeros.
				err = writeZeros(im.f, d.off, min(d.zero, fsize-d.off))
			}
			if err != nil {
				return false, err
			}
		}
	}
	if fsize < headEnt.last {
		if err := im.f.Truncate(roundUp(headEnt.last, mib)); err != nil {
			return false, err
		}
	}
	if err := im.f.Sync(); err != nil {
		return false, err
	}
	// The log is applied: an empty log (zero GUID) in the next header.
	nh := *h
	nh.logGUID = guid{}
	if err := im.writeHeader(nh); err != nil {
		return false, err
	}
	return true, im.f.Sync()
}

// commit writes the dirty metadata pages through the log: each batch is
// one entry at the start of the log (everything logged before has been
// applied and synced), synced, then applied in place and synced, so a
// crash at any point leaves either the old metadata or an entry that
// replays to the new. Called with mu held. Close without a Flush (an
// unsafe cache mode, qemu-img convert's default) commits with unsynced
// set: the same writes without the syncs, as the caller asked for no
// durability; it reports whether it wrote anything.
func (im *image) commitLocked() error {
	_, err := im.commitMode(false)
	return err
}

func (im *image) commitMode(unsynced bool) (bool, error) {
	sync := func() error {
		if unsynced {
			return nil
		}
		return im.f.Sync()
	}
	ws := im.dirtyPagesLocked()
	if len(ws) == 0 {
		return false, nil
	}
	if sz, err := im.f.Size(); err != nil {
		return true, err
	} else if sz < im.fileEnd {
		// Every block the metadata will point at lies inside the file.
		if err := im.f.Truncate(im.fileEnd); err != nil {
			return true, err
		}
	}
	if err := im.startSessionLocked(); err != nil {
		return true, err
	}
	// Data first: the blocks the new entries point at are durable before
	// the log says so.
	if err := sync(); err != nil {
		return true, err
	}
	size, err := im.f.Size()
	if err != nil {
		return true, err
	}
	per := maxLogWrites(im.logLen)
	if per <= 0 {
		return true, driver.Unsupportedf(im.name, "the %d-byte log is too small for a log entry", im.logLen)
	}
	for len(ws) > 0 {
		n := min(per, len(ws))
		batch := ws[:n]
		ws = ws[n:]
		im.logSeq++
		ent := encodeEntry(im.logSeq, 0, im.hdr.logGUID, size, size, batch)
		if _, err := im.f.WriteAt(ent, im.logOff); err != nil {
			return true, err
		}
		if err := sync(); err != nil {
			return true, err
		}
		for _, w := range batch {
			if _, err := im.f.WriteAt(w.data, w.off); err != nil {
				return true, err
			}
		}
		if err := sync(); err != nil {
			return true, err
		}
	}
	im.clearDirtyLocked()
	return true, im.punchPendingLocked()
}
