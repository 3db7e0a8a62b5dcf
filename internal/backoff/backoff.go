// Package backoff retries an operation with exponential backoff and
// jitter, within a number of attempts and a total time, and stops early on
// a permanent error or when the context ends. The network storages use it
// to redial a server that is restarting.
package backoff

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"
)

// Policy bounds the retries. Zero fields take the defaults.
type Policy struct {
	// Initial is the wait before the second attempt (default 50ms).
	Initial time.Duration
	// Max bounds one wait (default 2s).
	Max time.Duration
	// Attempts bounds the calls of the operation (default 6; 1: no retry).
	Attempts int
	// Total bounds the time from the first call to the start of the last
	// (default 10s): no attempt starts after it, nor a wait that would
	// end after it. An attempt's own duration counts.
	Total time.Duration
	// Jitter is the fraction by which each wait is spread at random
	// (default 0.3): a wait w is drawn from [w(1-Jitter), w(1+Jitter)].
	Jitter float64
}

// Default is the policy of an open: a few attempts within about 10s.
var Default = Policy{}

func (p Policy) norm() Policy {
	if p.Initial <= 0 {
		p.Initial = 50 * time.Millisecond
	}
	if p.Max <= 0 {
		p.Max = 2 * time.Second
	}
	if p.Max < p.Initial {
		p.Max = p.Initial
	}
	if p.Attempts <= 0 {
		p.Attempts = 6
	}
	if p.Total <= 0 {
		p.Total = 10 * time.Second
	}
	if p.Jitter <= 0 {
		p.Jitter = 0.3
	}
	if p.Jitter > 1 {
		p.Jitter = 1
	}
	return p
}

// Wait returns the wait before attempt n+1 (n >= 1 attempts made), with
// jitter: Initial*2^(n-1), capped at Max, then spread by ±Jitter.
func (p Policy) Wait(n int) time.Duration {
	p = p.norm()
	w := p.Initial
	for i := 1; i < n && w < p.Max; i++ {
		w *= 2
	}
	w = min(w, p.Max)
	f := 1 - p.Jitter + 2*p.Jitter*rand.Float64()
	return time.Duration(float64(w) * f)
}

// Error is what Retry returns when it gives up on a transient error: the
// number of attempts, the time spent and the last error (which errors.Is
// and errors.As see).
type Error struct {
	Attempts int
	Elapsed  time.Duration
	Err      error
}

func (e *Error) Error() string {
	if e.Attempts == 1 {
		return e.Err.Error()
	}
	return fmt.Sprintf("%v (gave up after %d attempts in %v)", e.Err, e.Attempts, e.Elapsed.Round(time.Millisecond))
}

func (e *Error) Unwrap() error { return e.Err }

// Retry calls op until it returns nil, an error permanent reports true
// for (returned as is), the policy's attempts or total time run out, or
// ctx ends. op gets the attempt number, from 1. notify, if not nil, is
// called before each wait. A transient failure that ends the retries is
// returned as an *Error wrapping the last error; when ctx ends, the error
// wraps both ctx's cause and the last error.
func Retry(ctx context.Context, p Policy, permanent func(error) bool, notify func(attempt int, err error, wait time.Duration), op func(ctx context.Context, attempt int) error) error {
	p = p.norm()
	start := time.Now()
	if ctx.Err() != nil {
		return context.Cause(ctx)
	}
	for n := 1; ; n++ {
		err := op(ctx, n)
		if err == nil {
			return nil
		}
		if permanent != nil && permanent(err) {
			return err
		}
		if ctx.Err() != nil {
			return errors.Join(context.Cause(ctx), err)
		}
		elapsed := time.Since(start)
		if n >= p.Attempts {
			return &Error{Attempts: n, Elapsed: elapsed, Err: err}
		}
		w := p.Wait(n)
		if elapsed+w > p.Total {
			return &Error{Attempts: n, Elapsed: elapsed, Err: err}
		}
		if notify != nil {
			notify(n, err, w)
		}
		t := time.NewTimer(w)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return errors.Join(context.Cause(ctx), err)
		}
	}
}
