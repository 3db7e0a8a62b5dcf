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
// Limits: a Server serves at most MaxConnections clients at once (fewer with
// MaxConns or a small MemoryBudget), and the buffers of all its connections
// and requests together stay within MemoryBudget: each connection is charged
// a fixed amount for its reader, writer and goroutines, and each request its
// data buffer (READ, WRITE, CACHE's read buffer, block status lists) plus a
// fixed amount; a request that does not fit waits, in arrival order, until
// earlier ones finish. READ and WRITE payloads are bounded by MaxPayload (or
// less with a small budget; the bound is advertised in NBD_INFO_BLOCK_SIZE);
// TRIM, WRITE_ZEROES and CACHE run in 32 MiB pieces. A connection runs at
// most Workers requests at once and holds at most ConnBuffer bytes of data
// buffers. A client that sends nothing for IdleTimeout while no request of
// it runs, or that does not take a reply within IdleTimeout, is
// disconnected. A malformed request or option ends that connection only.
// Replies go out as requests complete, possibly out of order; a slow client
// stalls only its own connection.
type Server struct {
	Exports []*Export
	// MaxConns bounds the clients served at once (qemu-nbd's --shared);
	// further clients wait in the listen backlog. 0 means no limit other
	// than MaxConnections. NBD_FLAG_CAN_MULTI_CONN is advertised unless
	// only one client can be served: every connection to an export shares
	// one Disk, so a flush on one covers writes completed on all, but with
	// a single slot a client opening a second connection would wait
	// forever.
	MaxConns int
	// MaxConnections is the hard bound on connections, whatever MaxConns
	// says (0: DefaultMaxConnections). Serve leaves further clients in the
	// listen backlog; ServeConn refuses them with ErrTooManyConnections.
	// It is lowered when MemoryBudget cannot hold that many connections in
	// half of it.
	MaxConnections int
	// MemoryBudget bounds the bytes of connection and request buffers of
	// the whole server (0: DefaultMemoryBudget; at least MinMemoryBudget).
	MemoryBudget int64
	// IdleTimeout disconnects a client that sends nothing for that long
	// while none of its requests runs, or whose replies cannot be sent for
	// that long because it does not read them (0: DefaultIdleTimeout;
	// negative: no limit).
	IdleTimeout time.Duration
	// Persistent keeps serving after the last client leaves. Without it
	// Serve returns once the number of clients drops back to zero after the
	// first one came (qemu-nbd without -t).
	Persistent bool
	// TLSConfig enables NBD_OPT_STARTTLS; TLSRequired refuses every option
	// but STARTTLS and ABORT until TLS is up (the spec's FORCEDTLS mode).
	// A TLSConfig that requires client certificates (ClientAuth
	// RequireAnyClientCert or RequireAndVerifyClientCert, see
	// ServerTLSConfig) implies TLSRequired: otherwise a client could skip
	// the authentication by not starting TLS.
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
	// ConnBuffer bounds the bytes of data buffers one connection holds
	// at once (default and minimum twice the advertised maximum payload,
	// 64 MiB unless MemoryBudget is small). A client that stops reading
	// its replies keeps up to this much of MemoryBudget until IdleTimeout
	// cuts it off.
	ConnBuffer int64
	// Allow, when set, filters clients by remote address, in Serve and
	// ServeConn alike and whatever the network (a unix socket client has a
	// *net.UnixAddr, usually without a name); refused connections are
	// closed at once.
	Allow func(net.Addr) bool
	// Logger receives connection events (debug) and errors (warn); nil
	// discards them.
	Logger *slog.Logger

	once       sync.Once
	initErr    error
	exports    map[string]*export
	order      []*export
	slots      chan struct{} // one per connection served
	mem        *pool         // request buffers of every connection
	maxPayload uint32        // the READ/WRITE bound advertised
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
		if s.TLSConfig != nil && (s.TLSConfig.ClientAuth == tls.RequireAnyClientCert ||
			s.TLSConfig.ClientAuth == tls.RequireAndVerifyClientCert) {
			s.TLSRequired = true
		}
		if err := s.initLimits(); err != nil {
			s.initErr = err
			return
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

func (s *Server) multiConn() bool { return cap(s.slots) != 1 }

// initLimits applies the defaults of the limits and splits the memory
// budget between connections and requests.
func (s *Server) initLimits() error {
	if s.IdleTimeout == 0 {
		s.IdleTimeout = DefaultIdleTimeout
	}
	if s.MemoryBudget == 0 {
		s.MemoryBudget = DefaultMemoryBudget
	}
	if s.MemoryBudget < MinMemoryBudget {
		return driver.OptionErrorf("the memory budget (%d bytes) is below the minimum of %d bytes", s.MemoryBudget, MinMemoryBudget)
	}
	if s.MaxConnections <= 0 {
		s.MaxConnections = DefaultMaxConnections
	}
	limit := s.MaxConnections
	if s.MaxConns > 0 {
		limit = min(limit, s.MaxConns)
	}
	if fit := int(s.MemoryBudget / 2 / connCharge); limit > fit {
		s.Logger.Warn("the memory budget limits the connections served at once", "connections", fit, "budget", s.MemoryBudget)
		limit = fit
	}
	s.slots = make(chan struct{}, limit)
	reqMem := s.MemoryBudget - int64(limit)*connCharge
	s.mem = newPool(reqMem)
	// The largest payload must fit the request budget with its charge.
	s.maxPayload = uint32(min(MaxPayload, (reqMem-requestCharge)&^(PreferredBlockSize-1)))
	if s.ConnBuffer < 2*int64(s.maxPayload) {
		s.ConnBuffer = 2 * int64(s.maxPayload)
	}
	return nil
}

// ErrTooManyConnections is returned by ServeConn when the server already
// serves its maximum of connections; the connection is closed.
var ErrTooManyConnections = errors.New("nbd: too many connections")

// ErrRefused is returned by ServeConn when Allow refuses the client; the
// connection is closed.
var ErrRefused = errors.New("nbd: client refused by the address filter")

// Serve accepts clients on l until ctx is cancelled or, without
// Persistent, until the last client has left. It then stops accepting,
// lets in-flight requests finish (up to ShutdownGrace), closes every
// connection and returns nil. It closes l. Errors other than the end of
// the listener are returned after the same shutdown. Clients beyond the
// connection limits wait in the listen backlog: Serve accepts only when it
// can serve.
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

	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		active int
		delay  time.Duration
		serr   error
	)
	for {
		select {
		case s.slots <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		nc, err := l.Accept()
		if err != nil {
			<-s.slots
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
		if !s.allowed(nc) {
			<-s.slots
			continue
		}
		mu.Lock()
		active++
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.serveConn(ctx, nc); err != nil {
				s.Logger.Warn("connection ended with an error", "remote", remoteName(nc), "err", err)
			}
			<-s.slots
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

// allowed applies Allow to a new connection, closing it when refused.
func (s *Server) allowed(nc net.Conn) bool {
	if s.Allow == nil || s.Allow(nc.RemoteAddr()) {
		return true
	}
	s.Logger.Warn("connection refused by the address filter", "remote", remoteName(nc))
	nc.Close()
	return false
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
// between messages) returns nil. Allow and the connection limits apply as
// in Serve, except that a connection beyond the limits cannot wait in a
// backlog: it is closed at once with ErrTooManyConnections (and a refused
// one with ErrRefused).
func (s *Server) ServeConn(ctx context.Context, nc net.Conn) error {
	if err := s.init(); err != nil {
		nc.Close()
		return err
	}
	if !s.allowed(nc) {
		return ErrRefused
	}
	select {
	case s.slots <- struct{}{}:
	default:
		s.Logger.Warn("connection refused: too many connections", "remote", remoteName(nc), "limit", cap(s.slots))
		nc.Close()
		return ErrTooManyConnections
	}
	defer func() { <-s.slots }()
	return s.serveConn(ctx, nc)
}

func (s *Server) serveConn(ctx context.Context, nc net.Conn) error {
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
