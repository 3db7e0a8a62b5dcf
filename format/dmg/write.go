package dmg

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"hash/crc32"
	"io"
	"runtime"
	"sync"

	"github.com/dsnet/compress/bzip2"
	"github.com/klauspost/compress/flate"

	"github.com/vdisk/vdisk/driver"
)

// unitSize is the chunk size of new images: 2048 sectors, as Apple's and
// libdmg's writers use. A variable so tests can make tiny seeds.
var unitSize int64 = 1 << 20

// zeroGranule is the piece size in which uncompressed images (UDRO, UDRW)
// look for zeros to store as zero-fill chunks.
const zeroGranule = 4096

// defaultZlibLevel is the zlib level of UDZO chunks unless zlib-level
// says otherwise: 1, as hdiutil writes UDZO by default (its -imagekey
// zlib-level). On text-like data klauspost's level 1 takes about half the
// CPU time of its level 6 for an output a few percent larger.
const defaultZlibLevel = 1

// bzip2Level is the bzip2 block size (in 100 kB) of UDBZ chunks.
const bzip2Level = 9

// wholeDiskName names the single blkx table of a new image, as libdmg
// names a disk without a partition map it knows.
const wholeDiskName = "whole disk (unknown partition : 0)"

// entireDevice is the mish block descriptor of a table covering the whole
// device.
const entireDevice = 0xfffffffe

func create(ctx context.Context, p *driver.CreateParams) (driver.Image, error) {
	if p.ParentRef != nil {
		return nil, driver.Unsupportedf(p.Name, "DMG images have no backing files")
	}
	size := (p.Size + sectorSize - 1) &^ (sectorSize - 1)
	if size < 0 || size/sectorSize > maxSectors {
		return nil, driver.OptionErrorf("size %d is too large for a DMG", p.Size)
	}
	sub := p.Options.String("subformat")
	if sub == "" {
		sub = "UDZO"
	}
	flag := driver.ReadWrite | driver.Create | driver.Truncate
	if !p.Overwrite {
		flag |= driver.Excl
	}
	f, err := p.Storage.Open(p.Name, flag)
	if err != nil {
		return nil, driver.WithFile(err, "create", p.Name)
	}
	if err := f.Truncate(0); err != nil {
		f.Close()
		return nil, driver.WithFile(err, "create", p.Name)
	}
	level := int(p.Options.Int("zlib-level"))
	if level == 0 {
		level = defaultZlibLevel
	}
	im := &image{f: f, name: p.Name, size: size}
	im.w = newWriter(im, sub, level)
	return im, nil
}

// writer fills a new image front to back: units are compressed on every
// core and stored in submission order; finish writes the block map, the
// property list and the trailer.
type writer struct {
	f     driver.File
	name  string
	size  int64
	unit  int64
	sub   string
	level int // zlib level (UDZO)

	jobs  chan *wjob
	slots chan struct{}
	wg    sync.WaitGroup
	// Free lists of unit-sized buffers: the units being compressed and
	// their compressed bytes waiting to be stored. At most slots of each
	// are in use, and they live as long as the writer (a sync.Pool would
	// drop them at every GC, and fresh megabytes cost page faults).
	bufs, outs freeList

	mu      sync.Mutex
	cond    *sync.Cond
	next    int64 // sequence number of the next submission
	done    int64 // sequence number of the next job to store
	ready   map[int64]*wjob
	err     error
	lastEnd int64  // virtual end of the last unit submitted
	cur     []byte // the unit WriteAt is filling
	curU    int64  // its index (-1 none)
	fin     bool
	ended   bool // finish ran

	// Owned by the storing goroutine (and by finish once it ended).
	pos     int64 // file offset of the next stored byte
	stored  int64 // virtual end of what is stored
	chunks  []rawChunk
	dataCRC uint32 // CRC-32 of the data fork
	diskCRC uint32 // CRC-32 of the virtual disk up to stored
}

type wjob struct {
	seq  int64
	off  int64
	data []byte
	buf  *[]byte // pooled backing of data, or nil when lent
	// release gives lent data back once stored.
	release func()
	cbuf    *[]byte // pooled backing of the compressed piece, or nil
	crc     uint32
	out     []piece
}

// piece is one chunk of a unit: zero-fill (no bytes), raw or compressed.
type piece struct {
	typ   uint32
	off   int64
	n     int64
	bytes []byte
}

func newWriter(im *image, sub string, level int) *writer {
	w := &writer{f: im.f, name: im.name, size: im.size, unit: unitSize, sub: sub, level: level, ready: map[int64]*wjob{}, curU: -1}
	w.cond = sync.NewCond(&w.mu)
	n := runtime.GOMAXPROCS(0)
	slots := 2*n + 4
	w.jobs = make(chan *wjob, slots)
	w.slots = make(chan struct{}, slots)
	w.bufs = freeList{c: make(chan *[]byte, slots), size: w.unit}
	w.outs = freeList{c: make(chan *[]byte, slots), size: w.unit}
	for range n {
		w.wg.Add(1)
		go w.worker()
	}
	w.wg.Add(1)
	go w.store()
	return w
}

