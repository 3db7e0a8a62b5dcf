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
	maxCRCWorkMul = 2 // the log search checksums at most this many times the log's size
	// maxLogGrowth bounds how far past the end of the file a log entry's
	// last file offset may lie.
	maxLogGrowth = 1 << 40
)

// logDesc is one descriptor of a log entry: a 4 KiB sector of data, or a
// run of zeros, for a file offset. A data descriptor's sector stays in
// the log (read again when it is applied), so replay memory does not grow
// with the log's size.
type logDesc struct {
	off     int64
	zero    int64 // zero descriptor: bytes of zeros
	dataPos int64 // data descriptor: the data sector's log position; -1 for zeros
	head    [8]byte
	tail    [4]byte
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

// maxReplayDescs bounds the descriptors kept while searching a log (a
// 4 GiB log of data sectors has a million; zero descriptors could claim
// 128 per sector).
const maxReplayDescs = 1 << 22

// logReader reads the circular log from the file.
type logReader struct {
	r     io.ReaderAt
	base  int64 // the log's file offset
	size  int64
	g     guid
	work  int64 // bytes checksummed so far
	descs int64 // descriptors kept so far
	err   error // the first read error, or too many descriptors
}

// at reads n bytes at log position pos, wrapping around the end.
func (l *logReader) at(pos, n int64) []byte {
	out := make([]byte, n)
	l.readAt(out, pos)
	return out
}

func (l *logReader) readAt(p []byte, pos int64) {
	pos %= l.size
	for len(p) > 0 {
		c := min(int64(len(p)), l.size-pos)
		if err := readFull(l.r, p[:c], l.base+pos); err != nil && l.err == nil {
			l.err = err
		}
		p = p[c:]
		pos = 0
	}
}

// sector rebuilds the 4 KiB a data descriptor writes.
func (l *logReader) sector(d *logDesc) ([]byte, error) {
	// A data sector never wraps (the log is whole sectors); reading it
	// touches no shared state, so overlay reads may run concurrently.
	data := make([]byte, logSector)
	if err := readFull(l.r, data, l.base+d.dataPos); err != nil {
		return nil, err
	}
	copy(data[:8], d.head[:])
	copy(data[4092:], d.tail[:])
	return data, nil
}

// entryAt validates the entry at pos; nil when there is none.
func (l *logReader) entryAt(pos int64) *logEntry {
	size := l.size
	h := l.at(pos, logEntryHdr)
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
	// The checksum covers the whole entry, its own field taken as zero;
	// streamed in pieces.
	crc := uint32(0)
	piece := make([]byte, min(e.length, mib))
	for done := int64(0); done < e.length; {
		c := min(int64(len(piece)), e.length-done)
		l.readAt(piece[:c], pos+done)
		if done == 0 {
			clear(piece[4:8])
		}
		crc = crc32.Update(crc, castagnoli, piece[:c])
		done += c
	}
	if l.err != nil || binary.LittleEndian.Uint32(h[4:]) != crc {
		return nil
	}
	e.descSectorCount = ds
	dataSec := ds
	dsec := make([]byte, logSector)
	sh := make([]byte, logSector)
	for i := int64(0); i < nd; i++ {
		// Descriptor i lives in descriptor sector (64+32i)/4096.
		at := logEntryHdr + logDescSize*i
		if at%logSector == 0 || i == 0 {
			l.readAt(dsec, pos+at/logSector*logSector)
		}
		d := dsec[at%logSector:]
		dseq := binary.LittleEndian.Uint64(d[24:])
		off := int64(binary.LittleEndian.Uint64(d[16:]))
		if dseq != e.seq || off < 0 || off%logSector != 0 {
			return nil
		}
		if l.descs++; l.descs > maxReplayDescs {
			if l.err == nil {
				l.err = fmt.Errorf("the log holds more than %d descriptors", maxReplayDescs)
			}
			return nil
		}
		switch string(d[:4]) {
		case logSigZero:
			z := int64(binary.LittleEndian.Uint64(d[8:]))
			if z < 0 || z%logSector != 0 {
				return nil
			}
			e.descs = append(e.descs, logDesc{off: off, zero: z, dataPos: -1})
		case logSigDesc:
			if (dataSec+1)*logSector > e.length {
				return nil
			}
			spos := (pos + dataSec*logSector) % size
			dataSec++
			l.readAt(sh, spos)
			sseq := uint64(binary.LittleEndian.Uint32(sh[4:]))<<32 | uint64(binary.LittleEndian.Uint32(sh[4092:]))
			if string(sh[:4]) != logSigData || sseq != e.seq {
				return nil
			}
			ld := logDesc{off: off, dataPos: spos}
			copy(ld.head[:], d[8:16])
			copy(ld.tail[:], d[4:8])
			e.descs = append(e.descs, ld)
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
func findSequence(l *logReader) ([]*logEntry, error) {
	size := l.size
	byPos := map[int64]*logEntry{}
	var all []*logEntry
	// Scan a window at a time for entry headers; validate candidates.
	win := make([]byte, min(size, 4*mib))
	for wpos := int64(0); wpos < size; wpos += int64(len(win)) {
		w := win[:min(int64(len(win)), size-wpos)]
		l.readAt(w, wpos)
		if l.err != nil {
			return nil, l.err
		}
		for o := int64(0); o+logEntryHdr <= int64(len(w)); o += logSector {
			if string(w[o:o+4]) != logSigEntry || string(w[o+32:o+48]) != string(l.g[:]) {
				continue
			}
			if e := l.entryAt(wpos + o); e != nil {
				byPos[wpos+o] = e
				all = append(all, e)
			}
			if l.err != nil {
				return nil, l.err
			}
		}
	}
	if len(all) == 0 {
		return nil, nil
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
		return nil, nil // a cycle of consecutive sequence numbers: impossible
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
	return chain, nil
}

// patch is a replayed log write applied in memory (read-only opens).
type patch struct {
	off, n int64
	desc   *logDesc // nil for zeros
}

// overlay is the file as it reads after replaying the log in memory: data
// descriptors are read from the log when a read covers them.
type overlay struct {
	r       io.ReaderAt
	log     *logReader
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
		if pt.desc == nil {
			clear(p[lo-off : hi-off])
			continue
		}
		data, err := o.log.sector(pt.desc)
		if err != nil {
			return 0, err
		}
		copy(p[lo-off:hi-off], data[lo-pt.off:hi-pt.off])
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
	lr := &logReader{r: im.f, base: im.logOff, size: im.logLen, g: h.logGUID}
	seq, err := findSequence(lr)
	if err != nil {
		return false, fmt.Errorf("%s: reading the log: %w", im.name, err)
	}
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
			if d.dataPos >= 0 {
				n = logSector
			}
			if err := im.replayRange(d.off, n, limit); err != nil {
				return false, err
			}
		}
	}
	if im.ro {
		ov := &overlay{r: im.f, log: lr, size: fsize}
		for _, e := range seq {
			for i := range e.descs {
				d := &e.descs[i]
				if d.dataPos >= 0 {
					ov.patches = append(ov.patches, patch{d.off, logSector, d})
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
			if d.dataPos >= 0 {
				var data []byte
				if data, err = lr.sector(&d); err == nil {
					_, err = im.f.WriteAt(data, d.off)
				}
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
