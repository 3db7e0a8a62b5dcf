package iscsi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// redirector answers every login with a redirection (status class 1) to
// the address its to function gives (a fake of a target moved away), or
// with status (class<<8|detail) when that is set.
type redirector struct {
	l         net.Listener
	permanent bool
	to        func() string
	status    uint16
	logins    atomic.Int32
}

func newRedirector(t *testing.T, permanent bool, to func() string) *redirector {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &redirector{l: l, permanent: permanent, to: to}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			nc, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer nc.Close()
				p, err := ReadPDU(nc, Digests{}, 1<<20)
				if err != nil || p.Opcode() != OpLoginReq {
					return
				}
				r.logins.Add(1)
				resp := &PDU{}
				resp.BHS[0] = OpLoginResp
				copy(resp.BHS[8:14], p.BHS[8:14])
				resp.put32(16, p.ITT())
				resp.BHS[36] = 1
				resp.BHS[37] = 1
				if r.permanent {
					resp.BHS[37] = 2
				}
				if r.status != 0 {
					resp.BHS[36], resp.BHS[37] = byte(r.status>>8), byte(r.status)
				} else {
					resp.Data = EncodeText([]KV{{"TargetAddress", r.to()}})
				}
				b, _ := resp.Marshal(Digests{})
				nc.Write(b)
				// The initiator closes: wait for it.
				nc.SetReadDeadline(time.Now().Add(5 * time.Second))
				nc.Read(make([]byte, 1))
			}()
		}
	}()
	return r
}

func (r *redirector) addr() string { return r.l.Addr().String() }

// recordingDialer dials and remembers the addresses and connections.
type recordingDialer struct {
	mu    sync.Mutex
	addrs []string
	conns []net.Conn
}

func (d *recordingDialer) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var nd net.Dialer
	c, err := nd.DialContext(ctx, network, addr)
	d.mu.Lock()
	d.addrs = append(d.addrs, addr)
	if err == nil {
		d.conns = append(d.conns, c)
	}
	d.mu.Unlock()
	return c, err
}

func (d *recordingDialer) dialled() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.addrs...)
}

func (d *recordingDialer) cutLast() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.conns[len(d.conns)-1].Close()
}

