package vmdk

import (
	"encoding/binary"
	"runtime"
	"slices"
	"sync"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/deflate"
)

// Grains are compressed by internal/deflate with the full 32 KiB window.
// On a 2 GiB ext4 image of /usr/share and a Go toolchain the image is
// 334,430,720 bytes, qemu-img's (zlib's default level) 334,497,792;
// klauspost's zlib made 334,921,728 at level 8 (and more at 6 and 9).

// streamWriter fills a stream-optimized image front to back: grains are
// compressed in parallel and written in submission order, each behind a
// grain marker; Close appends the grain tables, the grain directory, the
// footer and the end-of-stream marker.
type streamWriter struct {
	im    *image
	sp    *sparse
	f     driver.File
	name  string
	grain int64
	size  int64
	hdr   header

	jobs  chan *sjob
	slots chan struct{}
	outs  chan []byte // sector-padded grain buffers for reuse
	wg    sync.WaitGroup

	mu    sync.Mutex
	cond  *sync.Cond
	next  int64 // sequence number of the next submission
	done  int64 // sequence number of the next job to store
	ready map[int64]*sjob
	err   error
	lastG int64  // last grain submitted (-1 none)
	cur   []byte // the grain WriteAt is filling
	curG  int64  // its index (-1 none)
	pos   int64  // file offset of the next write (writer goroutine)
	fin   bool
}

type sjob struct {
	seq, g  int64
	data    []byte // the grain: a copy, or lent (release set)
	n       int
	out     []byte
	release func() // gives a lent data back once compressed
}

// createStream writes the header and descriptor of a new stream-optimized
// image and returns it open for sequential filling.
func createStream(p *driver.CreateParams, f driver.File, size int64, desc []byte, zeroed bool) (*image, error) {
	h, _, _, _ := sparseLayout(size, zeroed, true)
	h.flags &^= flagRGD
	h.rgdOffset = 0
	h.descSize = uint64((len(desc) + sectorSize - 1) / sectorSize)
	h.gdOffset = gdAtEnd
	h.overhead = h.descOffset + h.descSize
	head := make([]byte, int64(h.overhead)*sectorSize)
	copy(head, h.encode())
	copy(head[sectorSize:], desc)
	if _, err := f.WriteAt(head, 0); err != nil {
		return nil, driver.WithFile(err, "create", p.Name)
	}
	if err := f.Truncate(int64(len(head))); err != nil {
		return nil, driver.WithFile(err, "create", p.Name)
	}
	sp := &sparse{f: f, name: p.Name, h: h, grain: defaultGrain, gtes: createGTEs, capacity: size,
		compressed: true, markers: true, zeroGrain: zeroed, gts: map[int64][]uint32{}, fileSize: int64(len(head))}
	sp.gd = make([]uint32, (size+sp.grain*sp.gtes-1)/(sp.grain*sp.gtes))
	sp.end = int64(len(head))
	d, err := parseDescriptor(desc, p.Name, sectorSize)
	if err != nil {
		return nil, err
	}
	im := &image{st: p.Storage, name: p.Name, log: p.Logger, main: f,
		files: map[string]driver.File{p.Name: f}, desc: d, descEmbed: true, descOff: sectorSize,
		descCap: int64(h.descSize) * sectorSize, cidDone: true, size: size}
	if err := im.readDescKeys(); err != nil {
		return nil, err
	}
	im.exts = []*extent{{line: extentLine{access: "RW", sectors: size / sectorSize, kind: "SPARSE", file: p.Name},
		size: size, path: p.Name, f: f, sp: sp}}
	sw := &streamWriter{im: im, sp: sp, f: f, name: p.Name, grain: sp.grain, size: size, hdr: h,
		ready: map[int64]*sjob{}, lastG: -1, curG: -1, pos: int64(len(head))}
	sw.cond = sync.NewCond(&sw.mu)
	n := runtime.GOMAXPROCS(0)
	// About 2 MiB of grains in flight, enough to keep every core busy:
	// more only raises the heap (and peak RSS) of a convert.
	slots := min(max(int(2<<20/sw.grain), 2*n+2), 4*n+16)
	sw.jobs = make(chan *sjob, slots)
	sw.slots = make(chan struct{}, slots)
	sw.outs = make(chan []byte, slots+n)
	for range n {
		sw.wg.Add(1)
		go sw.worker()
	}
	sw.wg.Add(1)
	go sw.writer()
	im.stream = sw
	return im, nil
}

// StreamOnly reports whether the image is a stream-optimized image being
// written (it can only be filled front to back).
func (im *image) StreamOnly() bool { return im.stream != nil }

// CompressedUnit is one grain.
func (im *image) CompressedUnit() int64 {
	if c := im.clusterSize(); c > 0 {
		return c
	}
	return defaultGrain
}

// WriteCompressed stores one grain compressed. Only a stream-optimized
// image being written accepts it, in increasing offset order.
func (im *image) WriteCompressed(p []byte, off int64) error {
	return im.writeCompressed(p, off, nil)
}

