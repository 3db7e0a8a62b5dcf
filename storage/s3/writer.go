package s3

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"hash/crc32"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/vdisk/vdisk/driver"
)

// writeFile is a new object being written: parts in memory, parts spilled
// to a temporary file, parts uploaded (see the package comment).
type writeFile struct {
	s    *Storage
	key  string
	ctx  context.Context
	stop context.CancelCauseFunc
	wg   sync.WaitGroup // part uploads in flight

	mu       sync.Mutex
	ps       int64 // part size of the first size class
	fixed    bool  // all parts ps bytes (the size was known up front)
	size     int64
	mem      map[int64]*part   // parts held in memory
	spill    map[int64]extents // parts in tmp (at idx*ps), by written ranges
	tmp      *os.File
	done     map[int64]bool // parts uploaded or uploading
	uploadID string
	closed   bool
	nbuf     int           // part buffers allocated
	pool     chan []byte   // free part buffers
	slots    chan struct{} // bounds the part uploads in flight
	zeros    []byte        // a zero part, for parts never written

	emu   sync.Mutex
	err   error // first failure: the upload is lost
	parts []minio.CompletePart
}

// Parts come in size classes of partClass parts, each class's parts twice
// as large as the previous class's (up to 2^maxClass times ps), so that an
// object whose size is not known in advance can reach terabytes within
// S3's 10000 parts while small objects use small parts.
const (
	partClass = 1000
	maxClass  = 9
)

// partStart is the offset of part idx.
func (w *writeFile) partStart(idx int64) int64 {
	if w.fixed {
		return idx * w.ps
	}
	c := min(idx/partClass, maxClass)
	return w.ps*partClass*(1<<c-1) + (idx-c*partClass)*(w.ps<<c)
}

// partLen is the size of part idx (the last part of the object is cut at
// the object's size).
func (w *writeFile) partLen(idx int64) int64 {
	if w.fixed {
		return w.ps
	}
	return w.ps << min(idx/partClass, maxClass)
}

// partIndex is the part holding offset off.
func (w *writeFile) partIndex(off int64) int64 {
	if w.fixed {
		return off / w.ps
	}
	for c := int64(0); ; c++ {
		start := w.ps * partClass * (1<<c - 1)
		if c == maxClass || off < w.ps*partClass*(1<<(c+1)-1) {
			return c*partClass + (off-start)/(w.ps<<c)
		}
	}
}

// uploadsInFlight is how many parts upload at once.
const uploadsInFlight = 2

type part struct {
	buf []byte
	ext extents
}

var _ driver.File = (*writeFile)(nil)

func (s *Storage) newWriter(key string) (*writeFile, error) {
	ctx, stop := context.WithCancelCause(context.Background())
	w := &writeFile{
		s: s, key: key, ctx: ctx, stop: stop, ps: s.cfg.partSize,
		mem: map[int64]*part{}, spill: map[int64]extents{}, done: map[int64]bool{},
		// memParts held plus two uploading.
		pool:  make(chan []byte, s.cfg.memParts+uploadsInFlight),
		slots: make(chan struct{}, uploadsInFlight),
	}
	s.addWriter(key, w)
	return w, nil
}

func (w *writeFile) Name() string { return w.s.url(w.key) }

func (w *writeFile) Size() (int64, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.size, nil
}

func (w *writeFile) failed() error {
	w.emu.Lock()
	defer w.emu.Unlock()
	return w.err
}

// fail records the first error and stops the uploads in flight.
func (w *writeFile) fail(err error) {
	w.emu.Lock()
	if w.err == nil {
		w.err = err
	}
	w.emu.Unlock()
	w.stop(err)
}

func (w *writeFile) closedErr(op string, off int64) error {
	return &driver.Error{Op: op, File: w.Name(), Offset: off, Err: driver.ErrClosed}
}

