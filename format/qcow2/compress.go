package qcow2

import (
	"errors"
	"runtime"
	"sync"

	"github.com/klauspost/compress/zstd"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/deflate"
)

// CompressedWriter is implemented by images that store whole clusters
// compressed (qcow2; `convert -c`).
//
// WriteCompressed stores p at off compressed. off must be a multiple of
// CompressedUnit() and p one unit long, or shorter when it ends at the end
// of the disk. Clusters that do not shrink are stored uncompressed. The
// call may return before the data is stored: compression runs in parallel
// on all cores and the results are written in the order of the calls, so
// a sequential caller gets a sequentially written, densely packed file.
// Any other operation on the image (and Flush, which also reports errors of
// earlier WriteCompressed calls) waits for pending compressed writes
// first. p may be reused as soon as the call returns.
type CompressedWriter interface {
	CompressedUnit() int64
	WriteCompressed(p []byte, off int64) error
}

var (
	_ CompressedWriter        = (*image)(nil)
	_ driver.CompressedLender = (*image)(nil)
)

// cjob is one cluster on its way through the pipeline.
type cjob struct {
	seq  int64
	off  int64  // guest offset
	data []byte // the cluster: a pipeline buffer, or lent (release set)
	out  []byte // compressed bytes; nil when the cluster does not shrink
	// release gives data back to the caller of WriteCompressedLent.
	release func()
}

// compWriter is the compressed write pipeline: WriteCompressed submits
// jobs, workers compress them in parallel, and one writer goroutine stores
// them in submission order.
type compWriter struct {
	im       *image
	jobs     chan *cjob
	slots    chan struct{} // bounds the clusters held by the pipeline
	mu       sync.Mutex
	cond     *sync.Cond
	next     int64 // sequence number of the next submission
	done     int64 // sequence number of the next job to store
	ready    map[int64]*cjob
	inflight sync.WaitGroup
	err      error
	stopped  bool
	wg       sync.WaitGroup
	free     chan []byte // cluster buffers for reuse (a sync.Pool loses them at every GC)
	wbuf     []byte      // the writer's scratch for joining contiguous clusters
}

// CompressedUnit is the unit of WriteCompressed: one cluster.
func (im *image) CompressedUnit() int64 { return im.cs }

// WriteCompressed queues p (one cluster at a cluster-aligned offset) to be
// stored compressed. See CompressedWriter.
func (im *image) WriteCompressed(p []byte, off int64) error {
	return im.writeCompressed(p, off, nil)
}

// WriteCompressedLent is WriteCompressed without the copy of p: the
// pipeline works on p itself and calls release once the cluster is
// stored (or its store failed). See driver.CompressedLender.
func (im *image) WriteCompressedLent(p []byte, off int64, release func()) error {
	return im.writeCompressed(p, off, release)
}

// writeCompressed queues p, copied into one of the pipeline's buffers
// when release is nil, else lent until release is called. A cluster
// shorter than cs (the disk's last) is always copied: it is compressed
// zero-padded to a whole cluster.
func (im *image) writeCompressed(p []byte, off int64, release func()) error {
	if err := im.beginWrite(off); err != nil {
		return err
	}
	if im.extData {
		return driver.Unsupportedf(im.name, "compressed clusters are not supported with an external data file")
	}
	if im.crypt != nil {
		return driver.Unsupportedf(im.name, "compression and encryption are not supported at the same time")
	}
	size := im.Size()
	if err := driver.CheckRange(im.name, off, int64(len(p)), size); err != nil {
		return err
	}
	if off%im.cs != 0 || (int64(len(p)) != im.cs && off+int64(len(p)) != size) || len(p) == 0 {
		return driver.Errorf(driver.ErrInvalidOption, im.name, off, "compressed writes take whole clusters (%d bytes at a cluster boundary)", im.cs)
	}
	cw := im.compressor()
	cw.mu.Lock()
	if cw.err != nil {
		err := cw.err
		cw.mu.Unlock()
		return err
	}
	seq := cw.next
	cw.next++
	cw.inflight.Add(1)
	cw.mu.Unlock()
	cw.slots <- struct{}{}
	j := &cjob{seq: seq, off: off, data: p, release: release}
	if release == nil || int64(len(p)) != im.cs {
		j.data = cw.getBuf()
		copy(j.data, p)
		clear(j.data[len(p):])
		j.release = nil
		if release != nil {
			release()
		}
	}
	cw.jobs <- j
	return nil
}

