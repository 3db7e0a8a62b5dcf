package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

var be = binary.BigEndian

// conn is one client connection.
type conn struct {
	s   *Server
	raw net.Conn // the accepted connection
	nc  net.Conn // raw, or the TLS connection on top of it
	r   *bufio.Reader
	w   replyWriter
	log *slog.Logger

	// deadline handling: shutdown sets closing and a past read deadline;
	// the end of the handshake and armRead set deadlines only if not
	// closing.
	dmu     sync.Mutex
	closing bool
	rdArmed int64 // monoNow when armRead last set the read deadline; 0: at once (reader only)
	idle    bool  // the read deadline ended the connection in transmission

	// quit closes when the connection ends or shuts down: waits for
	// buffer budget stop.
	quit     chan struct{}
	quitOnce sync.Once

	// negotiated state
	noZeroes   bool
	fixed      bool // the client set NBD_FLAG_C_FIXED_NEWSTYLE
	tls        bool
	structured bool
	extended   bool   // NBD_OPT_EXTENDED_HEADERS: 32-byte headers both ways
	metaExport string // export the metadata contexts were set for
	metaSet    bool
	ctxBase    bool
	ctxDepth   bool

	// transmission state
	exp      *export
	size     int64
	free     chan *request // the requests not in use (Workers of them)
	work     chan *request // hands requests to idle workers
	workers  int           // worker goroutines started (reader only)
	idlers   atomic.Int32  // workers waiting for work and not yet handed any
	budget   *pool         // this connection's data buffers (ConnBuffer)
	wg       sync.WaitGroup
	inflight atomic.Int64 // requests started and not yet answered
	lastDone atomic.Int64 // monoNow when a request last ended
	broken   atomic.Bool  // replies can no longer be sent: stop reading requests
}

func newConn(s *Server, nc net.Conn) *conn {
	c := &conn{s: s, raw: nc, nc: nc, r: bufio.NewReaderSize(nc, 128<<10), quit: make(chan struct{})}
	c.w.setConn(nc)
	c.log = s.Logger.With("remote", remoteName(nc))
	return c
}

// unixSendBuffer is the send buffer asked for on unix socket connections.
const unixSendBuffer = 4 << 20

// errDisconnect is a clean end requested by the client.
var errDisconnect = errors.New("client disconnected")

func (c *conn) serve(ctx context.Context) error {
	if tc, ok := c.raw.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
		tc.SetKeepAlive(true)
	}
	if uc, ok := c.raw.(*net.UnixConn); ok {
		// A unix socket's send buffer (208 KiB by default) takes a
		// fraction of a large READ reply: the writev then returns
		// partway and waits in the poller several times per reply.
		// The kernel caps the size at net.core.wmem_max.
		uc.SetWriteBuffer(unixSendBuffer)
	}
	done := make(chan struct{})
	defer close(done)
	defer c.stop()
	go func() {
		select {
		case <-done:
			return
		case <-ctx.Done():
		}
		// Graceful shutdown: stop reading requests, let in-flight ones
		// answer, then close.
		c.dmu.Lock()
		c.closing = true
		c.raw.SetReadDeadline(time.Now())
		c.dmu.Unlock()
		c.stop()
		select {
		case <-done:
		case <-time.After(c.s.ShutdownGrace):
			c.broken.Store(true) // long requests stop between pieces
			c.raw.Close()
		}
	}()

	c.log.Debug("client connected")
	err := c.handshake()
	if err == nil {
		err = c.transmit()
	}
	c.wg.Wait()
	c.w.lock()
	c.w.flushLocked()
	c.w.mu.Unlock()
	if c.tls {
		if tc, ok := c.nc.(*tls.Conn); ok {
			tc.SetWriteDeadline(time.Now().Add(time.Second))
			tc.CloseWrite()
		}
	}
	c.raw.Close()
	switch {
	case errors.Is(err, errDisconnect), errors.Is(err, io.EOF), errors.Is(err, errBroken):
		c.log.Debug("client disconnected")
		return nil
	case ctx.Err() != nil && (errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, net.ErrClosed)):
		c.log.Debug("connection closed for shutdown")
		return nil
	case errors.Is(err, os.ErrDeadlineExceeded) && c.idle:
		c.log.Warn("client idle too long or not reading its replies; disconnected", "idle-timeout", c.s.IdleTimeout)
		return nil
	case errors.Is(err, os.ErrDeadlineExceeded):
		c.log.Warn("handshake timed out")
		return nil
	}
	return err
}

// stop ends the waits for buffer budget.
func (c *conn) stop() { c.quitOnce.Do(func() { close(c.quit) }) }

// armRead moves the read deadline IdleTimeout ahead. To keep the timer
// work off the per-request path it does so only when the last move is more
// than a sixteenth of the timeout old, so a client is disconnected after
// between 15/16 and all of IdleTimeout without a request.
func (c *conn) armRead() {
	t := c.s.IdleTimeout
	if t <= 0 {
		return
	}
	now := monoNow()
	if c.rdArmed != 0 && now-c.rdArmed < int64(t/16) {
		return
	}
	c.dmu.Lock()
	if !c.closing {
		c.raw.SetReadDeadline(time.Now().Add(t))
		c.rdArmed = now
	}
	c.dmu.Unlock()
}

// clockBase anchors monoNow.
var clockBase = time.Now()

// monoNow reads a monotonic clock, in nanoseconds (never 0). The request
// path times itself with it: one clock read where time.Now takes two (the
// wall clock too), and the request path reads the clock several times per
// request.
func monoNow() int64 { return int64(time.Since(clockBase)) + 1 }

// startTransmission replaces the handshake deadline by the idle ones.
func (c *conn) startTransmission(e *export) {
	c.dmu.Lock()
	if !c.closing {
		c.raw.SetDeadline(time.Time{})
	}
	c.dmu.Unlock()
	c.w.lock()
	c.w.timeout = c.s.IdleTimeout
	c.w.mu.Unlock()
	c.lastDone.Store(monoNow()) // idle time counts from here until a request ends
	c.armRead()
	c.exp = e
	c.size = e.Disk.Size()
	if c.metaExport != e.Name {
		// Contexts set for another export do not apply.
		c.metaSet, c.ctxBase, c.ctxDepth = false, false, false
	}
	c.free = make(chan *request, c.s.Workers)
	reqs := make([]request, c.s.Workers)
	for i := range reqs {
		c.free <- &reqs[i]
	}
	c.work = make(chan *request)
	c.budget = newPool(c.s.ConnBuffer)
	c.log = c.log.With("export", e.Name)
	c.log.Debug("transmission phase", "size", c.size, "structured", c.structured,
		"base:allocation", c.ctxBase, "qemu:allocation-depth", c.ctxDepth, "tls", c.tls)
}

// transmissionFlags are the flags sent for e on this connection.
func (c *conn) transmissionFlags(e *export) uint16 {
	f := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendCache)
	if e.readOnly {
		f |= tflagReadOnly
	} else {
		f |= tflagSendTrim | tflagSendWriteZeroes | tflagSendFastZero
	}
	if c.s.multiConn() {
		f |= tflagCanMultiConn
	}
	if c.structured {
		f |= tflagSendDF
	}
	return f
}

func (c *conn) readFull(p []byte) error {
	_, err := io.ReadFull(c.r, p)
	return err
}
