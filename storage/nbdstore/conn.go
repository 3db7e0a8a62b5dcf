package nbdstore

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/nbd"
)

// slot is one connection of a file's pool; it is redialled when it drops.
type slot struct {
	mu sync.Mutex
	c  *nbd.Client
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
	cl, err := nbd.NewClient(nc, &nbd.ClientOptions{
		ExportName:      t.export,
		MetaContexts:    []string{nbd.ContextBaseAllocation},
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
	deadline := time.Now().Add(f.cfg.reconnect)
	backoff := 20 * time.Millisecond
	for {
		c, err := dial(f.ctx, f.cfg, f.t)
		if err == nil {
			err = f.sameExport(c)
			if err != nil {
				c.Close()
				return nil, err
			}
			s.c = c
			return c, nil
		}
		var ne *nbd.Error
		if errors.As(err, &ne) && ne.Errno != nbd.RepErrShutdown {
			// The server answers and refuses: retrying will not help.
			return nil, err
		}
		if f.ctx.Err() != nil {
			return nil, driver.ErrClosed
		}
		if time.Now().Add(backoff).After(deadline) {
			return nil, fmt.Errorf("could not reconnect within %v: %w", f.cfg.reconnect, err)
		}
		f.cfg.log.Debug("nbd: redialling", "url", f.t.url, "err", err, "backoff", backoff)
		select {
		case <-time.After(backoff):
		case <-f.ctx.Done():
			return nil, driver.ErrClosed
		}
		backoff = min(2*backoff, time.Second)
	}
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