// StreamOnly reports whether the image is being written (front to back).
func (im *image) StreamOnly() bool { return im.w != nil }

// CompressedUnit is one chunk.
func (im *image) CompressedUnit() int64 {
	if im.w != nil {
		return im.w.unit
	}
	return unitSize
}

var _ driver.CompressedLender = (*image)(nil)

// WriteCompressed stores one unit; units arrive in increasing order and
// the ranges between them become zero-fill chunks.
func (im *image) WriteCompressed(p []byte, off int64) error {
	return im.writeCompressed(p, off, nil)
}

// WriteCompressedLent is WriteCompressed without the copy of p: the
// pipeline works on p itself and calls release once the unit is stored
// (or its store failed). See driver.CompressedLender.
func (im *image) WriteCompressedLent(p []byte, off int64, release func()) error {
	return im.writeCompressed(p, off, release)
}

// writeCompressed queues p, copied when release is nil, else lent.
func (im *image) writeCompressed(p []byte, off int64, release func()) error {
	w := im.w
	if w == nil {
		return driver.Errorf(driver.ErrReadOnly, im.name, off, "DMG images are read-only once written")
	}
	if err := driver.CheckRange(im.name, off, int64(len(p)), im.size); err != nil {
		return err
	}
	if off%w.unit != 0 || len(p) == 0 || (int64(len(p)) != w.unit && off+int64(len(p)) != w.size) {
		return driver.Errorf(driver.ErrInvalidOption, im.name, off, "compressed writes take whole chunks (%d bytes at a chunk boundary)", w.unit)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	u := off / w.unit
	if w.curU >= 0 && w.curU != u {
		if err := w.flushCurLocked(); err != nil {
			return err
		}
	}
	w.curU = -1
	return w.submitLocked(off, p, release)
}

func (w *writer) order(off int64) error {
	return driver.Errorf(driver.ErrUnsupported, w.name, off,
		"a DMG is written front to back; this write goes back before offset %d", w.lastEnd)
}

// submitLocked queues the unit at off. Called with mu held; drops it while
// waiting for a free slot. p is copied, or kept when lent (release not
// nil).
func (w *writer) submitLocked(off int64, p []byte, release func()) error {
	if w.err != nil {
		return w.err
	}
	if w.fin {
		return driver.Errorf(driver.ErrClosed, w.name, off, "image is closed")
	}
	if off < w.lastEnd {
		return w.order(off)
	}
	w.lastEnd = off + int64(len(p))
	seq := w.next
	w.next++
	j := &wjob{seq: seq, off: off, data: p, release: release}
	if release == nil {
		j.buf = w.bufs.get()
		j.data = (*j.buf)[:len(p)]
		copy(j.data, p)
	}
	w.mu.Unlock()
	w.slots <- struct{}{}
	w.jobs <- j
	w.mu.Lock()
	return nil
}

// flushCurLocked submits the unit WriteAt was filling, unless all zero.
func (w *writer) flushCurLocked() error {
	if w.curU < 0 {
		return nil
	}
	u := w.curU
	w.curU = -1
	n := min(w.unit, w.size-u*w.unit)
	if driver.IsZero(w.cur[:n]) {
		return nil
	}
	return w.submitLocked(u*w.unit, w.cur[:n], nil)
}

// writeAt accepts plain writes in increasing order, buffering the current
// unit.
func (w *writer) writeAt(p []byte, off int64) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	for len(p) > 0 {
		u, in := off/w.unit, off%w.unit
		k := min(int64(len(p)), w.unit-in)
		if u != w.curU {
			if u*w.unit < w.lastEnd || (w.curU >= 0 && u < w.curU) {
				return w.order(off)
			}
			if err := w.flushCurLocked(); err != nil {
				return err
			}
			if w.cur == nil {
				w.cur = make([]byte, w.unit)
			}
			clear(w.cur)
			w.curU = u
		}
		copy(w.cur[in:], p[:k])
		p = p[k:]
		off += k
	}
	return nil
}

// writeZeroes is a no-op ahead of the stream (unwritten ranges read as
// zeros); it clears the buffered unit and refuses to go back.
func (w *writer) writeZeroes(off, n int64) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	end := off + n
	if w.curU >= 0 {
		us := w.curU * w.unit
		if off < us+w.unit && end > us {
			clear(w.cur[max(off, us)-us : min(end, us+w.unit)-us])
		}
	}
	if off < w.lastEnd {
		return w.order(off)
	}
	return nil
}

