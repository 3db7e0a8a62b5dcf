package nbd

import (
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/vdisk/vdisk/driver"
)

// header is what a request header says.
type header struct {
	flags  uint16
	typ    uint16
	cookie uint64
	off    uint64
	length uint32
	// long: an extended effect length beyond 32 bits; length is cut and
	// BLOCK_STATUS answers for up to length64.
	long     bool
	length64 uint64
}

// request is one transmission request. A connection owns Workers of them
// (its free list, which also bounds the requests it runs at once) and
// reuses them, with their scratch lists, so that a request costs no
// allocation.
type request struct {
	header
	buf    []byte  // WRITE payload
	bufp   *[]byte // buf's pool pointer
	held   int64   // bytes of the connection budget held
	shared int64   // bytes of the server's budget held
	// scratch lists of sparse reads and block status, kept between
	// requests up to scratchKeep entries.
	segs        []segment
	base, depth []extent
}

// scratchKeep bounds the scratch lists a request keeps for the next one.
const scratchKeep = 256

// sparseReadMin: structured READs at least this long look for holes and
// send them as NBD_REPLY_TYPE_OFFSET_HOLE chunks; shorter ones are read
// whole (a status walk costs more than sending a few zeros).
const sparseReadMin = 64 << 10

// minHoleChunk: zero runs shorter than this inside a sparse read are sent
// as data.
const minHoleChunk = 4096

// Small reads and writes (without FUA) run in the reader's goroutine
// ("inline") as long as inline requests have been quick: with the data in
// the page cache, handing a request to another goroutine (and waking a
// thread for it) costs more than the I/O itself; fio's 4 KiB random jobs
// at queue depth 16 run two to three times faster this way. Everything
// else (flushes, FUA, large requests) goes to a worker goroutine, at most
// Workers at once, so slow requests run in parallel and do not hold up the
// ones behind them. An inline request slower than inlineSlow (a cache
// miss, writeback throttling) turns inline execution off for inlinePause,
// and the requests of that time run in parallel again.
const (
	inlineMax   = 64 << 10
	inlineSlow  = time.Millisecond
	inlinePause = 200 * time.Millisecond
	// inlineSlowRun: this many slow inline requests in a row turn inline
	// execution off (one alone is more often the machine than the
	// request: a preempted thread).
	inlineSlowRun = 2
)