// compressor returns the pipeline, starting it on first use.
func (im *image) compressor() *compWriter {
	im.cwMu.Lock()
	defer im.cwMu.Unlock()
	if im.cw != nil {
		return im.cw
	}
	n := runtime.GOMAXPROCS(0)
	// Memory: about 2 MiB of clusters in flight (each slot holds an input
	// and an output buffer), but enough to keep every core busy while the
	// writer catches up; peak RSS of a convert stays well under 64 MiB.
	slots := min(max(int(2<<20/im.cs), 2*n+2), 4*n+16)
	cw := &compWriter{im: im, jobs: make(chan *cjob, 2*n), slots: make(chan struct{}, slots), ready: map[int64]*cjob{}}
	cw.cond = sync.NewCond(&cw.mu)
	cw.free = make(chan []byte, 2*slots+n)
	for i := 0; i < n; i++ {
		cw.wg.Add(1)
		go cw.worker()
	}
	cw.wg.Add(1)
	go cw.writer()
	im.cw = cw
	return cw
}

func (cw *compWriter) getBuf() []byte {
	select {
	case b := <-cw.free:
		return b
	default:
		return make([]byte, cw.im.cs)
	}
}

func (cw *compWriter) putBuf(b []byte) {
	select {
	case cw.free <- b:
	default:
	}
}

// worker compresses jobs.
func (cw *compWriter) worker() {
	defer cw.wg.Done()
	im := cw.im
	cs := int(im.cs)
	zw := deflate.Encoder{Window: 4096}
	var zs zstdEncoders
	for j := range cw.jobs {
		var b []byte
		switch im.hdr.compressionType {
		case compressionZlib:
			// qemu inflates with a 4 KiB window: no back-reference may
			// reach further, which general deflate encoders do not offer.
			b = zw.Compress(cw.getBuf()[:0], j.data)
		case compressionZstd:
			b = zs.encode(j.data, cw.getBuf()[:0])
		}
		// A cluster that does not shrink is stored as it is (res nil).
		var res []byte
		if len(b) < cs {
			res = b
		} else if cap(b) >= cs {
			cw.putBuf(b[:cs])
		}
		j.out = res
		cw.mu.Lock()
		cw.ready[j.seq] = j
		cw.cond.Broadcast()
		cw.mu.Unlock()
	}
}

// writer stores compressed jobs in sequence order, in batches.
func (cw *compWriter) writer() {
	defer cw.wg.Done()
	const maxBatch = 64
	for {
		cw.mu.Lock()
		for cw.ready[cw.done] == nil && !cw.stopped {
			cw.cond.Wait()
		}
		if cw.ready[cw.done] == nil && cw.stopped {
			cw.mu.Unlock()
			return
		}
		var batch []*cjob
		for len(batch) < maxBatch {
			j := cw.ready[cw.done]
			if j == nil {
				break
			}
			delete(cw.ready, cw.done)
			cw.done++
			batch = append(batch, j)
		}
		failed := cw.err != nil
		cw.mu.Unlock()
		var err error
		if !failed {
			err = cw.im.storeCompressed(batch, &cw.wbuf)
		}
		for _, j := range batch {
			if j.release != nil {
				j.release()
			} else {
				cw.putBuf(j.data)
			}
			if j.out != nil && cap(j.out) >= int(cw.im.cs) {
				cw.putBuf(j.out[:cw.im.cs])
			}
		}
		cw.mu.Lock()
		if err != nil && cw.err == nil {
			cw.err = err
		}
		cw.mu.Unlock()
		for range batch {
			<-cw.slots
			cw.inflight.Done()
		}
	}
}

// drainCompressor waits until every queued compressed write is stored.
func (im *image) drainCompressor() {
	im.cwMu.Lock()
	cw := im.cw
	im.cwMu.Unlock()
	if cw != nil {
		cw.inflight.Wait()
	}
}

