package qcow

import (
	"bytes"
	"runtime"
	"sync"

	"github.com/klauspost/compress/flate"

	"github.com/vdisk/vdisk/driver"
)

// deflateWindow is the window qemu's deflate uses (zlib windowBits -12).
// qemu inflates a whole cluster in one call, which would accept longer
// distances, but other readers (VirtualBox's QCOW backend) may not.
const deflateWindow = 4096

var _ driver.CompressedWriter = (*image)(nil)

// cjob is one cluster on its way through the compression pipeline.
type cjob struct {
	seq  int64
	off  int64  // guest offset
	data []byte // the cluster, zero-padded
	n    int    // bytes of data inside the disk
	out  []byte // the deflate stream, nil when the cluster does not shrink
}

// compWriter compresses clusters on every core and stores them in the
// order WriteCompressed was called, so a sequential caller gets a
// sequentially written, densely packed file, as qemu writes it.
type compWriter struct {
	im      *image
	jobs    chan *cjob
	slots   chan struct{} // bounds the clusters held by the pipeline
	mu      sync.Mutex
	cond    *sync.Cond
	next    int64 // sequence number of the next submission
	done    int64 // sequence number of the next job to store
	ready   map[int64]*cjob
	err     error
	stopped bool
	wg      sync.WaitGroup
	bufs    sync.Pool
}

// CompressedUnit is the unit of WriteCompressed: one cluster.
func (im *image) CompressedUnit() int64 { return im.lo.cs }

// WriteCompressed queues p (one cluster at a cluster boundary, or the
// last, shorter piece of the disk) to be stored compressed. Clusters that
// do not shrink are stored as normal clusters. Errors of earlier calls
// are reported by later calls and by Flush.
func (im *image) WriteCompressed(p []byte, off int64) error {
	if err := im.writable(off); err != nil {
		return err
	}
	cs := im.lo.cs
	size := im.Size()
	if err := driver.CheckRange(im.name, off, int64(len(p)), size); err != nil {
		return err
	}
	if off%cs != 0 || len(p) == 0 || (int64(len(p)) != cs && off+int64(len(p)) != size) {
		return driver.Errorf(driver.ErrInvalidOption, im.name, off, "compressed writes take whole clusters (%d bytes at a cluster boundary)", cs)
	}
	cw := im.compressor()
	cw.mu.Lock()
	if cw.err != nil || cw.stopped {
		err := cw.err
		cw.mu.Unlock()
		if err == nil {
			err = driver.Errorf(driver.ErrClosed, im.name, off, "image closed")
		}
		return err
	}
	seq := cw.next
	cw.next++
	cw.mu.Unlock()
	cw.slots <- struct{}{}
	buf := cw.getBuf()
	copy(buf, p)
	clear(buf[len(p):])
	cw.jobs <- &cjob{seq: seq, off: off, data: buf, n: len(p)}
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
	cs := int(im.lo.cs)
	slots := min(max(16<<20/cs, 4*n+4), 4096)
	cw := &compWriter{im: im, jobs: make(chan *cjob, 2*n), slots: make(chan struct{}, slots), ready: map[int64]*cjob{}}
	cw.cond = sync.NewCond(&cw.mu)
	cw.bufs.New = func() any { b := make([]byte, cs); return &b }
	for range n {
		cw.wg.Add(1)
		go cw.worker()
	}
	cw.wg.Add(1)
	go cw.writer()
	im.cw = cw
	return cw
}

func (cw *compWriter) getBuf() []byte  { return *(cw.bufs.Get().(*[]byte)) }
func (cw *compWriter) putBuf(b []byte) { cw.bufs.Put(&b) }

// worker deflates jobs with qemu's window.
func (cw *compWriter) worker() {
	defer cw.wg.Done()
	cs := int(cw.im.lo.cs)
	var out bytes.Buffer
	zw, err := flate.NewWriterWindow(&out, deflateWindow)
	for j := range cw.jobs {
		if err == nil {
			out.Reset()
			out.Grow(cs)
			zw.Reset(&out)
			if _, werr := zw.Write(j.data); werr == nil && zw.Close() == nil && out.Len() < cs {
				j.out = bytes.Clone(out.Bytes())
			}
		}
		cw.mu.Lock()
		cw.ready[j.seq] = j
		cw.cond.Broadcast()
		cw.mu.Unlock()
	}
}