// WriteCompressedLent is WriteCompressed without the copy of p: the
// compressing worker reads p itself and calls release once it has
// compressed it. See driver.CompressedLender.
func (im *image) WriteCompressedLent(p []byte, off int64, release func()) error {
	return im.writeCompressed(p, off, release)
}

// writeCompressed queues p, copied when release is nil, else lent.
func (im *image) writeCompressed(p []byte, off int64, release func()) error {
	if im.stream == nil {
		return driver.Errorf(driver.ErrUnsupported, im.name, off, "compressed grains can only be written to a new streamOptimized image")
	}
	sw := im.stream
	if err := driver.CheckRange(im.name, off, int64(len(p)), im.size); err != nil {
		return err
	}
	if off%sw.grain != 0 || len(p) == 0 || (int64(len(p)) != sw.grain && off+int64(len(p)) != sw.size) {
		return driver.Errorf(driver.ErrInvalidOption, im.name, off, "compressed writes take whole grains (%d bytes at a grain boundary)", sw.grain)
	}
	sw.mu.Lock()
	defer sw.mu.Unlock()
	g := off / sw.grain
	if sw.curG >= 0 && sw.curG != g {
		if err := sw.flushCurLocked(); err != nil {
			return err
		}
	}
	sw.curG = -1
	return sw.submitLocked(g, p, release)
}

func (sw *streamWriter) order(off int64) error {
	return driver.Errorf(driver.ErrUnsupported, sw.name, off,
		"a streamOptimized image is written front to back; this write goes back before offset %d", (sw.lastG+1)*sw.grain)
}

// submitLocked queues grain g: a copy of p, or p itself when lent
// (release not nil). Called with mu held; drops it while waiting for a
// free slot.
func (sw *streamWriter) submitLocked(g int64, p []byte, release func()) error {
	if sw.err != nil {
		return sw.err
	}
	if sw.fin {
		return driver.Errorf(driver.ErrInvalidOption, sw.name, g*sw.grain, "image is closed")
	}
	if g <= sw.lastG {
		return sw.order(g * sw.grain)
	}
	sw.lastG = g
	seq := sw.next
	sw.next++
	j := &sjob{seq: seq, g: g, data: p, n: len(p), release: release}
	if release == nil {
		j.data = make([]byte, sw.grain)
		copy(j.data, p)
	}
	sw.mu.Unlock()
	sw.slots <- struct{}{}
	sw.jobs <- j
	sw.mu.Lock()
	return nil
}

// flushCurLocked submits the grain WriteAt was filling, unless all zero.
func (sw *streamWriter) flushCurLocked() error {
	if sw.curG < 0 {
		return nil
	}
	g := sw.curG
	sw.curG = -1
	n := min(sw.grain, sw.size-g*sw.grain)
	if driver.IsZero(sw.cur[:n]) {
		return nil
	}
	return sw.submitLocked(g, sw.cur[:n], nil)
}

// writeAt accepts plain writes in increasing grain order, buffering the
// current grain.
func (sw *streamWriter) writeAt(p []byte, off int64) error {
	sw.mu.Lock()
	defer sw.mu.Unlock()
	for len(p) > 0 {
		g, in := off/sw.grain, off%sw.grain
		k := min(int64(len(p)), sw.grain-in)
		if g != sw.curG {
			if g <= sw.lastG || (sw.curG >= 0 && g < sw.curG) {
				return sw.order(off)
			}
			if err := sw.flushCurLocked(); err != nil {
				return err
			}
			if sw.cur == nil {
				sw.cur = make([]byte, sw.grain)
			}
			clear(sw.cur)
			sw.curG = g
		}
		copy(sw.cur[in:], p[:k])
		p = p[k:]
		off += k
	}
	return nil
}

// writeZeroes is a no-op ahead of the stream (unwritten grains read as
// zeros); it clears the buffered grain, and refuses to go back.
func (sw *streamWriter) writeZeroes(off, n int64) error {
	sw.mu.Lock()
	defer sw.mu.Unlock()
	end := off + n
	if sw.curG >= 0 {
		gs := sw.curG * sw.grain
		if off < gs+sw.grain && end > gs {
			clear(sw.cur[max(off, gs)-gs : min(end, gs+sw.grain)-gs])
		}
	}
	// Grains already submitted that the range touches must be unwritten.
	for g := off / sw.grain; g <= sw.lastG && g*sw.grain < end; g++ {
		if g == sw.curG {
			continue
		}
		v, err := sw.sp.gte(g)
		if err != nil {
			return err
		}
		if v != 0 || g == sw.lastG {
			return sw.order(off)
		}
	}
	return nil
}

func (sw *streamWriter) worker() {
	defer sw.wg.Done()
	var zw deflate.Encoder
	var marker [12]byte
	for j := range sw.jobs {
		// A 12-byte grain marker, then the zlib stream, padded to a
		// whole sector.
		b := zw.CompressZlib(append(sw.outBuf(), marker[:]...), j.data[:j.n])
		binary.LittleEndian.PutUint64(b, uint64(j.g*sw.grain/sectorSize))
		binary.LittleEndian.PutUint32(b[8:], uint32(len(b)-12))
		pad := (sectorSize - len(b)%sectorSize) % sectorSize
		b = append(b, make([]byte, pad)...)
		j.out, j.data = b, nil
		if j.release != nil {
			j.release()
		}
		sw.mu.Lock()
		sw.ready[j.seq] = j
		sw.cond.Broadcast()
		sw.mu.Unlock()
	}
}