// transmit reads requests and runs them until the client disconnects or
// breaks the protocol. It returns once every request it started has been
// answered.
func (c *conn) transmit() error {
	defer c.wg.Wait()
	defer c.releaseHold()
	// Deferred last, run first: no more dispatches; the workers end once
	// their requests are answered (wg.Wait above waits for those).
	defer close(c.work)
	var hdrBuf [extendedHeaderSize]byte
	var h header
	var inlineOffUntil int64 // monoNow until which nothing runs inline; 0: none
	slow := 0                // inline requests in a row slower than inlineSlow
	for {
		// Replies wait while more requests are already here, so that a
		// burst of them leaves in one write.
		c.holdIfBuffered(requestHeaderSize)
		if err := c.awaitRequest(); err != nil {
			return err
		}
		if err := c.readHeader(hdrBuf[:], &h); err != nil {
			return err
		}
		var data int64 // bytes of data buffers, charged to both budgets
		switch h.typ {
		case cmdDisc:
			return errDisconnect
		case cmdWrite:
			if h.length > c.s.maxPayload {
				if err := c.refuseWrite(&h); err != nil {
					return err
				}
				continue
			}
			data = int64(h.length)
		case cmdRead:
			if h.length <= c.s.maxPayload {
				data = int64(h.length)
			}
		case cmdCache:
			data = min(int64(h.length), cacheChunk)
		case cmdBlockStatus:
			data = statusCharge
		}
		// Send held replies before waiting for a free request or for
		// buffer space: the wait may be long.
		var req *request
		select {
		case req = <-c.free:
		default:
			c.releaseHold()
			select {
			case req = <-c.free:
			case <-c.quit:
				return errBroken
			}
		}
		req.header = h
		req.held = data
		if !c.budget.tryAcquire(data) {
			c.releaseHold()
			if !c.budget.acquire(data, c.quit) {
				req.held = 0
				c.free <- req
				return errBroken
			}
		}
		req.shared = data + requestCharge
		if !c.s.mem.tryAcquire(req.shared) {
			c.releaseHold()
			if !c.s.mem.acquire(req.shared, c.quit) {
				req.shared = 0
				c.release(req)
				return errBroken
			}
		}
		if c.broken.Load() {
			c.release(req)
			return errBroken
		}
		if req.typ == cmdWrite {
			req.bufp = getBuf(int(req.length))
			if req.bufp != nil {
				req.buf = *req.bufp
			}
			c.holdIfBuffered(len(req.buf))
			c.armRead()
			if err := c.readFull(req.buf); err != nil {
				c.release(req)
				if errors.Is(err, io.EOF) {
					err = io.ErrUnexpectedEOF // disconnect in the middle of a write
				}
				return err
			}
		}
		c.wg.Add(1)
		c.inflight.Add(1)
		if req.length <= inlineMax && req.flags == 0 && (req.typ == cmdRead || req.typ == cmdWrite) &&
			(inlineOffUntil == 0 || monoNow() > inlineOffUntil) {
			t0 := monoNow()
			end := c.handle(req)
			if end-t0 <= int64(inlineSlow) {
				slow = 0
				inlineOffUntil = 0
			} else if slow++; slow >= inlineSlowRun {
				slow = 0
				inlineOffUntil = end + int64(inlinePause)
			}
			continue
		}
		c.dispatch(req)
	}
}

// dispatch hands req to an idle worker goroutine, or starts one when none
// is idle. Workers stay for the connection's life (a goroutine per request
// would start with a small stack and grow it every time, and allocate);
// there are at most Workers. A worker counts itself idle before it waits
// for work and the reader (the only one to dispatch) takes one off the
// count before sending, so the send finds a receiver at once. With Workers
// running and none idle, one of them is about to be: the free list holds
// as many requests as there are workers, and the reader holds one.
func (c *conn) dispatch(req *request) {
	if c.idlers.Load() > 0 {
		c.idlers.Add(-1)
		c.work <- req
		return
	}
	if c.workers < c.s.Workers {
		c.workers++
		go c.worker(req)
		return
	}
	c.work <- req
}

// worker runs requests until the connection's work channel closes.
func (c *conn) worker(req *request) {
	for {
		c.handle(req)
		c.idlers.Add(1)
		var ok bool
		if req, ok = <-c.work; !ok {
			return
		}
	}
}

// readHeader reads one request header, compact or extended as
// negotiated. An extended effect length beyond 32 bits is kept whole in
// length64 (BLOCK_STATUS answers for all of it) and cut in length to the
// largest 4 KiB multiple below 4 GiB: every other command then fails the
// range check (a read) or gets EOVERFLOW from validate.
func (c *conn) readHeader(buf []byte, req *header) error {
	if !c.extended {
		hdr := buf[:requestHeaderSize]
		if err := c.readFull(hdr); err != nil {
			return err
		}
		if m := be.Uint32(hdr[0:]); m != requestMagic {
			return protoErrorf("bad request magic %#x", m)
		}
		*req = header{
			flags:  be.Uint16(hdr[4:]),
			typ:    be.Uint16(hdr[6:]),
			cookie: be.Uint64(hdr[8:]),
			off:    be.Uint64(hdr[16:]),
			length: be.Uint32(hdr[24:]),
		}
		req.length64 = uint64(req.length)
		return nil
	}
	hdr := buf[:extendedHeaderSize]
	if err := c.readFull(hdr); err != nil {
		return err
	}
	if m := be.Uint32(hdr[0:]); m != extendedRequestMagic {
		return protoErrorf("bad extended request magic %#x", m)
	}
	*req = header{
		flags:  be.Uint16(hdr[4:]),
		typ:    be.Uint16(hdr[6:]),
		cookie: be.Uint64(hdr[8:]),
		off:    be.Uint64(hdr[16:]),
	}
	n := be.Uint64(hdr[24:])
	req.length64 = n
	payload := req.flags&cmdFlagPayloadLen != 0
	req.flags &^= cmdFlagPayloadLen
	switch {
	case req.typ == cmdWrite && !payload:
		return protoErrorf("extended WRITE without NBD_CMD_FLAG_PAYLOAD_LEN")
	case req.typ != cmdWrite && payload:
		// No other command here takes a payload; its length cannot be
		// trusted to resynchronise the stream.
		return protoErrorf("NBD_CMD_FLAG_PAYLOAD_LEN on a %s request", cmdName(req.typ))
	case payload && n > MaxPayload:
		return protoErrorf("extended write payload of %d bytes", n)
	case n > 1<<32-1:
		req.length, req.long = 1<<32-4096, true
	default:
		req.length = uint32(n)
	}
	return nil
}