// TestRedirect follows redirections to the fake target through the
// session's dialer; a temporary one is not remembered at a reconnect, a
// permanent one is.
func TestRedirect(t *testing.T) {
	for _, permanent := range []bool{false, true} {
		name := map[bool]string{false: "temporary", true: "permanent"}[permanent]
		t.Run(name, func(t *testing.T) {
			ft := newFakeTarget(t, 64)
			// Two hops: r1 -> r2 -> target, the last with a portal group tag.
			r2 := newRedirector(t, permanent, func() string { return ft.l.Addr().String() + ",1" })
			r1 := newRedirector(t, permanent, r2.addr)
			rd := &recordingDialer{}
			cfg := ft.config()
			cfg.Portal, cfg.Dial = r1.addr(), rd.dial
			ctx := context.Background()
			s, err := Dial(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			want := []string{r1.addr(), r2.addr(), ft.l.Addr().String()}
			if got := rd.dialled(); strings.Join(got, " ") != strings.Join(want, " ") {
				t.Fatalf("dialled %v, want %v", got, want)
			}
			d, err := OpenDisk(ctx, s, 0)
			if err != nil {
				t.Fatal(err)
			}
			// Cut the connection: the reconnect starts at the URL's portal
			// after a temporary redirection, at the target after a
			// permanent one.
			rd.cutLast()
			buf := make([]byte, 512)
			if err := d.Read(ctx, 3, buf); err != nil {
				t.Fatal(err)
			}
			got := rd.dialled()[3:]
			if permanent {
				want = []string{ft.l.Addr().String()}
			}
			if strings.Join(got, " ") != strings.Join(want, " ") {
				t.Fatalf("reconnect dialled %v, want %v", got, want)
			}
			if s.Reconnects() != 1 {
				t.Fatalf("%d reconnects", s.Reconnects())
			}
		})
	}
}

// TestRedirectRefused: loops, too many hops and bad addresses end the
// login with a clear error, never an endless one.
func TestRedirectRefused(t *testing.T) {
	var a, b *redirector
	a = newRedirector(t, false, func() string { return b.addr() })
	b = newRedirector(t, false, func() string { return a.addr() })
	self := newRedirector(t, true, nil)
	self.to = self.addr
	// A chain of 6 distinct redirectors to nowhere.
	chain := make([]*redirector, 6)
	chain[5] = newRedirector(t, false, func() string { return "127.0.0.1:1" })
	for i := 4; i >= 0; i-- {
		chain[i] = newRedirector(t, false, chain[i+1].addr)
	}
	tests := []struct {
		name   string
		portal string
		want   string
		dials  int
	}{
		{"loop", a.addr(), "redirection loop", 2},
		{"to itself", self.addr(), "redirection loop", 1},
		{"too many", chain[0].addr(), "more than 4 redirections", 5},
		{"bad address", newRedirector(t, false, func() string { return "no:port:here]" }).addr(), "invalid TargetAddress", 1},
		{"empty address", newRedirector(t, false, func() string { return "" }).addr(), "invalid TargetAddress", 1},
		{"bad port", newRedirector(t, false, func() string { return "127.0.0.1:99999" }).addr(), "invalid TargetAddress", 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rd := &recordingDialer{}
			start := time.Now()
			_, err := Dial(context.Background(), Config{Portal: tt.portal, Target: "iqn.fake:t", Dial: rd.dial, Timeout: time.Second, KeepAlive: -1})
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want %q", err, tt.want)
			}
			if !errors.Is(err, ErrLogin) && !errors.Is(err, ErrProtocol) {
				t.Fatalf("err = %v: not a login or protocol error", err)
			}
			// Refusals are permanent: no backoff retries.
			if n := len(rd.dialled()); n != tt.dials {
				t.Fatalf("%d dials (%v), want %d", n, rd.dialled(), tt.dials)
			}
			if el := time.Since(start); el > 2*time.Second {
				t.Fatalf("took %v", el)
			}
		})
	}
}

func TestRedirectPortal(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"10.0.0.1", "10.0.0.1:3260"},
		{"10.0.0.1:3261", "10.0.0.1:3261"},
		{"10.0.0.1:3261,7", "10.0.0.1:3261"},
		{"host.example,1", "host.example:3260"},
		{"[fe80::1]:3262,2", "[fe80::1]:3262"},
		{"[fe80::1]", "[fe80::1]:3260"},
		{"fe80::1", "[fe80::1]:3260"},
		{"", ""},
		{",1", ""},
		{"h:0", ""},
		{"h:x", ""},
		{"[fe80::1", ""},
		{"[fe80::1]x", ""},
		{"a b:1", ""},
	} {
		got, err := redirectPortal(tt.in)
		if got != tt.want || (err == nil) != (tt.want != "") {
			t.Errorf("redirectPortal(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
		}
	}
}

// TestLoginRetry: refused dials and a target busy (status class 3) are
// retried with backoff; CHAP-style refusals are not.
func TestLoginRetry(t *testing.T) {
	ft := newFakeTarget(t, 64)
	var dials atomic.Int32
	cfg := ft.config()
	cfg.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
		if dials.Add(1) <= 3 {
			return nil, errors.New("connect: connection refused")
		}
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}
	s, err := Dial(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if dials.Load() != 4 {
		t.Fatalf("%d dials, want 4", dials.Load())
	}
	// One attempt only.
	dials.Store(0)
	cfg.Retry = -1
	if _, err := Dial(context.Background(), cfg); err == nil || !errors.Is(err, ErrConnLost) || dials.Load() != 1 {
		t.Fatalf("no retry: %v after %d dials", err, dials.Load())
	}
	// Context cancellation ends the retries.
	dials.Store(-1 << 20)
	cfg.Retry = time.Minute
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := Dial(ctx, cfg); !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 2*time.Second {
		t.Fatalf("cancelled: %v after %v", err, time.Since(start))
	}
	for _, tt := range []struct {
		status    uint16
		transient bool
	}{{0x0300, true}, {0x0301, true}, {0x0302, true}, {0x0201, false}, {0x0203, false}, {0x0101, false}} {
		err := loginStatusError(byte(tt.status>>8), byte(tt.status), nil)
		if permanent(err) == tt.transient {
			t.Errorf("status %#04x: permanent = %v", tt.status, permanent(err))
		}
	}
}

