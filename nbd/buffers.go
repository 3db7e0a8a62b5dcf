package nbd

import (
	"errors"
	"math/bits"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
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

// getBuf returns a buffer of length n (n <= MaxPayload); its content is
// undefined.
func getBuf(n int) []byte {
	if n == 0 {
		return nil
	}
	c := classOf(n)
	if p, ok := pools[c].Get().(*[]byte); ok {
		return (*p)[:n]
	}
	return make([]byte, n, 1<<(c+minClassShift))
}

func putBuf(b []byte) {
	if cap(b) == 0 {
		return
	}
	c := classOf(cap(b))
	if c < 0 || c >= len(pools) || cap(b) != 1<<(c+minClassShift) {
		return
	}
	b = b[:cap(b)]
	pools[c].Put(&b)
}

// replyWriter serialises what the server sends on a connection. Small
// messages gather in buf; the writer flushes when nobody else is waiting to
// write (so replies completing together leave in one system call), and
// large payloads go out with the pending bytes in one writev.
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
	armed   time.Time
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
// replies back (they will flush).
func (w *replyWriter) unlock() error {
	if (w.waiting.Load() == 0 && !w.hold.Load()) || len(w.buf) >= replyBufFlush {
		w.flushLocked()
	}
	err := w.err
	w.mu.Unlock()
	return err
}

func (w *replyWriter) flushLocked() {
	if len(w.buf) == 0 || w.err != nil {
		w.buf = w.buf[:0]
		return
	}
	w.arm()
	_, w.err = w.nc.Write(w.buf)
	w.buf = w.buf[:0]
}

// arm moves the write deadline timeout ahead, at most every sixteenth of
// it (as conn.armRead does for reads).
func (w *replyWriter) arm() {
	if w.timeout <= 0 {
		return
	}
	now := time.Now()
	if !w.armed.IsZero() && now.Sub(w.armed) < w.timeout/16 {
		return
	}
	w.nc.SetWriteDeadline(now.Add(w.timeout))
	w.armed = now
}

// payload queues p after what is gathered, writing both now when p is
// large.
func (w *replyWriter) payload(p []byte) {
	if w.err != nil {
		return
	}
	if len(p) < directPayload {
		w.buf = append(w.buf, p...)
		return
	}
	bufs := net.Buffers{w.buf, p}
	w.arm()
	_, w.err = bufs.WriteTo(w.nc)
	w.buf = w.buf[:0]
}

func isNoSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) || errors.Is(err, syscall.EFBIG)
}