func (w *writer) worker() {
	defer w.wg.Done()
	var zc *zlibChunker
	var bw *bzip2.Writer
	var buf bytes.Buffer
	for j := range w.jobs {
		j.crc = crc32.ChecksumIEEE(j.data)
		n := int64(len(j.data))
		switch w.sub {
		case "UDZO", "UDBZ":
			buf.Reset()
			typ := uint32(typeZlib)
			var err error
			if w.sub == "UDZO" {
				if zc == nil {
					zc, err = newZlibChunker(w.level)
				}
				if err == nil {
					err = zc.compress(&buf, j.data)
				}
			} else {
				typ = typeBzip2
				if bw == nil {
					bw, err = bzip2.NewWriter(&buf, &bzip2.WriterConfig{Level: bzip2Level})
				} else {
					err = bw.Reset(&buf)
				}
				if err == nil {
					if _, err = bw.Write(j.data); err == nil {
						err = bw.Close()
					}
				}
			}
			if err == nil && int64(buf.Len()) < n {
				// The compressed bytes go to a pooled buffer (a unit's
				// worth: they are shorter), handed back once stored.
				cb := w.outs.get()
				j.cbuf = cb
				out := (*cb)[:copy(*cb, buf.Bytes())]
				j.out = []piece{{typ: typ, off: j.off, n: n, bytes: out}}
			} else {
				// Incompressible (or the compressor failed): store raw,
				// as Apple's tools do.
				j.out = []piece{{typ: typeRaw, off: j.off, n: n, bytes: j.data}}
			}
		case "UDRW":
			j.out = []piece{{typ: typeRaw, off: j.off, n: n, bytes: j.data}}
		default:
			j.out = splitZeros(j.off, j.data)
		}
		w.mu.Lock()
		w.ready[j.seq] = j
		w.cond.Broadcast()
		w.mu.Unlock()
	}
}

// splitZeros cuts uncompressed data into raw pieces and zero-fill pieces
// (all-zero runs of whole granules).
func splitZeros(off int64, data []byte) []piece {
	var out []piece
	for p := 0; p < len(data); {
		q := min(len(data), p+zeroGranule)
		zero := driver.IsZero(data[p:q])
		typ := uint32(typeRaw)
		if zero {
			typ = typeZero
		}
		if k := len(out) - 1; k >= 0 && out[k].typ == typ {
			out[k].n += int64(q - p)
		} else {
			out = append(out, piece{typ: typ, off: off + int64(p), n: int64(q - p)})
		}
		p = q
	}
	for i := range out {
		if out[i].typ == typeRaw {
			s := out[i].off - off
			out[i].bytes = data[s : s+out[i].n]
		}
	}
	return out
}

// store writes finished jobs in submission order.
func (w *writer) store() {
	defer w.wg.Done()
	for {
		w.mu.Lock()
		for w.ready[w.done] == nil && !(w.fin && w.done == w.next) {
			w.cond.Wait()
		}
		j := w.ready[w.done]
		if j == nil {
			w.mu.Unlock()
			return
		}
		delete(w.ready, w.done)
		failed := w.err != nil
		w.mu.Unlock()
		var err error
		if !failed {
			err = w.storeJob(j)
		}
		if j.release != nil {
			j.release()
		} else {
			w.bufs.put(j.buf)
		}
		if j.cbuf != nil {
			w.outs.put(j.cbuf)
		}
		<-w.slots
		w.mu.Lock()
		if err != nil && w.err == nil {
			w.err = driver.WithFile(err, "write", w.name)
		}
		w.done++
		w.cond.Broadcast()
		w.mu.Unlock()
	}
}

func (w *writer) storeJob(j *wjob) error {
	if j.off > w.stored {
		w.addZeros(w.stored, j.off-w.stored)
	}
	for _, pc := range j.out {
		if pc.typ == typeZero {
			w.addChunk(typeZero, pc.off, pc.n, 0)
			continue
		}
		if _, err := w.f.WriteAt(pc.bytes, w.pos); err != nil {
			return err
		}
		w.dataCRC = crc32.Update(w.dataCRC, crc32.IEEETable, pc.bytes)
		w.addChunk(pc.typ, pc.off, pc.n, int64(len(pc.bytes)))
	}
	n := int64(len(j.data))
	w.diskCRC = crcCombine(w.diskCRC, j.crc, n)
	w.stored = j.off + n
	return nil
}

// addZeros records a gap between stored units: a zero-fill chunk, or for
// UDRW (linear: every sector at its own offset) raw chunks over a hole of
// the file.
func (w *writer) addZeros(off, n int64) {
	if w.sub == "UDRW" {
		for p, end := off, off+n; p < end; {
			k := min(w.unit-p%w.unit, end-p)
			w.addChunk(typeRaw, p, k, k)
			p += k
		}
		w.dataCRC = crcZeros(w.dataCRC, n)
	} else {
		w.addChunk(typeZero, off, n, 0)
	}
	w.diskCRC = crcZeros(w.diskCRC, n)
	w.stored = off + n
}