// TestLoginTargetMissing: "target not found" fails the open at once, but
// is retried when the portal was down or busy earlier in the same round
// (a target service restarting answers it until its targets exist again).
func TestLoginTargetMissing(t *testing.T) {
	ft := newFakeTarget(t, 64)
	busy := newRedirector(t, false, nil)
	busy.status = 0x0301
	for _, status := range []uint16{0x0203, 0x0204} {
		missing := newRedirector(t, false, nil)
		missing.status = status
		for _, tt := range []struct {
			name    string
			script  []string // what each dial meets; the target after that
			wantErr bool
		}{
			{"alone", []string{"missing"}, true},
			{"after refusals", []string{"refused", "refused", "missing", "missing"}, false},
			{"after busy", []string{"busy", "missing"}, false},
		} {
			t.Run(fmt.Sprintf("%#04x/%s", status, tt.name), func(t *testing.T) {
				var dials atomic.Int32
				cfg := ft.config()
				cfg.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
					n := int(dials.Add(1))
					if n <= len(tt.script) {
						switch tt.script[n-1] {
						case "refused":
							return nil, errors.New("connect: connection refused")
						case "busy":
							addr = busy.addr()
						case "missing":
							addr = missing.addr()
						}
					}
					var d net.Dialer
					return d.DialContext(ctx, network, addr)
				}
				s, err := Dial(context.Background(), cfg)
				want := int32(len(tt.script) + 1)
				if tt.wantErr {
					want--
					if err == nil || !errors.Is(err, ErrLogin) || !strings.Contains(err.Error(), "target ") {
						t.Fatalf("err = %v, want a login error naming the target", err)
					}
				} else if err != nil {
					t.Fatalf("after %d dials: %v", dials.Load(), err)
				} else {
					s.Close()
				}
				if dials.Load() != want {
					t.Fatalf("%d dials, want %d", dials.Load(), want)
				}
			})
		}
	}
}

// TestReconnectTargetMissing: at a reconnect the target existed a moment
// ago, so "target not found" from the portal is retried at once.
func TestReconnectTargetMissing(t *testing.T) {
	ft := newFakeTarget(t, 64)
	missing := newRedirector(t, false, nil)
	missing.status = 0x0203
	var dials, missingFrom atomic.Int32
	var mu sync.Mutex
	var last net.Conn
	cfg := ft.config()
	cfg.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
		n := dials.Add(1)
		if m := missingFrom.Load(); m > 0 && n >= m && n < m+2 {
			addr = missing.addr()
		}
		var d net.Dialer
		nc, err := d.DialContext(ctx, network, addr)
		if err == nil {
			mu.Lock()
			last = nc
			mu.Unlock()
		}
		return nc, err
	}
	ctx := context.Background()
	s, err := Dial(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	d, err := OpenDisk(ctx, s, 0)
	if err != nil {
		t.Fatal(err)
	}
	// The next two dials meet a target service that has no target yet.
	missingFrom.Store(dials.Load() + 1)
	mu.Lock()
	last.Close()
	mu.Unlock()
	buf := make([]byte, 512)
	if err := d.Read(ctx, 3, buf); err != nil {
		t.Fatalf("read after the reconnect: %v", err)
	}
	if got := dials.Load() - missingFrom.Load() + 1; got != 3 || s.Reconnects() != 1 {
		t.Fatalf("%d dials for the reconnect (want 3), %d reconnects", got, s.Reconnects())
	}
}