// getBuf returns a zeroed part buffer, waiting for an upload to finish
// when all are taken (that wait is the memory bound).
func (w *writeFile) getBuf(size int64) ([]byte, error) {
	for {
		select {
		case b := <-w.pool:
			if int64(cap(b)) >= size {
				b = b[:size]
				clear(b)
				return b, nil
			}
			w.nbuf-- // from a smaller size class: let it go
			continue
		default:
		}
		break
	}
	if w.nbuf < cap(w.pool) {
		w.nbuf++
		return make([]byte, size), nil
	}
	select {
	case b := <-w.pool:
		if int64(cap(b)) < size {
			b = make([]byte, size)
		}
		b = b[:size]
		clear(b)
		return b, nil
	case <-w.ctx.Done():
		return nil, w.failed()
	}
}

func (w *writeFile) putBuf(b []byte) {
	select {
	case w.pool <- b:
	default:
	}
}

// WriteAt stores p in the parts it covers.
func (w *writeFile) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, driver.Errorf(driver.ErrOutOfRange, w.Name(), off, "negative offset")
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return 0, w.closedErr("write", off)
	}
	if err := w.failed(); err != nil {
		return 0, err
	}
	end := off + int64(len(p))
	if len(p) > 0 && w.partIndex(end-1) >= maxParts {
		return 0, driver.Errorf(driver.ErrUnsupported, w.Name(), off, "object would need more than %d parts (set a larger part-size=)", maxParts)
	}
	done := 0
	for done < len(p) {
		o := off + int64(done)
		idx := w.partIndex(o)
		po := o - w.partStart(idx)
		n := int(min(int64(len(p)-done), w.partLen(idx)-po))
		if err := w.writePart(idx, po, p[done:done+n]); err != nil {
			return done, err
		}
		done += n
	}
	w.size = max(w.size, end)
	return done, nil
}

// writePart writes b at offset po of part idx.
func (w *writeFile) writePart(idx, po int64, b []byte) error {
	if w.done[idx] {
		return driver.Errorf(driver.ErrUnsupported, w.Name(), w.partStart(idx)+po,
			"rewrite of bytes already uploaded (S3 objects are written once, front to back): this format's writer needs random access; open with spill=all, or convert to a local file and upload it")
	}
	if ext, ok := w.spill[idx]; ok {
		if _, err := w.tmp.WriteAt(b, w.partStart(idx)+po); err != nil {
			return driver.Errorf(err, w.Name(), w.partStart(idx)+po, "writing the local spill file %s", w.tmp.Name())
		}
		ext.add(po, po+int64(len(b)))
		w.spill[idx] = ext
		return nil
	}
	pt := w.mem[idx]
	if pt == nil {
		if len(w.mem) >= w.s.cfg.memParts {
			if err := w.evict(idx); err != nil {
				return err
			}
		}
		buf, err := w.getBuf(w.partLen(idx))
		if err != nil {
			return err
		}
		pt = &part{buf: buf}
		w.mem[idx] = pt
	}
	copy(pt.buf[po:], b)
	pt.ext.add(po, po+int64(len(b)))
	return nil
}

// evict frees a memory slot for part keep: the lowest part other than the
// first (held for the header) is uploaded when it is complete, else it is
// spilled to the temporary file (its holes may be written later).
func (w *writeFile) evict(keep int64) error {
	victim := int64(-1)
	for idx := range w.mem {
		if idx != 0 && idx != keep && (victim < 0 || idx < victim) {
			victim = idx
		}
	}
	if victim < 0 {
		return nil
	}
	pt := w.mem[victim]
	delete(w.mem, victim)
	if pt.ext.covers(0, w.partLen(victim)) && !w.s.cfg.spillAll {
		return w.upload(victim, pt.buf, true)
	}
	if w.tmp == nil {
		f, err := os.CreateTemp("", "vdisk-s3-*.spill")
		if err != nil {
			return driver.Errorf(err, w.Name(), -1, "creating a local spill file")
		}
		w.tmp = f
	}
	for _, r := range pt.ext {
		if _, err := w.tmp.WriteAt(pt.buf[r[0]:r[1]], w.partStart(victim)+r[0]); err != nil {
			return driver.Errorf(err, w.Name(), w.partStart(victim)+r[0], "writing the local spill file %s", w.tmp.Name())
		}
	}
	w.spill[victim] = pt.ext
	w.putBuf(pt.buf)
	return nil
}

