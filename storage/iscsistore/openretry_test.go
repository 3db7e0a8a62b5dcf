package iscsistore_test

import (
	"context"
	"errors"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/iscsi/iscsitest"
)

// flakyDialer refuses the first refuse dials, then cuts the next cut
// connections at the first PDU the target sends (inside the login), then
// dials through; it records every address dialled.
type flakyDialer struct {
	refuse, cut int32
	n           atomic.Int32
	mu          sync.Mutex
	addrs       []string
}

func (f *flakyDialer) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	k := f.n.Add(1)
	f.mu.Lock()
	f.addrs = append(f.addrs, addr)
	f.mu.Unlock()
	if k <= f.refuse {
		return nil, &net.OpError{Op: "dial", Net: network, Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, network, addr)
	if err != nil || k > f.refuse+f.cut {
		return nc, err
	}
	return &cutConn{Conn: nc, readCut: 1}, nil
}

func (f *flakyDialer) dialled() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.addrs...)
}

// TestOpenRetry: an open whose first logins are refused or cut is retried
// with backoff within open-retry; refusals of the target (CHAP, unknown
// target) are not retried.
func TestOpenRetry(t *testing.T) {
	tg, file := newTarget(t, 1<<20)
	want := pattern(1<<20, 3)
	if err := os.WriteFile(file, want, 0o644); err != nil {
		t.Fatal(err)
	}
	tg.AddAccount("alice", "alice-secret-12", false)
	good := strings.Replace(tg.URL(1), "iscsi://", "iscsi://alice%alice-secret-12@", 1)
	tests := []struct {
		name        string
		url         string
		refuse, cut int32
		retry       string
		wantDials   int32 // 0: at least 2
		wantErr     string
		maxTime     time.Duration
	}{
		{"refused thrice", good, 3, 0, "", 4, "", 5 * time.Second},
		{"cut in login twice", good, 0, 2, "", 3, "", 5 * time.Second},
		{"refused then cut", good, 1, 1, "", 3, "", 5 * time.Second},
		{"retry off", good, 1, 0, "0", 1, "connection refused", time.Second},
		{"always refused", good, 1 << 30, 0, "0.7", 0, "gave up after", 3 * time.Second},
		{"wrong secret", strings.Replace(good, "alice-secret-12", "wrong-secret-00", 1), 0, 0, "", 1, "wrong user or secret", 2 * time.Second},
		{"wrong secret after refusals", strings.Replace(good, "alice-secret-12", "wrong-secret-00", 1), 2, 0, "", 3, "wrong user or secret", 5 * time.Second},
		{"unknown target", strings.Replace(good, testIQN, testIQN+"x", 1), 0, 0, "", 1, "target not found", 2 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fd := &flakyDialer{refuse: tt.refuse, cut: tt.cut}
			o := &vdisk.OpenOptions{Format: "raw", ReadOnly: true, Dialer: fd.dial}
			if tt.retry != "" {
				o.StorageOptions = map[string]string{"open-retry": tt.retry}
			}
			start := time.Now()
			d, err := vdisk.Open(context.Background(), tt.url, o)
			el := time.Since(start)
			n := fd.n.Load()
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("after %d dials: %v", n, err)
				}
				defer d.Close()
				got := make([]byte, len(want))
				if _, err := d.ReadAt(got, 0); err != nil {
					t.Fatal(err)
				}
				mustEqual(t, "read", got, want)
			} else if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), testIQN) {
				if err == nil {
					d.Close()
				}
				t.Fatalf("err = %v, want one naming the target and saying %q", err, tt.wantErr)
			}
			if tt.wantDials > 0 && n != tt.wantDials || tt.wantDials == 0 && n < 2 {
				t.Errorf("%d dials, want %d", n, tt.wantDials)
			}
			if el > tt.maxTime {
				t.Errorf("took %v, want at most %v", el, tt.maxTime)
			}
			t.Logf("%d dials in %v: %v", n, el.Round(time.Millisecond), err)
		})
	}
}

// TestOpenRetryRestart: tgtd comes back while the open is retrying.
func TestOpenRetryRestart(t *testing.T) {
	tg, file := newTarget(t, 1<<20)
	want := pattern(1<<20, 5)
	if err := os.WriteFile(file, want, 0o644); err != nil {
		t.Fatal(err)
	}
	tg.Kill()
	done := make(chan struct{})
	go func() {
		defer close(done)
		time.Sleep(700 * time.Millisecond)
		tg.Restart(map[int]string{1: file}, true)
	}()
	fd := &flakyDialer{}
	d := openRaw(t, tg.URL(1), &vdisk.OpenOptions{Dialer: fd.dial})
	defer d.Close()
	<-done
	got := make([]byte, len(want))
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "read", got, want)
	if fd.n.Load() < 2 {
		t.Fatalf("opened with %d dials while tgtd was down", fd.n.Load())
	}
}

// TestRedirect: a tgtd whose target redirects logins (RedirectAddress,
// RedirectPort, RedirectReason) sends the open to a second tgtd with the
// same target; the redirected address goes through the same dialer.
func TestRedirect(t *testing.T) {
	for _, reason := range []string{"Temporary", "Permanent"} {
		t.Run(reason, func(t *testing.T) {
			front := iscsitest.Start(t, testIQN)
			back := iscsitest.StartAt(t, testIQN, "127.0.0.2")
			file := back.AddLUN(1, 1<<20, true)
			want := pattern(1<<20, 7)
			if err := os.WriteFile(file, want, 0o644); err != nil {
				t.Fatal(err)
			}
			front.Redirect(back.Portal, reason)
			fd := &flakyDialer{}
			d := openRaw(t, front.URL(1), &vdisk.OpenOptions{Dialer: fd.dial})
			defer d.Close()
			got := make([]byte, len(want))
			if _, err := d.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			mustEqual(t, "read through the redirection", got, want)
			if _, err := d.WriteAt([]byte("redirected"), 4096); err != nil {
				t.Fatal(err)
			}
			if err := d.Flush(); err != nil {
				t.Fatal(err)
			}
			if b := readFile(t, file, 4096, 10); string(b) != "redirected" {
				t.Fatalf("the second target's LUN holds %q", b)
			}
			if a := fd.dialled(); len(a) != 2 || a[0] != front.Portal || a[1] != back.Portal {
				t.Fatalf("dialled %v, want %s then %s", a, front.Portal, back.Portal)
			}
			// With the redirection gone, the front target is reached directly
			// (it has no LUN 1: a clear error, not a redirection).
			front.Redirect("", "")
			_, err := vdisk.Open(context.Background(), front.URL(1), &vdisk.OpenOptions{Format: "raw", ReadOnly: true})
			if err == nil || errors.Is(err, driver.ErrUnsupported) || !strings.Contains(err.Error(), "not connected") {
				t.Fatalf("front target without the redirection: %v", err)
			}
			t.Logf("without the redirection: %v", err)
		})
	}
}
