package backoff

import (
	"context"
	"errors"
	"testing"
	"time"
)

var errTransient = errors.New("transient")
var errPermanent = errors.New("permanent")

func isPermanent(err error) bool { return errors.Is(err, errPermanent) }

func TestRetry(t *testing.T) {
	fast := Policy{Initial: time.Millisecond, Max: 4 * time.Millisecond, Attempts: 5, Total: time.Second}
	tests := []struct {
		name       string
		p          Policy
		fails      []error // what op returns on attempt i (nil after)
		wantCalls  int
		wantErr    error
		wantGaveUp bool
	}{
		{"first succeeds", fast, nil, 1, nil, false},
		{"two transient then ok", fast, []error{errTransient, errTransient}, 3, nil, false},
		{"permanent stops at once", fast, []error{errTransient, errPermanent}, 2, errPermanent, false},
		{"attempts run out", fast, []error{errTransient, errTransient, errTransient, errTransient, errTransient, errTransient}, 5, errTransient, true},
		{"one attempt", Policy{Attempts: 1}, []error{errTransient}, 1, errTransient, true},
		{"total runs out", Policy{Initial: 40 * time.Millisecond, Max: 40 * time.Millisecond, Attempts: 100, Total: 100 * time.Millisecond},
			[]error{errTransient, errTransient, errTransient, errTransient, errTransient, errTransient, errTransient}, 0, errTransient, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			calls := 0
			start := time.Now()
			err := Retry(context.Background(), tt.p, isPermanent, nil, func(ctx context.Context, n int) error {
				calls++
				if n != calls {
					t.Errorf("attempt %d numbered %d", calls, n)
				}
				if n <= len(tt.fails) {
					return tt.fails[n-1]
				}
				return nil
			})
			if tt.wantCalls > 0 && calls != tt.wantCalls {
				t.Errorf("calls = %d, want %d", calls, tt.wantCalls)
			}
			if !errors.Is(err, tt.wantErr) || (tt.wantErr == nil) != (err == nil) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			var ge *Error
			if errors.As(err, &ge) != tt.wantGaveUp {
				t.Errorf("err %v: *Error = %v, want %v", err, !tt.wantGaveUp, tt.wantGaveUp)
			}
			if tt.name == "total runs out" {
				if calls < 2 || calls > 4 {
					t.Errorf("%d calls within a 100ms total with 40ms waits", calls)
				}
				if d := time.Since(start); d > 200*time.Millisecond {
					t.Errorf("took %v, total is 100ms", d)
				}
			}
		})
	}
}

func TestRetryContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	calls := 0
	start := time.Now()
	go func() { time.Sleep(50 * time.Millisecond); cancel() }()
	err := Retry(ctx, Policy{Initial: time.Second, Total: time.Minute}, nil, nil, func(context.Context, int) error {
		calls++
		return errTransient
	})
	if !errors.Is(err, context.Canceled) || !errors.Is(err, errTransient) {
		t.Fatalf("err = %v, want canceled and the last error", err)
	}
	if calls != 1 || time.Since(start) > 500*time.Millisecond {
		t.Fatalf("%d calls in %v: the wait was not cut short", calls, time.Since(start))
	}
	// An ended context makes no call.
	calls = 0
	err = Retry(ctx, Policy{}, nil, nil, func(context.Context, int) error { calls++; return nil })
	if calls != 0 || !errors.Is(err, context.Canceled) {
		t.Fatalf("ended context: %d calls, err %v", calls, err)
	}
}

func TestWait(t *testing.T) {
	p := Policy{Initial: 100 * time.Millisecond, Max: time.Second, Jitter: 0.25}
	for _, tt := range []struct {
		n    int
		base time.Duration
	}{{1, 100 * time.Millisecond}, {2, 200 * time.Millisecond}, {3, 400 * time.Millisecond}, {4, 800 * time.Millisecond}, {5, time.Second}, {50, time.Second}} {
		lo, hi := tt.base*3/4, tt.base*5/4
		seen := map[time.Duration]bool{}
		for range 50 {
			w := p.Wait(tt.n)
			if w < lo || w > hi {
				t.Fatalf("Wait(%d) = %v, want within [%v, %v]", tt.n, w, lo, hi)
			}
			seen[w] = true
		}
		if len(seen) < 2 {
			t.Errorf("Wait(%d) has no jitter", tt.n)
		}
	}
	// The default policy keeps a whole retry within about 10s.
	d := Policy{}.norm()
	if d.Total > 10*time.Second || d.Attempts < 3 {
		t.Errorf("default policy %+v", d)
	}
}