// addChunk appends a chunk whose stored bytes (length) were just written
// at pos; zero-fill chunks that touch merge.
func (w *writer) addChunk(typ uint32, off, n, length int64) {
	if k := len(w.chunks) - 1; typ == typeZero && k >= 0 && w.chunks[k].typ == typeZero &&
		int64(w.chunks[k].sector+w.chunks[k].count)*sectorSize == off {
		w.chunks[k].count += uint64(n / sectorSize)
		return
	}
	w.chunks = append(w.chunks, rawChunk{typ: typ, sector: uint64(off / sectorSize), count: uint64(n / sectorSize),
		offset: uint64(w.pos), length: uint64(length)})
	w.pos += length
}

// wait blocks until every submitted unit is stored and reports the first
// error of the pipeline.
func (w *writer) wait() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	for w.done < w.next {
		w.cond.Wait()
	}
	return w.err
}

// finish stores the buffered unit, drains the pipeline and writes the
// metadata.
func (w *writer) finish() error {
	w.mu.Lock()
	if w.ended {
		w.mu.Unlock()
		return nil
	}
	err := w.flushCurLocked()
	w.mu.Unlock()
	if werr := w.wait(); err == nil {
		err = werr
	}
	w.mu.Lock()
	w.fin, w.ended = true, true
	w.cond.Broadcast()
	w.mu.Unlock()
	close(w.jobs)
	w.wg.Wait()
	if err != nil {
		return err
	}
	return w.writeMetadata()
}

// writeMetadata appends the property list (one blkx table for the whole
// disk) and the trailer with its checksums.
func (w *writer) writeMetadata() error {
	if w.stored < w.size {
		w.addZeros(w.stored, w.size-w.stored)
	}
	sectors := w.size / sectorSize
	w.chunks = append(w.chunks, rawChunk{typ: typeTerminator, sector: uint64(sectors), offset: uint64(w.pos)})
	m := mish{
		count:      sectors,
		buffers:    uint32(w.unit/sectorSize + 8),
		descriptor: entireDevice,
		checksum:   crcChecksum(w.diskCRC),
		chunks:     w.chunks,
	}
	xml := writePlist([]blkxEntry{{name: wholeDiskName, data: m.encode()}})
	var be [4]byte
	binary.BigEndian.PutUint32(be[:], w.diskCRC)
	k := koly{
		version: 4, headerSize: kolySize, flags: flagFlattened,
		dataForkLength: uint64(w.pos),
		segmentNumber:  1, segmentCount: 1,
		dataChecksum: crcChecksum(w.dataCRC),
		xmlOffset:    uint64(w.pos), xmlLength: uint64(len(xml)),
		masterChecksum: crcChecksum(crc32.ChecksumIEEE(be[:])),
		variant:        variantDevice,
		sectorCount:    uint64(sectors),
	}
	rand.Read(k.segmentID[:])
	out := append(xml, k.encode()...)
	if _, err := w.f.WriteAt(out, w.pos); err != nil {
		return driver.WithFile(err, "write", w.name)
	}
	if err := w.f.Truncate(w.pos + int64(len(out))); err != nil {
		return driver.WithFile(err, "truncate", w.name)
	}
	return nil
}

// freeList keeps up to cap(c) buffers of size bytes for reuse.
type freeList struct {
	c    chan *[]byte
	size int64
}

func (l *freeList) get() *[]byte {
	select {
	case b := <-l.c:
		return b
	default:
		b := make([]byte, l.size)
		return &b
	}
}

func (l *freeList) put(b *[]byte) {
	select {
	case l.c <- b:
	default:
	}
}

// zlibChunker compresses units into zlib streams (see adler.go).
type zlibChunker struct {
	fw  *flate.Writer
	hdr [2]byte
}

func newZlibChunker(level int) (*zlibChunker, error) {
	fw, err := flate.NewWriter(io.Discard, level)
	if err != nil {
		return nil, err
	}
	return &zlibChunker{fw: fw, hdr: zlibHeader(level)}, nil
}

// compress appends the zlib stream of data to buf.
func (z *zlibChunker) compress(buf *bytes.Buffer, data []byte) error {
	buf.Write(z.hdr[:])
	z.fw.Reset(buf)
	if _, err := z.fw.Write(data); err != nil {
		return err
	}
	if err := z.fw.Close(); err != nil {
		return err
	}
	var sum [4]byte
	binary.BigEndian.PutUint32(sum[:], adler32Update(1, data))
	buf.Write(sum[:])
	return nil
}