// stopCompressor drains and stops the pipeline.
func (im *image) stopCompressor() {
	im.cwMu.Lock()
	cw := im.cw
	im.cw = nil
	im.cwMu.Unlock()
	if cw == nil {
		return
	}
	cw.inflight.Wait()
	close(cw.jobs)
	cw.mu.Lock()
	cw.stopped = true
	cw.cond.Broadcast()
	if cw.err != nil {
		im.cwLastErr = cw.err
	}
	cw.mu.Unlock()
	cw.wg.Wait()
}

// cwErr returns (and clears) the error of an earlier compressed write.
func (im *image) cwErr() error {
	im.cwMu.Lock()
	cw := im.cw
	err := im.cwLastErr
	im.cwLastErr = nil
	im.cwMu.Unlock()
	if err != nil {
		return err
	}
	if cw == nil {
		return nil
	}
	cw.mu.Lock()
	defer cw.mu.Unlock()
	err, cw.err = cw.err, nil
	return err
}

// cwErrLocked is cwErr for callers holding mu (the pipeline never takes
// cwMu while holding mu, so the order is safe).
func (im *image) cwErrLocked() error { return im.cwErr() }

// storeCompressed stores a batch of jobs in order: runs of compressed
// clusters together, clusters that did not shrink as normal writes. scratch
// is reused between calls to join contiguous clusters into one write.
func (im *image) storeCompressed(batch []*cjob, scratch *[]byte) error {
	for len(batch) > 0 {
		if batch[0].out == nil {
			j := batch[0]
			n := min(im.cs, im.sizeShared()-j.off)
			if err := im.writeChunk(j.data[:n], j.off); err != nil {
				return err
			}
			batch = batch[1:]
			continue
		}
		k := 1
		for k < len(batch) && batch[k].out != nil {
			k++
		}
		if err := im.storeCompressedRun(batch[:k], scratch); err != nil {
			return err
		}
		batch = batch[k:]
	}
	return nil
}