// awaitRequest returns once a request header has begun to arrive. The
// idle timeout applies only while none of the client's requests runs: a
// client waiting for a long request is not idle, so the deadline is moved
// on then.
func (c *conn) awaitRequest() error {
	for {
		c.armRead()
		if c.r.Buffered() > 0 {
			return nil
		}
		_, err := c.r.Peek(1)
		if err == nil {
			return nil
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			return err
		}
		c.dmu.Lock()
		closing := c.closing
		c.dmu.Unlock()
		if closing {
			return err
		}
		if c.inflight.Load() == 0 {
			// Idle time counts from the last reply, not from a deadline
			// armed while a request still ran.
			now := monoNow()
			if left := c.lastDone.Load() + int64(c.s.IdleTimeout) - now; left > 0 {
				c.dmu.Lock()
				if !c.closing {
					c.raw.SetReadDeadline(time.Now().Add(time.Duration(left)))
					c.rdArmed = now
				}
				c.dmu.Unlock()
				continue
			}
			c.idle = true
			return err
		}
		c.rdArmed = 0 // move the deadline on at once
	}
}

// refuseWrite answers a WRITE longer than the payload bound with EINVAL.
// Payloads up to MaxPayload are read and dropped (in small pieces: no
// buffer of their size is needed) and the connection goes on; a longer
// one ends the connection rather than read gigabytes into nothing.
func (c *conn) refuseWrite(req *header) error {
	c.releaseHold()
	if req.length > MaxPayload {
		c.sendError(req, EINVAL, "write payload exceeds the maximum payload size")
		return protoErrorf("write of %d bytes exceeds the maximum payload", req.length)
	}
	c.armRead()
	if _, err := io.CopyN(io.Discard, c.r, int64(req.length)); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return err
	}
	c.sendError(req, EINVAL, fmt.Sprintf("write payload exceeds the maximum payload size (%d bytes)", c.s.maxPayload))
	if c.broken.Load() {
		return errBroken
	}
	return nil
}

// holdIfBuffered holds replies back when at least n request bytes are
// already buffered (the reader will not block before handling them), and
// otherwise sends what is held: the reader is about to wait for the client.
func (c *conn) holdIfBuffered(n int) {
	if c.r.Buffered() >= n {
		c.w.hold.Store(true)
		return
	}
	c.releaseHold()
}

// releaseHold stops holding replies and sends those gathered.
func (c *conn) releaseHold() {
	if !c.w.hold.Load() {
		return
	}
	c.w.hold.Store(false)
	c.w.lock()
	c.done()
}

// release gives back what req holds and returns it to the free list.
func (c *conn) release(req *request) {
	putBuf(req.bufp)
	req.buf, req.bufp = nil, nil
	c.s.mem.release(req.shared)
	c.budget.release(req.held)
	req.shared, req.held = 0, 0
	if cap(req.segs) > scratchKeep {
		req.segs = nil
	}
	if cap(req.base) > scratchKeep || cap(req.depth) > scratchKeep {
		req.base, req.depth = nil, nil
	}
	c.free <- req
}

