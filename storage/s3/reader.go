package s3

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/minio/minio-go/v7"

	"github.com/vdisk/vdisk/driver"
)

// readFile is an object opened for reading, pinned to the size and ETag it
// had at open.
type readFile struct {
	s     *Storage
	key   string
	size  int64
	etag  string
	rw    bool // opened ReadWrite: writes get the immutable-object error
	bs    int64
	ctx   context.Context
	stop  context.CancelFunc
	sem   chan struct{} // bounds the GETs in flight
	ahead sync.WaitGroup

	mu       sync.Mutex
	lru      *list.List // of *block, most recent first
	blocks   map[int64]*list.Element
	inflight map[int64]*fetch
	lastEnd  int64 // end of the previous read: sequential detection
	active   int   // ReadAt calls in progress
	parallel int   // > 0: reads overlapped lately (no read-ahead)
	closed   bool
}

// block is one cached block. Its buffer goes back to the storage's pool
// when the last reference is dropped: the cache's own, while it holds the
// block, and one per reader copying from it.
type block struct {
	idx  int64
	data []byte
	refs atomic.Int32
}

// fetch is one block being downloaded; waiters block on done.
type fetch struct {
	done chan struct{}
	blk  *block
	err  error
}

// unref drops one reference to b.
func (f *readFile) unref(b *block) {
	if b.refs.Add(-1) == 0 {
		f.s.blocks.Put(b.data)
	}
}

var (
	_ driver.File      = (*readFile)(nil)
	_ driver.Versioned = (*readFile)(nil)
)

func (s *Storage) newReader(key string, oi minio.ObjectInfo, rw bool) *readFile {
	ctx, stop := context.WithCancel(context.Background())
	return &readFile{
		s: s, key: key, size: oi.Size, etag: strings.Trim(oi.ETag, `"`), rw: rw,
		bs: s.cfg.blockSize, ctx: ctx, stop: stop,
		sem: make(chan struct{}, s.cfg.parallel),
		lru: list.New(), blocks: map[int64]*list.Element{}, inflight: map[int64]*fetch{},
		lastEnd: -1,
	}
}

func (f *readFile) Name() string                  { return f.s.url(f.key) }
func (f *readFile) Size() (int64, error)          { return f.size, nil }
func (f *readFile) Version() string               { return f.etag }
func (f *readFile) Sync() error                   { return nil }
func (f *readFile) AllocatedSize() (int64, error) { return f.size, nil }

func (f *readFile) immutable(op string, off int64) error {
	if !f.rw {
		return &driver.Error{Op: op, File: f.Name(), Offset: off, Err: driver.ErrReadOnly}
	}
	return &driver.Error{Op: op, File: f.Name(), Offset: off, Reason: "S3 objects cannot be changed in place: write a new object (create or convert to a new name)", Err: driver.ErrUnsupported}
}

func (f *readFile) WriteAt(p []byte, off int64) (int, error) { return 0, f.immutable("write", off) }
func (f *readFile) Truncate(n int64) error                   { return f.immutable("truncate", n) }
func (f *readFile) PunchHole(off, n int64) error             { return f.immutable("discard", off) }

// Close stops read-ahead and drops the cache.
func (f *readFile) Close() error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil
	}
	f.closed = true
	f.mu.Unlock()
	f.stop()
	f.ahead.Wait()
	f.mu.Lock()
	for e := f.lru.Front(); e != nil; e = e.Next() {
		f.unref(e.Value.(*block))
	}
	f.lru.Init()
	clear(f.blocks)
	f.mu.Unlock()
	return nil
}

// maxDirect bounds one GET straight into the caller's buffer.
const maxDirect = 4 << 20