// storeCompressedRun allocates space for compressed clusters, writes them
// (contiguous ones with one call) and then points their L2 entries at them.
func (im *image) storeCompressedRun(batch []*cjob, scratch *[]byte) error {
	type placed struct {
		j    *cjob
		host int64
		n    int64
	}
	var comp []placed
	im.mu.Lock()
	// L2 tables first, so that the data stays contiguous.
	for _, j := range batch {
		if _, err := im.l2ForWrite(j.off / im.l2Span()); err != nil {
			im.mu.Unlock()
			return err
		}
	}
	for _, j := range batch {
		host, err := im.allocCompressed(int64(len(j.out)))
		if err != nil {
			for _, p := range comp {
				im.unrefCompressedBytes(p.host, p.n)
			}
			im.mu.Unlock()
			return err
		}
		comp = append(comp, placed{j, host, int64(len(j.out))})
	}
	im.mu.Unlock()

	var err error
	for i := 0; i < len(comp) && err == nil; {
		k := i + 1
		end := comp[i].host + comp[i].n
		for k < len(comp) && comp[k].host == end {
			end += comp[k].n
			k++
		}
		if k == i+1 {
			_, err = im.f.WriteAt(comp[i].j.out, comp[i].host)
		} else {
			// A batch holds at most 64 clusters: the scratch buffer
			// stays bounded and is reused, so a long convert makes no
			// garbage here (which would double the heap between GCs).
			buf := (*scratch)[:0]
			for _, p := range comp[i:k] {
				buf = append(buf, p.j.out...)
			}
			*scratch = buf
			_, err = im.f.WriteAt(buf, comp[i].host)
		}
		i = k
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if err != nil {
		for _, p := range comp {
			im.unrefCompressedBytes(p.host, p.n)
		}
		return err
	}
	im.dataDirty.Store(true)
	for _, p := range comp {
		nsec := uint64(((p.host + p.n - 1) >> 9) - (p.host >> 9))
		desc := uint64(p.host) | nsec<<im.cshift | oflagCompressed
		if err := im.setEntryReplacing(p.j.off, desc, 0); err != nil {
			return err
		}
	}
	im.shrinkCaches()
	return nil
}

// setEntryReplacing sets the L2 entry of guest offset off and drops the
// references of the entry it replaces. Callers hold mu.
func (im *image) setEntryReplacing(off int64, e, bm uint64) error {
	t, err := im.l2ForWrite(off / im.l2Span())
	if err != nil {
		return err
	}
	ci := (off >> im.cbits) & (im.l2n - 1)
	old, _ := im.entry(t.buf, ci)
	im.setEntry(t.buf, ci, e, bm)
	t.dirty = true
	switch {
	case old&oflagCompressed != 0:
		return im.releaseCompressed(old &^ (oflagCompressed | oflagCopied))
	case old&offMask != 0:
		return im.addRef(int64(old&offMask)>>im.cbits, -1, 0)
	}
	return nil
}

// allocCompressed finds room for n bytes of compressed data, packed after
// the previous compressed cluster, and takes a reference on every host
// cluster the bytes touch. Callers hold mu.
func (im *image) allocCompressed(n int64) (int64, error) {
	if n <= 0 || n >= im.cs {
		return 0, errors.New("compressed size out of range")
	}
	if cur := im.cmpCur; cur != 0 {
		cl := cur >> im.cbits
		end := cur + n
		last := (end - 1) >> im.cbits
		ok := last == cl
		if !ok {
			free, err := im.isFree(cl + 1)
			if err != nil {
				return 0, err
			}
			ok = free
			if ok {
				if err := im.claim(cl+1, 1); err != nil {
					return 0, err
				}
			}
		}
		if ok {
			if err := im.addRef(cl, 1, 0); err != nil {
				return 0, err
			}
			im.cmpCur = end
			if end%im.cs == 0 {
				im.cmpCur = 0
			}
			return cur, nil
		}
	}
	k := (n + im.cs - 1) / im.cs
	s, err := im.allocContig(k)
	if err != nil {
		return 0, err
	}
	off := s << im.cbits
	im.cmpCur = off + n
	if im.cmpCur%im.cs == 0 {
		im.cmpCur = 0
	}
	return off, nil
}

// unrefCompressedBytes undoes allocCompressed.
func (im *image) unrefCompressedBytes(off, n int64) {
	for c := off >> im.cbits; c <= (off+n-1)>>im.cbits; c++ {
		_ = im.addRef(c, -1, 0)
	}
}

// zstdEncoders are one worker's zstd encoders. Each cluster is one frame,
// its whole input the window (no larger window is needed).
type zstdEncoders struct {
	fast, def, better *zstd.Encoder
	probe             []byte
}

// zstdProbe is the head of a cluster that the fastest encoder compresses
// first to choose the level for the whole cluster.
const zstdProbe = 2048

// encode appends the zstd frame of one cluster to dst. The level follows a
// probe of the cluster's first 2 KiB at the fastest level:
//   - a head that does not compress (random or already compressed data):
//     the default level, which gives up on such data about 5x sooner
//     than "better";
//   - a head that compresses more than 8x (repetitive text, mostly-zero
//     blocks): the default level, 2.5x faster than "better" there and
//     smaller (1.12 against 1.16 MB on bench/convert.sh's text);
//   - anything else: "better".
//
// On a 2 GiB ext4 image of /usr/share and a Go toolchain the clusters
// total 335.7 MB (the "better" level alone: 334.7 MB; the default level
// alone: 339.8 MB; libzstd's default level, qemu's: 337.6 MB), in the
// time of "better" alone.
func (z *zstdEncoders) encode(src, dst []byte) []byte {
	if z.fast == nil {
		opts := func(l zstd.EncoderLevel) []zstd.EOption {
			return []zstd.EOption{zstd.WithEncoderConcurrency(1), zstd.WithEncoderCRC(false),
				zstd.WithEncoderLevel(l), zstd.WithWindowSize(max(len(src), zstd.MinWindowSize)),
				zstd.WithLowerEncoderMem(true)}
		}
		z.fast, _ = zstd.NewWriter(nil, opts(zstd.SpeedFastest)...)
		z.def, _ = zstd.NewWriter(nil, opts(zstd.SpeedDefault)...)
		z.better, _ = zstd.NewWriter(nil, opts(zstd.SpeedBetterCompression)...)
		z.probe = make([]byte, 0, 2*zstdProbe)
	}
	if len(src) <= zstdProbe {
		return z.better.EncodeAll(src, dst)
	}
	z.probe = z.fast.EncodeAll(src[:zstdProbe], z.probe[:0])
	if p := len(z.probe); p >= zstdProbe-zstdProbe/32 || p < zstdProbe/8 {
		return z.def.EncodeAll(src, dst)
	}
	return z.better.EncodeAll(src, dst)
}