// handle runs req and answers it; it returns when it ended (monoNow).
func (c *conn) handle(req *request) (end int64) {
	defer c.wg.Done()
	defer func() {
		// lastDone before inflight: a reader that sees no request
		// running sees when the last one ended.
		end = monoNow()
		c.lastDone.Store(end)
		c.inflight.Add(-1)
	}()
	defer c.release(req)
	if c.broken.Load() {
		return // the reply could not be sent anyway
	}
	errno, msg := c.validate(req)
	if errno != 0 {
		c.sendError(&req.header, errno, msg)
		return
	}
	d := c.exp.Disk
	off, n := int64(req.off), int64(req.length)
	var err error
	switch req.typ {
	case cmdRead:
		c.read(req)
		return
	case cmdBlockStatus:
		c.blockStatus(req)
		return
	case cmdWrite:
		_, err = d.WriteAt(req.buf, off)
	case cmdFlush:
		err = d.Flush()
	case cmdTrim, cmdWriteZeroes:
		if req.typ == cmdWriteZeroes && req.flags&cmdFlagFastZero != 0 && !d.FastZero() {
			c.sendError(&req.header, ENOTSUP, "the image format cannot write zeroes faster than data")
			return
		}
		err = c.pieces(req.typ, off, n, req.flags&cmdFlagNoHole == 0)
	case cmdCache:
		err = c.cache(off, n)
	}
	if err == nil && req.flags&cmdFlagFUA != 0 && req.typ != cmdFlush && req.typ != cmdCache {
		err = d.Flush()
	}
	if err != nil {
		c.fail(&req.header, err)
		return
	}
	c.sendOK(&req.header)
	return
}

// allowedFlags returns the command flags a command accepts.
func allowedFlags(typ uint16) (flags uint16, known bool) {
	switch typ {
	case cmdRead:
		return cmdFlagFUA | cmdFlagDF, true
	case cmdWrite, cmdFlush, cmdTrim, cmdCache:
		return cmdFlagFUA, true
	case cmdWriteZeroes:
		return cmdFlagFUA | cmdFlagNoHole | cmdFlagFastZero, true
	case cmdBlockStatus:
		return cmdFlagFUA | cmdFlagReqOne, true
	}
	return 0, false
}

// validate checks a request against the protocol and the export; it
// returns the error to answer with, or 0.
func (c *conn) validate(req *request) (uint32, string) {
	allowed, known := allowedFlags(req.typ)
	if !known {
		return EINVAL, "unknown command"
	}
	if req.flags&^allowed != 0 {
		return EINVAL, "command flag not valid for this command"
	}
	if req.flags&cmdFlagDF != 0 && !c.structured {
		return EINVAL, "NBD_CMD_FLAG_DF without structured replies"
	}
	write := req.typ == cmdWrite || req.typ == cmdWriteZeroes || req.typ == cmdTrim
	if write && c.exp.readOnly {
		return EPERM, "the export is read-only"
	}
	if req.typ == cmdFlush {
		return 0, "" // offset and length are reserved: ignore them
	}
	if req.long && req.typ != cmdBlockStatus {
		return EOVERFLOW, "effect lengths of 4 GiB or more are only taken by block status"
	}
	if req.typ == cmdRead && req.length > c.s.maxPayload {
		if c.structured {
			return EOVERFLOW, "read longer than the maximum payload"
		}
		return EINVAL, "read longer than the maximum payload"
	}
	if req.off > uint64(c.size) || uint64(req.length) > uint64(c.size)-req.off {
		if req.typ == cmdWrite || req.typ == cmdWriteZeroes {
			return ENOSPC, "write past the end of the export"
		}
		return EINVAL, "request past the end of the export"
	}
	if req.typ == cmdBlockStatus {
		if !c.structured || !c.metaSet || !(c.ctxBase || c.ctxDepth) {
			return EINVAL, "no metadata context was negotiated"
		}
		if req.length == 0 {
			return EINVAL, "block status of an empty range"
		}
	}
	return 0, ""
}