// startUpload begins the multipart upload on first use.
func (w *writeFile) startUpload() error {
	if w.uploadID != "" {
		return nil
	}
	var id string
	err := w.retry(func() error {
		var err error
		o := minio.PutObjectOptions{ContentType: "application/octet-stream"}
		if w.s.crcParts() {
			// AWS refuses part checksums of an algorithm the upload
			// was not created with.
			o.UserMetadata = map[string]string{"X-Amz-Checksum-Algorithm": "CRC32C"}
		}
		id, err = w.s.core.NewMultipartUpload(w.ctx, w.s.bucket, w.key, o)
		return err
	})
	if err != nil {
		return w.s.classify("upload", w.key, -1, err)
	}
	w.uploadID = id
	return nil
}

// upload sends buf as part idx in the background (pooled: buf returns to
// the pool afterwards).
func (w *writeFile) upload(idx int64, buf []byte, pooled bool) error {
	if err := w.startUpload(); err != nil {
		w.fail(err)
		return err
	}
	select {
	case w.slots <- struct{}{}:
	case <-w.ctx.Done():
		if pooled {
			w.putBuf(buf)
		}
		return w.failed()
	}
	w.done[idx] = true
	// The goroutine gets what it needs: the fields change under w.mu.
	off, uploadID := w.partStart(idx), w.uploadID
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		defer func() { <-w.slots }()
		if pooled {
			defer w.putBuf(buf)
		}
		w.sendPart(idx, off, uploadID, buf)
	}()
	return nil
}

