package nbd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

// Export is one disk a Server offers under a name.
type Export struct {
	// Name is what clients ask for; "" is the default export.
	Name string
	// Description is shown by NBD_OPT_LIST and NBD_INFO_DESCRIPTION.
	Description string
	// Disk is served; it is shared by every connection to the export (a
	// Disk is safe for concurrent use). The server neither flushes nor
	// closes it when Serve returns: the owner does.
	Disk *vdisk.Disk
	// ReadOnly serves the disk read-only even when it is writable.
	ReadOnly bool
}

// Server serves exports over NBD. Set the fields, then call Serve (or
// ServeConn); the fields must not change afterwards.
//
// Limits: READ and WRITE payloads are bounded by MaxPayload (advertised in
// NBD_INFO_BLOCK_SIZE); a connection runs at most Workers requests at once
// and holds at most ConnBuffer bytes of request buffers (plus about 1 MiB
// per running request for CACHE, block status and the Disk's own zeroing
// buffers), so its memory is bounded whatever the client sends. A malformed request or option ends
// that connection only. Replies go out as requests complete, possibly out
// of order; a slow client stalls only its own connection.
type Server struct {
	Exports []*Export
	// MaxConns bounds the clients served at once (qemu-nbd's --shared);
	// further clients wait in the listen backlog. 0 means no limit.
	// NBD_FLAG_CAN_MULTI_CONN is advertised unless MaxConns is 1: every
	// connection to an export shares one Disk, so a flush on one covers
	// writes completed on all, but with a single slot a client opening a
	// second connection would wait forever.
	MaxConns int
	// Persistent keeps serving after the last client leaves. Without it
	// Serve returns once the number of clients drops back to zero after the
	// first one came (qemu-nbd without -t).
	Persistent bool
	// TLSConfig enables NBD_OPT_STARTTLS; TLSRequired refuses every option
	// but STARTTLS and ABORT until TLS is up (the spec's FORCEDTLS mode).
	TLSConfig   *tls.Config
	TLSRequired bool
	// HandshakeTimeout bounds the time from connection to transmission
	// phase (default 10s; negative: no limit).
	HandshakeTimeout time.Duration
	// ShutdownGrace is how long Serve waits for in-flight requests after
	// its context is cancelled before closing connections (default 5s).
	ShutdownGrace time.Duration
	// Workers is the number of requests one connection runs concurrently
	// (default 32).
	Workers int
	// ConnBuffer bounds the bytes of READ/WRITE buffers one connection
	// holds at once (default and minimum 2*MaxPayload).
	ConnBuffer int64
	// Allow, when set, filters clients by remote address; refused
	// connections are closed at once.
	Allow func(net.Addr) bool
	// Logger receives connection events (debug) and errors (warn); nil
	// discards them.
	Logger *slog.Logger

	once    sync.Once
	initErr error
	exports map[string]*export
	order   []*export
}

// export is an Export with what the server derives from it once.
type export struct {
	*Export
	readOnly bool
}

func (s *Server) init() error {
	s.once.Do(func() {
		if s.Logger == nil {
			s.Logger = slog.New(slog.DiscardHandler)
		}
		if s.HandshakeTimeout == 0 {
			s.HandshakeTimeout = 10 * time.Second
		}
		if s.ShutdownGrace <= 0 {
			s.ShutdownGrace = 5 * time.Second
		}
		if s.Workers <= 0 {
			s.Workers = 32
		}
		if s.ConnBuffer < 2*MaxPayload {
			s.ConnBuffer = 2 * MaxPayload
		}
		if s.TLSRequired && s.TLSConfig == nil {
			s.initErr = driver.OptionErrorf("TLS is required but no TLS configuration is given")
			return
		}
		if len(s.Exports) == 0 {
			s.initErr = driver.OptionErrorf("no export to serve")
			return
		}
		s.exports = map[string]*export{}
		for _, e := range s.Exports {
			if e == nil || e.Disk == nil {
				s.initErr = driver.OptionErrorf("export %q has no disk", nameOf(e))
				return
			}
			if len(e.Name) > maxStringLen || len(e.Description) > maxStringLen {
				s.initErr = driver.OptionErrorf("export name or description longer than %d bytes", maxStringLen)
				return
			}
			if _, dup := s.exports[e.Name]; dup {
				s.initErr = driver.OptionErrorf("export %q is given twice", e.Name)
				return
			}
			x := &export{Export: e, readOnly: e.ReadOnly || e.Disk.ReadOnly()}
			s.exports[e.Name] = x
			s.order = append(s.order, x)
		}
	})
	return s.initErr
}