// fail answers req with the NBD error for err and logs unexpected errors.
func (c *conn) fail(req *header, err error) {
	e := errnoOf(err)
	if e == EIO {
		c.log.Warn("request failed", "cmd", cmdName(req.typ), "offset", req.off, "length", req.length, "err", err)
	} else {
		c.log.Debug("request refused", "cmd", cmdName(req.typ), "offset", req.off, "length", req.length, "err", err)
	}
	c.sendError(req, e, cmdName(req.typ)+" failed: "+errnoText(e))
}

func errnoText(e uint32) string {
	switch e {
	case EPERM:
		return "operation not permitted"
	case EIO:
		return "input/output error"
	case EINVAL:
		return "invalid argument"
	case ENOSPC:
		return "no space left on device"
	case ENOTSUP:
		return "operation not supported"
	}
	return ErrnoName(e)
}

// errGone ends a long request of a connection that can no longer answer.
var errGone = errors.New("connection gone")

// pieces runs a TRIM (typ cmdTrim) or WRITE_ZEROES over [off, off+n) in
// pieces of at most chunkLen split at multiples of chunkLen, so that one
// request holds the Disk's range lock for one piece at a time; it stops
// early when the reply can no longer be sent.
func (c *conn) pieces(typ uint16, off, n int64, unmap bool) error {
	d := c.exp.Disk
	for n > 0 {
		if c.broken.Load() {
			return errGone
		}
		m := min(n, chunkLen-off%chunkLen)
		var err error
		if typ == cmdTrim {
			err = d.Discard(off, m)
		} else {
			err = d.WriteZeroes(off, m, unmap)
		}
		if err != nil {
			return err
		}
		off += m
		n -= m
	}
	return nil
}

// cache reads the data of the range to warm the caches below (the data is
// dropped; holes are skipped, they have nothing to warm), in pieces as
// pieces does.
func (c *conn) cache(off, n int64) error {
	d := c.exp.Disk
	bp := getBuf(int(min(n, cacheChunk)))
	defer putBuf(bp)
	var buf []byte
	if bp != nil {
		buf = *bp
	}
	for n > 0 {
		if c.broken.Load() {
			return errGone
		}
		e, err := d.Status(off, min(n, chunkLen-off%chunkLen))
		if err != nil {
			return err
		}
		m := min(n, max(e.Length, 1))
		if e.IsData() {
			for p, end := off, off+m; p < end; {
				k := min(end-p, int64(len(buf)))
				if _, err := d.ReadAt(buf[:k], p); err != nil && !errors.Is(err, io.EOF) {
					return err
				}
				p += k
			}
		}
		off += m
		n -= m
	}
	return nil
}

// --- replies ---

func (c *conn) simpleHeader(cookie uint64, errno uint32) {
	var h [simpleReplySize]byte
	be.PutUint32(h[0:], simpleReplyMagic)
	be.PutUint32(h[4:], errno)
	be.PutUint64(h[8:], cookie)
	c.w.buf = append(c.w.buf, h[:]...)
}

func (c *conn) chunkHeader(req *header, flags, typ uint16, length uint32) {
	if c.extended {
		var h [extendedHeaderSize]byte
		be.PutUint32(h[0:], extendedReplyMagic)
		be.PutUint16(h[4:], flags)
		be.PutUint16(h[6:], typ)
		be.PutUint64(h[8:], req.cookie)
		be.PutUint64(h[16:], req.off)
		be.PutUint64(h[24:], uint64(length))
		c.w.buf = append(c.w.buf, h[:]...)
		return
	}
	cookie := req.cookie
	var h [chunkHeaderSize]byte
	be.PutUint32(h[0:], structuredMagic)
	be.PutUint16(h[4:], flags)
	be.PutUint16(h[6:], typ)
	be.PutUint64(h[8:], cookie)
	be.PutUint32(h[16:], length)
	c.w.buf = append(c.w.buf, h[:]...)
}