// writer stores jobs in sequence order, in batches.
func (cw *compWriter) writer() {
	defer cw.wg.Done()
	const maxBatch = 64
	for {
		cw.mu.Lock()
		for cw.ready[cw.done] == nil && !(cw.stopped && cw.done == cw.next) {
			cw.cond.Wait()
		}
		if cw.ready[cw.done] == nil {
			cw.mu.Unlock()
			return
		}
		var batch []*cjob
		for seq := cw.done; len(batch) < maxBatch && cw.ready[seq] != nil; seq++ {
			batch = append(batch, cw.ready[seq])
			delete(cw.ready, seq)
		}
		failed := cw.err != nil
		cw.mu.Unlock()
		var err error
		if !failed {
			err = cw.im.storeCompressed(batch)
		}
		for _, j := range batch {
			cw.putBuf(j.data)
			<-cw.slots
		}
		cw.mu.Lock()
		cw.done += int64(len(batch))
		if err != nil && cw.err == nil {
			cw.err = err
		}
		cw.cond.Broadcast()
		cw.mu.Unlock()
	}
}

// storeCompressed stores a batch of consecutive jobs: the streams of
// runs of compressible clusters that are unallocated go right at the end
// of the file in one write, then their L2 entries; anything else goes
// through the normal write path.
func (im *image) storeCompressed(batch []*cjob) error {
	im.mu.RLock()
	defer im.mu.RUnlock()
	cs := im.lo.cs
	for len(batch) > 0 {
		j := batch[0]
		c := j.off / cs
		var e [1]uint64
		if _, err := im.entries(c, e[:]); err != nil {
			return err
		}
		if j.out == nil || e[0] != 0 {
			if err := im.write(j.data[:j.n], j.off); err != nil {
				return err
			}
			batch = batch[1:]
			continue
		}
		// A run of compressible jobs for consecutive unallocated clusters
		// of one L2 table.
		ents := make([]uint64, len(batch))
		got, err := im.entries(c, ents)
		if err != nil {
			return err
		}
		k := 1
		total := int64(len(j.out))
		for k < got && k < len(batch) && batch[k].out != nil && batch[k].off == j.off+int64(k)*cs && ents[k] == 0 {
			total += int64(len(batch[k].out))
			k++
		}
		buf := make([]byte, 0, total)
		for _, b := range batch[:k] {
			buf = append(buf, b.out...)
		}
		fo, err := im.reserve(total, false)
		if err != nil {
			return err
		}
		if fo+total > int64(im.lo.offMask) {
			return driver.Errorf(driver.ErrUnsupported, im.name, fo, "compressed data cannot be stored this far into the file")
		}
		if _, err := im.f.WriteAt(buf, fo); err != nil {
			im.release(fo, total)
			return driver.WithFile(err, "write compressed clusters", im.name)
		}
		vals := make([]uint64, k)
		pos := fo
		for i, b := range batch[:k] {
			vals[i] = im.lo.compressedEntry(pos, int64(len(b.out)))
			pos += int64(len(b.out))
		}
		if err := im.setEntries(c, vals); err != nil {
			return err
		}
		batch = batch[k:]
	}
	return nil
}

// drainCompressed waits until every compressed write queued so far is
// stored and returns the first error the pipeline met.
func (im *image) drainCompressed() error {
	im.cwMu.Lock()
	cw := im.cw
	im.cwMu.Unlock()
	if cw == nil {
		return nil
	}
	cw.mu.Lock()
	defer cw.mu.Unlock()
	target := cw.next
	for cw.done < target && cw.err == nil {
		cw.cond.Wait()
	}
	return cw.err
}

// stopCompressed drains the pipeline and stops its goroutines.
func (im *image) stopCompressed() error {
	im.cwMu.Lock()
	cw := im.cw
	im.cwMu.Unlock()
	if cw == nil {
		return nil
	}
	err := im.drainCompressed()
	cw.mu.Lock()
	if cw.stopped {
		cw.mu.Unlock()
		return err
	}
	cw.stopped = true
	cw.cond.Broadcast()
	cw.mu.Unlock()
	close(cw.jobs)
	cw.wg.Wait()
	return err
}
