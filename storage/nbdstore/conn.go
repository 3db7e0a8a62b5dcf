package nbdstore

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/backoff"
	"github.com/vdisk/vdisk/nbd"
)

// slot is one connection of a file's pool; it is redialled when it drops.
type slot struct {
	mu sync.Mutex
	c  *nbd.Client
	// err is why the last redial gave up, at errAt: requests that waited
	// for that redial fail with it instead of starting another.
	err   error
	errAt time.Time
}

// setDeadline gives nc ctx's deadline, if any.
func setDeadline(ctx context.Context, nc net.Conn) {
	if d, ok := ctx.Deadline(); ok {
		nc.SetDeadline(d)
	}
}

// dial connects and negotiates once, within the open timeout and ctx.
func dial(ctx context.Context, cfg *config, t *target) (*nbd.Client, error) {
	ctx, cancel := context.WithTimeout(ctx, cfg.openTimeout)
	defer cancel()
	nc, err := cfg.dialer.Dial(ctx, t.network, t.addr)
	if err != nil {
		return nil, err
	}
	setDeadline(ctx, nc)
	// Cancelling ctx ends a negotiation that waits on the server.
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Now()) })
	metas := []string{nbd.ContextBaseAllocation}
	if cfg.allocDepth {
		metas = append(metas, nbd.ContextAllocationDepth)
	}
	cl, err := nbd.NewClient(nc, &nbd.ClientOptions{
		ExportName:      t.export,
		MetaContexts:    metas,
		TLSConfig:       cfg.tls,
		ExtendedHeaders: true, // servers without them refuse; compact headers then
	})
	if !stop() && err == nil {
		cl.Close()
		return nil, context.Cause(ctx)
	}
	if err != nil {
		nc.Close()
		return nil, err
	}
	nc.SetDeadline(time.Time{})
	return cl, nil
}

// permanent reports whether a failed connection attempt would fail the
// same way again: the server answered and refused (anything but
// NBD_REP_ERR_SHUTDOWN), the peer is not an NBD server, TLS verification
// failed either way, or the host name does not exist. Refused, reset and
// cut connections and timeouts are transient.
func permanent(err error) bool {
	var ne *nbd.Error
	if errors.As(err, &ne) {
		return ne.Errno != nbd.RepErrShutdown
	}
	var (
		cve   *tls.CertificateVerificationError
		ua    x509.UnknownAuthorityError
		he    x509.HostnameError
		ci    x509.CertificateInvalidError
		alert tls.AlertError
		dns   *net.DNSError
	)
	switch {
	case errors.Is(err, nbd.ErrNotNBD), errors.Is(err, context.Canceled),
		errors.As(err, &cve), errors.As(err, &ua), errors.As(err, &he), errors.As(err, &ci), errors.As(err, &alert):
		return true
	case errors.As(err, &dns):
		return dns.IsNotFound
	}
	return false
}

// openPermanent is permanent, and a timeout too: a server that accepts
// and then says nothing within the open timeout is not restarting, and
// the open timeout bounds the open.
func openPermanent(err error) bool {
	var ne net.Error
	return permanent(err) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) ||
		errors.As(err, &ne) && ne.Timeout()
}

// retryPolicy is the backoff of a connection that is dialled again for
// up to total.
func retryPolicy(total time.Duration) backoff.Policy {
	if total <= 0 {
		return backoff.Policy{Attempts: 1}
	}
	return backoff.Policy{Initial: 20 * time.Millisecond, Max: time.Second, Attempts: 1 << 20, Total: total}
}

// openError explains a failed first connection.
func openError(t *target, err error) error {
	var ne *nbd.Error
	if errors.As(err, &ne) {
		switch ne.Errno {
		case nbd.RepErrUnknown:
			return &driver.Error{Op: "open", File: t.url, Offset: -1, Reason: fmt.Sprintf("the server has no export %q (%v)", t.export, ne), Err: driver.ErrNotFound}
		case nbd.RepErrTLSReqd:
			return &driver.Error{Op: "open", File: t.url, Offset: -1, Reason: "the server requires TLS: use an nbds:// URL with tls-creds", Err: err}
		case nbd.RepErrPolicy:
			return &driver.Error{Op: "open", File: t.url, Offset: -1, Reason: "the server refused the export by policy", Err: err}
		}
	}
	return &driver.Error{Op: "open", File: t.url, Offset: -1, Reason: "NBD connection", Err: err}
}