func nameOf(e *Export) string {
	if e == nil {
		return ""
	}
	return e.Name
}

func (s *Server) lookup(name string) *export { return s.exports[name] }

func (s *Server) multiConn() bool { return s.MaxConns != 1 }

// Serve accepts clients on l until ctx is cancelled or, without
// Persistent, until the last client has left. It then stops accepting,
// lets in-flight requests finish (up to ShutdownGrace), closes every
// connection and returns nil. It closes l. Errors other than the end of
// the listener are returned after the same shutdown.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	if err := s.init(); err != nil {
		l.Close()
		return err
	}
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	go func() {
		<-ctx.Done()
		l.Close()
	}()

	var slots chan struct{}
	if s.MaxConns > 0 {
		slots = make(chan struct{}, s.MaxConns)
	}
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		active int
		delay  time.Duration
		serr   error
	)
	for {
		if slots != nil {
			select {
			case slots <- struct{}{}:
			case <-ctx.Done():
			}
			if ctx.Err() != nil {
				break
			}
		}
		nc, err := l.Accept()
		if err != nil {
			if slots != nil {
				<-slots
			}
			if ctx.Err() != nil {
				break
			}
			if isTemporary(err) {
				// Out of file descriptors and the like: back off.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				s.Logger.Warn("accept failed; retrying", "err", err, "delay", delay)
				select {
				case <-time.After(delay):
				case <-ctx.Done():
				}
				continue
			}
			serr = err
			break
		}
		delay = 0
		if s.Allow != nil && !s.Allow(nc.RemoteAddr()) {
			s.Logger.Warn("connection refused by --allow-from", "remote", nc.RemoteAddr().String())
			nc.Close()
			if slots != nil {
				<-slots
			}
			continue
		}
		mu.Lock()
		active++
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.ServeConn(ctx, nc); err != nil {
				s.Logger.Warn("connection ended with an error", "remote", remoteName(nc), "err", err)
			}
			if slots != nil {
				<-slots
			}
			mu.Lock()
			active--
			last := active == 0
			mu.Unlock()
			if last && !s.Persistent {
				s.Logger.Debug("last client left; stopping")
				stop()
			}
		}()
	}
	stop()
	wg.Wait()
	return serr
}

func isTemporary(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	var se interface{ Temporary() bool }
	if errors.As(err, &se) && se.Temporary() {
		return true
	}
	return false
}

func remoteName(nc net.Conn) string {
	if a := nc.RemoteAddr(); a != nil && a.String() != "" && a.String() != "@" {
		return a.String()
	}
	return "local"
}

// ServeConn runs the NBD protocol on one connection (already accepted) until
// the client disconnects, the connection fails or ctx is cancelled (then
// in-flight requests get up to ShutdownGrace to finish). It closes nc. A
// clean disconnect (NBD_OPT_ABORT, NBD_CMD_DISC, or the client hanging up
// between messages) returns nil.
func (s *Server) ServeConn(ctx context.Context, nc net.Conn) error {
	if err := s.init(); err != nil {
		nc.Close()
		return err
	}
	c := newConn(s, nc)
	return c.serve(ctx)
}

// errnoOf maps a library error to an NBD error value.
func errnoOf(err error) uint32 {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, vdisk.ErrReadOnly):
		return EPERM
	case errors.Is(err, vdisk.ErrOutOfRange), errors.Is(err, vdisk.ErrInvalidOption):
		return EINVAL
	case isNoSpace(err):
		return ENOSPC
	}
	return EIO
}

// protoError is a protocol violation by the client: the connection ends.
type protoError struct{ msg string }

func (e *protoError) Error() string { return "protocol error: " + e.msg }

func protoErrorf(format string, args ...any) error {
	return &protoError{fmt.Sprintf(format, args...)}
}