// done ends a reply; a failed send closes the connection so the reader
// stops too.
func (c *conn) done() {
	if err := c.w.unlock(); err != nil {
		if !c.broken.Swap(true) && errors.Is(err, os.ErrDeadlineExceeded) {
			c.log.Warn("client does not read its replies; disconnected", "idle-timeout", c.s.IdleTimeout)
		}
		c.stop()
		c.raw.Close()
	}
}

// errBroken ends a connection whose replies can no longer be sent.
var errBroken = errors.New("connection lost while sending a reply")

func (c *conn) sendOK(req *header) {
	c.w.lock()
	if c.extended {
		// No simple replies with extended headers.
		c.chunkHeader(req, replyFlagDone, replyTypeNone, 0)
	} else {
		c.simpleHeader(req.cookie, 0)
	}
	c.done()
}

// sendError answers with an error: an error chunk with a message when
// structured replies are on, else a simple reply.
func (c *conn) sendError(req *header, errno uint32, msg string) {
	c.w.lock()
	c.errorLocked(req, errno, msg)
	c.done()
}

func (c *conn) errorLocked(req *header, errno uint32, msg string) {
	if !c.structured {
		c.simpleHeader(req.cookie, errno)
		return
	}
	if len(msg) > maxStringLen {
		msg = msg[:maxStringLen]
	}
	c.chunkHeader(req, replyFlagDone, replyTypeError, uint32(6+len(msg)))
	var b [6]byte
	be.PutUint32(b[0:], errno)
	be.PutUint16(b[4:], uint16(len(msg)))
	c.w.buf = append(c.w.buf, b[:]...)
	c.w.buf = append(c.w.buf, msg...)
}

// segment is a piece of a sparse read: data or a hole. A data piece
// stored plainly in a raw image's file is sent from the file by the
// kernel (f, at foff).
type segment struct {
	off, n int64 // relative to the request
	hole   bool
	f      driver.FileSender
	foff   int64
}

// sendMin: data pieces at least this long are sent from the image's file
// by the kernel where it stores them plainly (a raw image): sendfile(2),
// no copy through vdisk, none at all on a unix socket. Shorter ones are
// read and gathered, several replies to a writev.
const sendMin = 64 << 10

// fileRun returns the file holding [off, off+n) of the disk, when the
// kernel may send it from there (see sendMin).
func (c *conn) fileRun(off, n int64) (driver.FileSender, int64, error) {
	if n < sendMin || c.w.rc == nil || c.w.noSend.Load() {
		return nil, 0, nil
	}
	f, foff, ok, err := c.exp.Disk.StableFileRun(off, n)
	if err != nil || !ok {
		return nil, 0, err
	}
	fs, ok := f.(driver.FileSender)
	if !ok {
		return nil, 0, nil
	}
	return fs, foff, nil
}