// outBuf returns an empty buffer for a compressed grain, reused when
// one is free; its capacity holds a grain that does not shrink (which
// comes out a little longer than the grain).
func (sw *streamWriter) outBuf() []byte {
	select {
	case b := <-sw.outs:
		return b[:0]
	default:
	}
	return make([]byte, 0, int(sw.grain)+2*sectorSize)
}

func (sw *streamWriter) putOut(b []byte) {
	select {
	case sw.outs <- b:
	default:
	}
}

func (sw *streamWriter) writer() {
	defer sw.wg.Done()
	for {
		sw.mu.Lock()
		for sw.ready[sw.done] == nil && !(sw.fin && sw.done == sw.next) {
			sw.cond.Wait()
		}
		j := sw.ready[sw.done]
		if j == nil {
			sw.mu.Unlock()
			return
		}
		delete(sw.ready, sw.done)
		failed := sw.err != nil
		sw.mu.Unlock()
		var err error
		if !failed {
			if _, err = sw.f.WriteAt(j.out, sw.pos); err == nil {
				sp := sw.sp
				sp.mu.Lock()
				gi := j.g / sp.gtes
				t := sp.gts[gi]
				if t == nil {
					t = make([]uint32, sp.gtes)
					sp.gts[gi] = t
				}
				t[j.g%sp.gtes] = uint32(sw.pos / sectorSize)
				sw.pos += int64(len(j.out))
				sp.end = sw.pos
				sp.mu.Unlock()
			}
		}
		sw.putOut(j.out)
		j.out = nil
		<-sw.slots
		sw.mu.Lock()
		if err != nil && sw.err == nil {
			sw.err = driver.WithFile(err, "write", sw.name)
		}
		sw.done++
		sw.cond.Broadcast()
		sw.mu.Unlock()
	}
}

// wait blocks until every submitted grain is stored; it reports the first
// error of the pipeline.
func (sw *streamWriter) wait() error {
	sw.mu.Lock()
	defer sw.mu.Unlock()
	for sw.done < sw.next && sw.err == nil {
		sw.cond.Wait()
	}
	for sw.done < sw.next {
		sw.cond.Wait()
	}
	return sw.err
}

// finish stores the buffered grain, drains the pipeline and writes the
// grain tables, directory, footer and end-of-stream marker.
func (sw *streamWriter) finish() error {
	sw.mu.Lock()
	err := sw.flushCurLocked()
	sw.mu.Unlock()
	if werr := sw.wait(); err == nil {
		err = werr
	}
	sw.mu.Lock()
	sw.fin = true
	sw.cond.Broadcast()
	sw.mu.Unlock()
	close(sw.jobs)
	sw.wg.Wait()
	if err != nil {
		return err
	}
	return sw.writeMetadata()
}

func marker(val uint64, typ uint32) []byte {
	b := make([]byte, sectorSize)
	binary.LittleEndian.PutUint64(b, val)
	binary.LittleEndian.PutUint32(b[12:], typ)
	return b
}

func (sw *streamWriter) writeMetadata() error {
	sp := sw.sp
	var out []byte
	pos := sw.pos
	gtSectors := (sp.gtBytes() + sectorSize - 1) / sectorSize
	keys := make([]int64, 0, len(sp.gts))
	for k := range sp.gts {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, gi := range keys {
		out = append(out, marker(uint64(gtSectors), markerGT)...)
		sp.gd[gi] = uint32((pos + int64(len(out))) / sectorSize)
		gt := make([]byte, gtSectors*sectorSize)
		for j, v := range sp.gts[gi] {
			binary.LittleEndian.PutUint32(gt[j*4:], v)
		}
		out = append(out, gt...)
	}
	gdSectors := (int64(len(sp.gd))*4 + sectorSize - 1) / sectorSize
	out = append(out, marker(uint64(gdSectors), markerGD)...)
	gdOff := (pos + int64(len(out))) / sectorSize
	gd := make([]byte, gdSectors*sectorSize)
	for i, v := range sp.gd {
		binary.LittleEndian.PutUint32(gd[i*4:], v)
	}
	out = append(out, gd...)
	out = append(out, marker(1, markerFooter)...)
	fh := sw.hdr
	fh.gdOffset = uint64(gdOff)
	out = append(out, fh.encode()...)
	out = append(out, make([]byte, sectorSize)...) // end-of-stream marker
	if _, err := sw.f.WriteAt(out, pos); err != nil {
		return driver.WithFile(err, "write", sw.name)
	}
	end := pos + int64(len(out))
	if err := sw.f.Truncate(end); err != nil {
		return driver.WithFile(err, "truncate", sw.name)
	}
	sp.mu.Lock()
	sp.end, sp.fileSize = end, end
	sp.mu.Unlock()
	return nil
}