// client returns s's working connection, redialling a dropped one with
// backoff for up to the reconnect delay.
func (f *File) client(s *slot) (*nbd.Client, error) {
	asked := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.c != nil {
		if s.c.Err() == nil {
			return s.c, nil
		}
		s.c.Close()
		s.c = nil
	}
	if f.closed.Load() {
		return nil, driver.ErrClosed
	}
	if s.err != nil && s.errAt.After(asked) {
		return nil, s.err
	}
	var c *nbd.Client
	notify := func(n int, err error, wait time.Duration) {
		f.cfg.log.Debug("nbd: redialling", "url", f.t.url, "attempt", n, "err", err, "backoff", wait)
	}
	err := backoff.Retry(f.ctx, retryPolicy(f.cfg.reconnect), permanent, notify, func(ctx context.Context, _ int) error {
		var err error
		c, err = dial(ctx, f.cfg, f.t)
		return err
	})
	if err != nil {
		if f.ctx.Err() != nil {
			return nil, driver.ErrClosed
		}
		if !permanent(err) {
			err = fmt.Errorf("could not reconnect within %v: %w", f.cfg.reconnect, err)
		}
		s.err, s.errAt = err, time.Now()
		return nil, err
	}
	if err := f.sameExport(c); err != nil {
		c.Close()
		return nil, err
	}
	s.c = c
	return c, nil
}

// dialFirst makes the first connection of an open, retrying transient
// failures with backoff for up to the open-retry time.
func dialFirst(ctx context.Context, cfg *config, t *target) (*nbd.Client, error) {
	var c *nbd.Client
	notify := func(n int, err error, wait time.Duration) {
		cfg.log.Info("nbd: open failed, retrying", "url", t.url, "attempt", n, "err", err, "backoff", wait)
	}
	err := backoff.Retry(ctx, retryPolicy(cfg.openRetry), openPermanent, notify, func(ctx context.Context, _ int) error {
		var err error
		c, err = dial(ctx, cfg, t)
		return err
	})
	return c, err
}

// sameExport checks that a new connection reaches the export the file
// was opened on.
func (f *File) sameExport(c *nbd.Client) error {
	if c.Size() != f.size {
		return fmt.Errorf("the export's size changed from %d to %d bytes across a reconnect", f.size, c.Size())
	}
	if f.rw && c.Flags()&nbd.TFlagReadOnly != 0 {
		return errors.New("the export became read-only across a reconnect")
	}
	return nil
}

// drop forgets c if it is still s's connection.
func (f *File) drop(s *slot, c *nbd.Client) {
	s.mu.Lock()
	if s.c == c {
		s.c = nil
	}
	s.mu.Unlock()
	c.Close()
}

// request runs fn on a connection of the pool. A connection failure
// (anything but an error reply of the server) drops the connection, and
// fn runs once more on a new one: NBD's READ, WRITE, TRIM, WRITE_ZEROES
// and FLUSH can all be repeated.
func (f *File) request(op string, off int64, fn func(ctx context.Context, c *nbd.Client) error) error {
	if f.closed.Load() {
		return &driver.Error{Op: op, File: f.t.url, Offset: off, Err: driver.ErrClosed}
	}
	s := f.slots[int(f.next.Add(1)%uint64(len(f.slots)))]
	var last error
	for attempt := 0; attempt < 2; attempt++ {
		c, err := f.client(s)
		if err != nil {
			if last != nil {
				err = fmt.Errorf("%w (after: %v)", err, last)
			}
			return &driver.Error{Op: op, File: f.t.url, Offset: off, Reason: "NBD connection lost", Err: err}
		}
		ctx, cancel := f.ctx, context.CancelFunc(func() {})
		if f.cfg.requestTimeout > 0 {
			ctx, cancel = context.WithTimeout(f.ctx, f.cfg.requestTimeout)
		}
		err = fn(ctx, c)
		cancel()
		if err == nil {
			return nil
		}
		var ne *nbd.Error
		if errors.As(err, &ne) {
			return &driver.Error{Op: op, File: f.t.url, Offset: off, Reason: "NBD server error", Err: err}
		}
		if f.closed.Load() {
			return &driver.Error{Op: op, File: f.t.url, Offset: off, Err: driver.ErrClosed}
		}
		f.cfg.log.Debug("nbd: connection failed", "url", f.t.url, "op", op, "offset", off, "err", err)
		f.drop(s, c)
		last = err
		if f.cfg.reconnect == 0 {
			break
		}
	}
	return &driver.Error{Op: op, File: f.t.url, Offset: off, Reason: "NBD connection lost (request retried once)", Err: last}
}