func (c *conn) read(req *request) {
	d := c.exp.Disk
	off, n := int64(req.off), int64(req.length)
	// The buffer is taken only for bytes that are read: pieces the kernel
	// sends from the file need none.
	var bp *[]byte
	var buf []byte
	ensure := func() {
		if bp == nil && n > 0 {
			bp = getBuf(int(n))
			buf = *bp
		}
	}
	defer func() { putBuf(bp) }()
	if !c.structured {
		f, foff, err := c.fileRun(off, n)
		if err != nil {
			c.fail(&req.header, err)
			return
		}
		if f == nil {
			ensure()
			if _, err := d.ReadAt(buf, off); err != nil && !errors.Is(err, io.EOF) {
				c.fail(&req.header, err)
				return
			}
		}
		c.w.lock()
		c.simpleHeader(req.cookie, 0)
		if f == nil || !c.w.sendFile(f, foff, n) {
			if f != nil {
				ensure()
				if !c.readLocked(buf, off) {
					return
				}
			}
			c.w.payload(buf)
		}
		c.done()
		return
	}
	var whole [1]segment
	var segs []segment
	if n > 0 {
		whole[0] = segment{off: 0, n: n}
		segs = whole[:]
	}
	if req.flags&cmdFlagDF == 0 && n >= sparseReadMin {
		var err error
		if segs, err = c.segments(req, off, n); err != nil {
			c.fail(&req.header, err)
			return
		}
	}
	for i := range segs {
		s := &segs[i]
		if s.hole {
			continue
		}
		var err error
		if s.f, s.foff, err = c.fileRun(off+s.off, s.n); err != nil {
			c.fail(&req.header, err)
			return
		}
		if s.f != nil {
			continue
		}
		ensure()
		if _, err := d.ReadAt(buf[s.off:s.off+s.n], off+s.off); err != nil && !errors.Is(err, io.EOF) {
			c.fail(&req.header, err)
			return
		}
	}
	c.w.lock()
	for i, s := range segs {
		var flags uint16
		if i == len(segs)-1 {
			flags = replyFlagDone
		}
		var b [12]byte
		be.PutUint64(b[0:], uint64(off+s.off))
		if s.hole {
			be.PutUint32(b[8:], uint32(s.n))
			c.chunkHeader(&req.header, flags, replyTypeOffsetHole, 12)
			c.w.buf = append(c.w.buf, b[:12]...)
			continue
		}
		c.chunkHeader(&req.header, flags, replyTypeOffsetData, uint32(8+s.n))
		c.w.buf = append(c.w.buf, b[:8]...)
		if s.f == nil || !c.w.sendFile(s.f, s.foff, s.n) {
			if s.f != nil {
				ensure()
				if !c.readLocked(buf[s.off:s.off+s.n], off+s.off) {
					return
				}
			}
			c.w.payload(buf[s.off : s.off+s.n])
		}
		segs[i].f = nil // the scratch list keeps no file
	}
	if len(segs) == 0 { // zero-length read
		c.chunkHeader(&req.header, replyFlagDone, replyTypeNone, 0)
	}
	c.done()
}

// readLocked reads p at off for a reply whose header is already sent,
// the kernel having refused to send it from the file; the writer is
// locked. A read error cannot be reported any more (the header promised
// the data): the connection ends, as for a write error. false: it ended.
func (c *conn) readLocked(p []byte, off int64) bool {
	if _, err := c.exp.Disk.ReadAt(p, off); err != nil && !errors.Is(err, io.EOF) {
		c.log.Warn("nbd: read failed after its reply began; closing the connection", "offset", off, "error", err)
		c.w.err = err
		c.done()
		return false
	}
	return true
}

// segments splits [off, off+n) into data and hole pieces by the disk's
// status; holes shorter than minHoleChunk become data. The list is built
// in req's scratch list.
func (c *conn) segments(req *request, off, n int64) ([]segment, error) {
	d := c.exp.Disk
	segs := addSegment(req.segs[:0], segment{})[:0] // room for one at least
	for pos := int64(0); pos < n; {
		if len(segs) >= maxSegments {
			// A finely fragmented range: send the rest as data rather
			// than build an unbounded list.
			segs = addSegment(segs, segment{off: pos, n: n - pos})
			break
		}
		e, err := d.Status(off+pos, n-pos)
		if err != nil {
			return nil, err
		}
		if e.Length <= 0 {
			segs = append(segs[:0], segment{off: 0, n: n})
			break
		}
		segs = addSegment(segs, segment{off: pos, n: e.Length, hole: e.ReadsZero()})
		pos += e.Length
	}
	req.segs = segs
	// Fold short holes into data, in place.
	out := segs[:0]
	for _, s := range segs {
		if s.hole && s.n < minHoleChunk {
			s.hole = false
		}
		out = addSegment(out, s)
	}
	return out, nil
}

