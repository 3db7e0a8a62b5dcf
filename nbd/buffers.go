package nbd

import (
	"errors"
	"math/bits"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vdisk/vdisk/driver"
)

// Buffer pool: power-of-two size classes from 4 KiB to MaxPayload.
const (
	minClassShift = 12
	maxClassShift = 25 // MaxPayload
)

var pools [maxClassShift - minClassShift + 1]sync.Pool

func classOf(n int) int {
	if n <= 1<<minClassShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minClassShift
}

// getBuf returns a buffer of length n (n <= MaxPayload; nil for 0); its
// content is undefined. The pointer goes back with putBuf: the pool keeps
// pointers, so a buffer cycles through it without an allocation.
func getBuf(n int) *[]byte {
	if n == 0 {
		return nil
	}
	c := classOf(n)
	if p, ok := pools[c].Get().(*[]byte); ok {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n, 1<<(c+minClassShift))
	return &b
}

func putBuf(p *[]byte) {
	if p == nil || cap(*p) == 0 {
		return
	}
	c := classOf(cap(*p))
	if c < 0 || c >= len(pools) || cap(*p) != 1<<(c+minClassShift) {
		return
	}
	*p = (*p)[:cap(*p)]
	pools[c].Put(p)
}

// replyWriter serialises what the server sends on a connection. Small
// messages gather in buf; the writer flushes when nobody else is waiting to
// write (so replies completing together leave in one system call). Large
// payloads are not copied: they are queued by reference between the
// gathered bytes, and the whole reply (every chunk of a structured reply,
// with what was gathered before) leaves in one writev when it ends.
type replyWriter struct {
	mu      sync.Mutex
	nc      net.Conn
	buf     []byte
	waiting atomic.Int32
	// hold: the reader has more requests at hand and will flush; do not
	// flush small replies before.
	hold atomic.Bool
	err  error // first write error; every later write fails with it
	// timeout (IdleTimeout in the transmission phase) bounds each write:
	// a client that does not read its replies is cut off.
	timeout time.Duration
	armed   int64 // monoNow when the write deadline was last moved; 0: never
	// iov: the pieces of the next writev, pointing into buf (up to mark)
	// and at queued payloads; wv is the net.Buffers writev consumes.
	// Both are kept so that sending allocates nothing.
	iov  [][]byte
	mark int
	wv   net.Buffers
	// rc is nc's raw connection where nc is a kernel socket (not TLS):
	// sendFile has the kernel send file bytes to it. noSend: the kernel
	// refused; payloads are read and written from then on.
	rc     syscall.RawConn
	noSend atomic.Bool
}

// setConn sets the connection replies go to.
func (w *replyWriter) setConn(nc net.Conn) {
	w.nc, w.rc = nc, nil
	if sc, ok := nc.(syscall.Conn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			w.rc = rc
		}
	}
}

const (
	replyBufFlush = 64 << 10 // flush gathered bytes beyond this
	directPayload = 16 << 10 // payloads at least this large are not copied
)

func (w *replyWriter) lock() {
	w.waiting.Add(1)
	w.mu.Lock()
	w.waiting.Add(-1)
}

// unlock flushes unless another writer is waiting or the reader holds
// replies back (they will flush); queued payloads are always sent, since
// their buffers go back to the pool after.
func (w *replyWriter) unlock() error {
	if len(w.iov) > 0 || (w.waiting.Load() == 0 && !w.hold.Load()) || len(w.buf) >= replyBufFlush {
		w.flushLocked()
	}
	err := w.err
	w.mu.Unlock()
	return err
}

func (w *replyWriter) flushLocked() {
	switch {
	case w.err != nil:
	case len(w.iov) > 0:
		if w.mark < len(w.buf) {
			w.iov = append(w.iov, w.buf[w.mark:])
		}
		w.wv = w.iov
		w.arm()
		_, w.err = w.wv.WriteTo(w.nc)
	case len(w.buf) > 0:
		w.arm()
		_, w.err = w.nc.Write(w.buf)
	}
	clear(w.iov) // drop the references to payloads
	w.iov, w.wv, w.mark = w.iov[:0], nil, 0
	w.buf = w.buf[:0]
}

// arm moves the write deadline timeout ahead, at most every sixteenth of
// it (as conn.armRead does for reads).
func (w *replyWriter) arm() {
	if w.timeout <= 0 {
		return
	}
	now := monoNow()
	if w.armed != 0 && now-w.armed < int64(w.timeout/16) {
		return
	}
	w.nc.SetWriteDeadline(time.Now().Add(w.timeout))
	w.armed = now
}

// payload queues p after what is gathered: a small one is copied, a large
// one referenced until the flush that ends the reply (p must stay
// unchanged until unlock).
func (w *replyWriter) payload(p []byte) {
	if w.err != nil {
		return
	}
	if len(p) < directPayload {
		w.buf = append(w.buf, p...)
		return
	}
	if w.mark < len(w.buf) {
		w.iov = append(w.iov, w.buf[w.mark:])
	}
	w.iov = append(w.iov, p)
	w.mark = len(w.buf)
}

// fileSent counts the bytes the kernel sent from files (tests).
var fileSent atomic.Int64

// sendFile sends n bytes of f from off after everything queued, with the
// kernel taking them from the file (sendfile: no copy through user space;
// none at all on a unix socket). It returns false, having sent nothing of
// the file, where the connection or the file cannot: the caller then
// queues those bytes itself. If the file ends early, zeros (what a raw
// image reads past its file) make up the rest. Held under the lock.
func (w *replyWriter) sendFile(f driver.FileSender, off, n int64) bool {
	if w.rc == nil || w.noSend.Load() {
		return false
	}
	w.flushLocked()
	if w.err != nil {
		return true // nothing more is sent; the error ends the connection
	}
	w.arm()
	sent, err := f.SendTo(w.rc, off, n)
	fileSent.Add(sent)
	switch {
	case err != nil && sent == 0 && errors.Is(err, driver.ErrUnsupported):
		w.noSend.Store(true)
		return false
	case err != nil:
		w.err = err
	case sent < n:
		for left := n - sent; left > 0 && w.err == nil; {
			k := min(left, replyBufFlush)
			w.buf = append(w.buf, make([]byte, k)...)
			w.flushLocked()
			left -= k
		}
	}
	return true
}

func isNoSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) || errors.Is(err, syscall.EFBIG)
}