// ReadAt reads from the cached blocks, fetching the missing ones in
// parallel, then starts read-ahead when reads are sequential. Blocks the
// read covers whole that are neither cached nor being fetched are read
// straight into p, runs of them by one GET (up to maxDirect): no buffer,
// no copy, and they do not push other blocks out of the cache (a reader
// of whole blocks rarely reads them again).
func (f *readFile) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, driver.Errorf(driver.ErrOutOfRange, f.Name(), off, "negative offset")
	}
	if off >= f.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	if len(p) == 0 {
		return 0, nil
	}
	n := int(min(int64(len(p)), f.size-off))
	end := off + int64(n)
	first, last := off/f.bs, (end-1)/f.bs
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return 0, &driver.Error{Op: "read", File: f.Name(), Offset: off, Err: driver.ErrClosed}
	}
	// Read-ahead is for a reader with one request at a time: parallel
	// readers (convert's workers, a cache's fetches) already keep GETs in
	// flight, and read-ahead would only fetch their blocks twice.
	// A read that starts while another is in progress marks the
	// reader parallel for the next 32 reads.
	if f.active > 0 {
		f.parallel = 32
	} else if f.parallel > 0 {
		f.parallel--
	}
	seq := off == f.lastEnd && f.parallel == 0
	f.lastEnd = end
	f.active++
	var tasks []func() error
	dirLo, dirHi := int64(-1), int64(-1) // the direct run being built, in bytes
	flush := func() {
		for lo := dirLo; lo < dirHi; lo += maxDirect {
			lo, hi := lo, min(dirHi, lo+maxDirect)
			tasks = append(tasks, func() error {
				return f.get(p[lo-off:hi-off], lo)
			})
		}
		dirLo, dirHi = -1, -1
	}
	for idx := first; idx <= last; idx++ {
		bo, be := idx*f.bs, min((idx+1)*f.bs, f.size)
		_, cached := f.blocks[idx]
		_, busy := f.inflight[idx]
		if bo >= off && be <= end && !cached && !busy {
			if dirHi != bo {
				flush()
				dirLo = bo
			}
			dirHi = be
			continue
		}
		flush()
		tasks = append(tasks, func() error {
			b, err := f.block(idx)
			if err != nil {
				return err
			}
			defer f.unref(b)
			data := b.data
			lo, hi := max(off, bo), min(end, bo+int64(len(data)))
			if hi < lo || hi < min(end, be) {
				return f.s.classify("read", f.key, lo, fmt.Errorf("block %d is short", idx))
			}
			copy(p[lo-off:hi-off], data[lo-bo:hi-bo])
			return nil
		})
	}
	flush()
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		f.active--
		f.mu.Unlock()
	}()

	if seq {
		f.readAhead(last + 1)
	}
	var err error
	if len(tasks) == 1 {
		err = tasks[0]()
	} else {
		// Several pieces: fetch them concurrently (f.sem bounds the GETs).
		var wg sync.WaitGroup
		var emu sync.Mutex
		for _, task := range tasks {
			wg.Go(func() {
				if e := task(); e != nil {
					emu.Lock()
					if err == nil {
						err = e
					}
					emu.Unlock()
				}
			})
		}
		wg.Wait()
	}
	if err != nil {
		return 0, err
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// readAhead starts fetches of the blocks after a sequential read.
func (f *readFile) readAhead(from int64) {
	ra := int64(f.s.cfg.readAhead)
	nblocks := (f.size + f.bs - 1) / f.bs
	for idx := from; idx < from+ra && idx < nblocks; idx++ {
		f.mu.Lock()
		_, cached := f.blocks[idx]
		_, busy := f.inflight[idx]
		closed := f.closed
		if !cached && !busy && !closed {
			f.ahead.Add(1)
		}
		f.mu.Unlock()
		if cached || busy || closed {
			continue
		}
		go func() {
			defer f.ahead.Done()
			// Errors surface when the block is read.
			if b, err := f.block(idx); err == nil {
				f.unref(b)
			}
		}()
	}
}

// block returns block idx, from the cache, from a fetch in flight, or
// fetched now, with a reference the caller drops with unref.
func (f *readFile) block(idx int64) (*block, error) {
	f.mu.Lock()
	if e, ok := f.blocks[idx]; ok {
		f.lru.MoveToFront(e)
		b := e.Value.(*block)
		b.refs.Add(1)
		f.mu.Unlock()
		return b, nil
	}
	if fe, ok := f.inflight[idx]; ok {
		fe.blk.refs.Add(1)
		f.mu.Unlock()
		<-fe.done
		if fe.err != nil {
			f.unref(fe.blk)
			return nil, fe.err
		}
		return fe.blk, nil
	}
	// Two references: the fetcher's and the cache's.
	fe := &fetch{done: make(chan struct{}), blk: &block{idx: idx, data: f.s.getBlock(min(f.bs, f.size-idx*f.bs))}}
	fe.blk.refs.Store(2)
	f.inflight[idx] = fe
	f.mu.Unlock()

	fe.err = f.get(fe.blk.data, idx*f.bs)
	f.mu.Lock()
	delete(f.inflight, idx)
	cached := fe.err == nil && !f.closed
	var evicted []*block
	if cached {
		f.blocks[idx] = f.lru.PushFront(fe.blk)
		for f.lru.Len() > f.s.cfg.cacheBlks {
			old := f.lru.Remove(f.lru.Back()).(*block)
			delete(f.blocks, old.idx)
			evicted = append(evicted, old)
		}
	}
	f.mu.Unlock()
	close(fe.done)
	if !cached {
		f.unref(fe.blk)
	}
	for _, b := range evicted {
		f.unref(b)
	}
	if fe.err != nil {
		f.unref(fe.blk)
		return nil, fe.err
	}
	return fe.blk, nil
}

// get fills buf from off with a ranged GET conditional on the pinned
// ETag, retrying failures that may pass (connection errors, a body cut
// short, 5xx and throttling that outlasted the client's own retries) with
// exponential backoff. A replaced object is never retried.
func (f *readFile) get(buf []byte, off int64) error {
	select {
	case f.sem <- struct{}{}:
	case <-f.ctx.Done():
		return &driver.Error{Op: "read", File: f.Name(), Offset: off, Err: driver.ErrClosed}
	}
	defer func() { <-f.sem }()
	err := f.s.retry(f.ctx, "read", f.key, off, func() error { return f.getOnce(buf, off) })
	if err != nil && f.ctx.Err() != nil {
		return &driver.Error{Op: "read", File: f.Name(), Offset: off, Err: driver.ErrClosed}
	}
	return f.s.classify("read", f.key, off, err)
}

func (f *readFile) getOnce(buf []byte, off int64) error {
	opts := minio.GetObjectOptions{}
	if err := opts.SetRange(off, off+int64(len(buf))-1); err != nil {
		return err
	}
	if f.etag != "" {
		if err := opts.SetMatchETag(f.etag); err != nil {
			return err
		}
	}
	body, oi, _, err := f.s.core.GetObject(f.ctx, f.s.bucket, f.key, opts)
	if err != nil {
		return err
	}
	defer body.Close()
	// A server that ignores If-Match still names the version it sends.
	if et := strings.Trim(oi.ETag, `"`); f.etag != "" && et != "" && et != f.etag {
		return minio.ErrorResponse{StatusCode: 412, Code: "PreconditionFailed", Message: "ETag changed from " + f.etag + " to " + et}
	}
	if _, err := io.ReadFull(body, buf); err != nil {
		return fmt.Errorf("reading %d bytes at %d: %w", len(buf), off, err)
	}
	return nil
}

// retryable reports errors worth another attempt: everything but the
// answers that will not change (missing, denied, replaced, bad request)
// and cancellation.
func retryable(err error) bool {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false
	}
	r := errResponse(err)
	if r.StatusCode == 0 {
		return true // transport errors, short bodies
	}
	return r.StatusCode >= 500 || r.StatusCode == 429 || r.Code == "SlowDown" || r.Code == "RequestTimeout"
}

// errResponse is the S3 error answer inside err (wrapped or not).
func errResponse(err error) minio.ErrorResponse {
	var r minio.ErrorResponse
	if errors.As(err, &r) {
		return r
	}
	return minio.ToErrorResponse(err)
}