func (w *writeFile) sendPart(idx, off int64, uploadID string, buf []byte) {
	var op minio.ObjectPart
	popts, crc := w.s.partOptions(buf)
	err := w.retry(func() error {
		var err error
		op, err = w.s.core.PutObjectPart(w.ctx, w.s.bucket, w.key, uploadID, int(idx+1), bytes.NewReader(buf), int64(len(buf)), popts)
		return err
	})
	if err != nil {
		w.fail(w.s.classify("upload", w.key, off, err))
		return
	}
	w.emu.Lock()
	w.parts = append(w.parts, minio.CompletePart{PartNumber: int(idx + 1), ETag: op.ETag, ChecksumCRC32C: crc})
	w.emu.Unlock()
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// partOptions protects the payload of a part. Over https (TLS guards the
// bytes on the wire) and over plain http to a loopback endpoint (no
// network in between), the payload is sent UNSIGNED-PAYLOAD with its
// CRC-32C in x-amz-checksum-crc32c, which the server checks (a part that
// arrives different is refused): hardware CRC-32C costs a small fraction
// of SHA-256. Over plain http to another host (insecure=on) the SHA-256
// of the payload is signed, the only protection such a path has. Either
// way the client sends buf as it is (a streaming signature would copy it
// chunk by chunk through growing buffers).
//
// It returns the options and the part's CRC-32C (base64, "" when signed
// by SHA-256), which CompleteMultipartUpload lists with the part.
func (s *Storage) partOptions(buf []byte) (minio.PutObjectPartOptions, string) {
	if !s.crcParts() {
		sum := sha256.Sum256(buf)
		return minio.PutObjectPartOptions{Sha256Hex: hex.EncodeToString(sum[:]), DisableContentSha256: true}, ""
	}
	var c [4]byte
	binary.BigEndian.PutUint32(c[:], crc32.Checksum(buf, castagnoli))
	crc := base64.StdEncoding.EncodeToString(c[:])
	h := http.Header{}
	h.Set("x-amz-checksum-crc32c", crc)
	return minio.PutObjectPartOptions{CustomHeader: h, DisableContentSha256: true}, crc
}

// crcParts reports whether parts go unsigned with a CRC-32C (see
// partOptions).
func (s *Storage) crcParts() bool { return s.cfg.secure || s.cfg.loopback }

// retry runs fn until it succeeds, fails for good, or the attempts run
// out (Storage.retry); a stopped upload gives the cause it stopped for.
func (w *writeFile) retry(fn func() error) error {
	err := w.s.retry(w.ctx, "upload", w.key, -1, fn)
	if err != nil && w.ctx.Err() != nil {
		if c := context.Cause(w.ctx); c != nil {
			return c
		}
	}
	return err
}

// ReadAt reads back what was written (formats read their own headers);
// bytes already uploaded cannot be read.
func (w *writeFile) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, driver.Errorf(driver.ErrOutOfRange, w.Name(), off, "negative offset")
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return 0, w.closedErr("read", off)
	}
	if off >= w.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), w.size-off))
	for done := 0; done < n; {
		o := off + int64(done)
		idx := w.partIndex(o)
		po := o - w.partStart(idx)
		k := int(min(int64(n-done), w.partLen(idx)-po))
		if err := w.readPart(idx, po, p[done:done+k]); err != nil {
			return done, err
		}
		done += k
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (w *writeFile) readPart(idx, po int64, b []byte) error {
	switch {
	case w.mem[idx] != nil:
		copy(b, w.mem[idx].buf[po:])
	case w.done[idx]:
		return driver.Errorf(driver.ErrUnsupported, w.Name(), w.partStart(idx)+po, "bytes already uploaded cannot be read back before the object is complete")
	default:
		clear(b)
		if ext, ok := w.spill[idx]; ok {
			for _, r := range ext {
				lo, hi := max(r[0], po), min(r[1], po+int64(len(b)))
				if lo >= hi {
					continue
				}
				if _, err := w.tmp.ReadAt(b[lo-po:hi-po], w.partStart(idx)+lo); err != nil {
					return driver.Errorf(err, w.Name(), w.partStart(idx)+lo, "reading the local spill file")
				}
			}
		}
	}
	return nil
}

// Truncate sets the object's size; bytes past it are dropped. Before
// anything is stored it also picks a part size large enough for the size
// (S3 allows 10000 parts).
func (w *writeFile) Truncate(n int64) error {
	if n < 0 {
		return driver.Errorf(driver.ErrInvalidOption, w.Name(), n, "negative size")
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return w.closedErr("truncate", n)
	}
	if err := w.failed(); err != nil {
		return err
	}
	if len(w.mem) == 0 && len(w.spill) == 0 && len(w.done) == 0 && w.nbuf == 0 && n > 0 {
		// The size is known before any byte (raw, VHD fixed): equal parts
		// just large enough, rather than growing ones.
		const mib = 1 << 20
		need := (n + maxParts - 11) / (maxParts - 10)
		w.ps = max(w.ps, (need+mib-1)/mib*mib)
		w.fixed = true
	}
	for idx := range w.done {
		if w.partStart(idx)+w.partLen(idx) > n {
			return driver.Errorf(driver.ErrUnsupported, w.Name(), n, "cannot shrink below bytes already uploaded")
		}
	}
	if n > 0 && w.partIndex(n-1) >= maxParts {
		return driver.Errorf(driver.ErrUnsupported, w.Name(), n, "object would need more than %d parts (set a larger part-size=)", maxParts)
	}
	for idx, pt := range w.mem {
		switch start := w.partStart(idx); {
		case start >= n:
			delete(w.mem, idx)
			w.putBuf(pt.buf)
		case start+w.partLen(idx) > n:
			clear(pt.buf[n-start:])
			pt.ext.trim(n - start)
		}
	}
	for idx, ext := range w.spill {
		switch start := w.partStart(idx); {
		case start >= n:
			delete(w.spill, idx)
		case start+w.partLen(idx) > n:
			ext.trim(n - start)
			w.spill[idx] = ext
		}
	}
	w.size = n
	return nil
}

// PunchHole writes zeros: an object has no holes.
func (w *writeFile) PunchHole(off, n int64) error {
	if off < 0 || n < 0 {
		return driver.Errorf(driver.ErrOutOfRange, w.Name(), off, "invalid range")
	}
	size, _ := w.Size()
	n = min(n, size-off)
	z := make([]byte, min(n, 1<<20))
	for n > 0 {
		k := min(n, int64(len(z)))
		if _, err := w.WriteAt(z[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// Sync reports a failed upload; the object itself only exists after Close
// (an S3 object cannot be made durable piecemeal).
func (w *writeFile) Sync() error {
	return w.failed()
}

// Close uploads what is left and completes the upload; on failure it
// aborts, leaving neither an object nor parts.
func (w *writeFile) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return w.failed()
	}
	w.closed = true
	err := w.finish()
	if err != nil {
		w.fail(err)
		w.abortLocked()
		return err
	}
	w.cleanup()
	w.stop(nil)
	return nil
}

// finish uploads the remaining parts and completes the object.
func (w *writeFile) finish() error {
	if err := w.failed(); err != nil {
		return err
	}
	nparts := int64(1)
	if w.size > 0 {
		nparts = w.partIndex(w.size-1) + 1
	}
	if w.uploadID == "" && nparts == 1 {
		// Small: one PUT.
		buf := make([]byte, w.size)
		if err := w.readPart(0, 0, buf); err != nil {
			return err
		}
		err := w.retry(func() error {
			_, err := w.s.cl.PutObject(w.ctx, w.s.bucket, w.key, bytes.NewReader(buf), int64(len(buf)), minio.PutObjectOptions{ContentType: "application/octet-stream", DisableMultipart: true})
			return err
		})
		return w.s.classify("upload", w.key, -1, err)
	}
	for idx := int64(0); idx < nparts; idx++ {
		if w.done[idx] {
			continue
		}
		plen := min(w.partLen(idx), w.size-w.partStart(idx))
		var buf []byte
		pooled := false
		switch {
		case w.mem[idx] != nil:
			buf, pooled = w.mem[idx].buf[:plen], true
			delete(w.mem, idx)
		case w.spill[idx] != nil:
			b, err := w.getBuf(plen)
			if err != nil {
				return err
			}
			buf, pooled = b[:plen], true
			if err := w.readPart(idx, 0, buf); err != nil {
				w.putBuf(b)
				return err
			}
		default:
			if int64(len(w.zeros)) < plen {
				w.zeros = make([]byte, plen)
			}
			buf = w.zeros[:plen]
		}
		if err := w.upload(idx, buf, pooled); err != nil {
			return err
		}
		if err := w.failed(); err != nil {
			return err
		}
	}
	w.wg.Wait()
	if err := w.failed(); err != nil {
		return err
	}
	w.emu.Lock()
	parts := slices.Clone(w.parts)
	w.emu.Unlock()
	slices.SortFunc(parts, func(a, b minio.CompletePart) int { return a.PartNumber - b.PartNumber })
	if int64(len(parts)) != nparts {
		return driver.Errorf(driver.ErrCorrupt, w.Name(), -1, "internal error: %d parts uploaded for %d", len(parts), nparts)
	}
	err := w.retry(func() error {
		_, err := w.s.core.CompleteMultipartUpload(w.ctx, w.s.bucket, w.key, w.uploadID, parts, minio.PutObjectOptions{})
		return err
	})
	return w.s.classify("upload", w.key, -1, err)
}

// abort gives the upload up (Storage.Remove of a key being written).
func (w *writeFile) abort(cause error) {
	w.fail(cause)
	w.mu.Lock()
	defer w.mu.Unlock()
	w.closed = true
	w.abortLocked()
}

// abortLocked deletes the parts uploaded so far.
func (w *writeFile) abortLocked() {
	w.wg.Wait()
	if w.uploadID != "" {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		err := w.s.retry(ctx, "abort", w.key, -1, func() error {
			return w.s.core.AbortMultipartUpload(ctx, w.s.bucket, w.key, w.uploadID)
		})
		if err != nil && !strings.Contains(errResponse(err).Code, "NoSuchUpload") {
			w.s.log.Debug("s3: abort of multipart upload failed", "object", w.Name(), "upload", w.uploadID, "error", err)
		}
		w.uploadID = ""
	}
	w.cleanup()
}

// cleanup removes the spill file and forgets the buffers.
func (w *writeFile) cleanup() {
	if w.tmp != nil {
		w.tmp.Close()
		os.Remove(w.tmp.Name())
		w.tmp = nil
	}
	clear(w.mem)
	clear(w.spill)
	w.zeros = nil
	w.s.dropWriter(w.key, w)
}