// addSegment appends s to list, merging it into the last one of the same
// kind.
func addSegment(list []segment, s segment) []segment {
	if k := len(list); k > 0 && list[k-1].hole == s.hole {
		list[k-1].n += s.n
		return list
	}
	return append(list, s)
}

// extent is one block status descriptor.
type extent struct {
	length uint64
	flags  uint32
}

// appendExtent adds n bytes of flags to list, merging them into the last
// extent while it stays at most limit long.
func appendExtent(list []extent, n uint64, flags uint32, limit uint64) []extent {
	if k := len(list); k > 0 && list[k-1].flags == flags && list[k-1].length+n <= limit {
		list[k-1].length += n
		return list
	}
	return append(list, extent{n, flags})
}

// blockStatus answers NBD_CMD_BLOCK_STATUS. With extended headers the
// effect length and the extents are 64-bit: a request for more than 4 GiB
// is answered for all of it (up to maxExtents descriptors), and a hole of
// any size is one descriptor.
func (c *conn) blockStatus(req *request) {
	d := c.exp.Disk
	length, limit := uint64(req.length), uint64(1<<32-1)
	if c.extended {
		length, limit = req.length64, 1<<63-1
	}
	off := int64(req.off)
	end := off + int64(min(length, uint64(c.size)-req.off))
	reqOne := req.flags&cmdFlagReqOne != 0
	base, depth := req.base[:0], req.depth[:0]
	maxExtents := int(maxExtents.Load())
	for pos, steps := off, 0; pos < end && steps < 2*maxExtents; steps++ {
		e, err := d.Status(pos, end-pos)
		if err == nil && e.Length <= 0 {
			err = io.ErrNoProgress
		}
		if err != nil {
			if pos == off {
				c.fail(&req.header, err)
				return
			}
			break // report what is known
		}
		var bf, df uint32
		if !e.IsData() {
			bf |= StateHole
		}
		if e.ReadsZero() {
			bf |= StateZero
		}
		if e.Present() {
			df = uint32(e.Depth) + 1
		}
		for n := uint64(e.Length); n > 0; {
			// A compact descriptor holds 32 bits of length.
			k := min(n, limit)
			base = appendExtent(base, k, bf, limit)
			depth = appendExtent(depth, k, df, limit)
			n -= k
		}
		pos += e.Length
		if reqOne || len(base) > maxExtents || len(depth) > maxExtents {
			break
		}
	}
	req.base, req.depth = base, depth
	if len(base) > maxExtents {
		base = base[:maxExtents]
	}
	if len(depth) > maxExtents {
		depth = depth[:maxExtents]
	}
	if reqOne {
		base, depth = base[:1], depth[:1]
	}
	c.w.lock()
	if c.ctxBase {
		c.extentsChunk(req, ctxIDBaseAllocation, base, !c.ctxDepth)
	}
	if c.ctxDepth {
		c.extentsChunk(req, ctxIDAllocationDepth, depth, true)
	}
	c.done()
}

// extentsChunk queues one block status chunk of context id. Callers hold
// the writer.
func (c *conn) extentsChunk(req *request, id uint32, list []extent, last bool) {
	var flags uint16
	if last {
		flags = replyFlagDone
	}
	if c.extended {
		c.chunkHeader(&req.header, flags, replyTypeBlockStatusExt, uint32(8+16*len(list)))
		c.w.buf = be.AppendUint32(c.w.buf, id)
		c.w.buf = be.AppendUint32(c.w.buf, uint32(len(list)))
		for _, x := range list {
			c.w.buf = be.AppendUint64(c.w.buf, x.length)
			c.w.buf = be.AppendUint64(c.w.buf, uint64(x.flags))
		}
		return
	}
	c.chunkHeader(&req.header, flags, replyTypeBlockStatus, uint32(4+8*len(list)))
	c.w.buf = be.AppendUint32(c.w.buf, id)
	for _, x := range list {
		c.w.buf = be.AppendUint32(c.w.buf, uint32(x.length))
		c.w.buf = be.AppendUint32(c.w.buf, x.flags)
	}
}
