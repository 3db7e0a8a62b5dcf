package nbdstore_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

// flakyDialer fails the first n dials: refused (cut < 0) or with a
// connection that is cut after cut bytes (inside the handshake).
func flakyDialer(n int64, cut int64, dials *atomic.Int64) driver.Dialer {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		k := dials.Add(1)
		if k <= n && cut < 0 {
			return nil, &net.OpError{Op: "dial", Net: network, Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if err != nil || k > n {
			return c, err
		}
		b := &atomic.Int64{}
		b.Store(cut)
		return &cutConn{Conn: c, budget: b}, nil
	}
}

// TestOpenRetry: an open whose first connections are refused or cut in
// the handshake (a server restarting) is retried with backoff within the
// open-retry time; a permanent refusal (no such export, TLS verification)
// is not retried.
func TestOpenRetry(t *testing.T) {
	dir := t.TempDir()
	file, want := sparseQcow2(t, dir, 4<<20, [][2]int64{{1 << 20, 64 << 10}})
	_, url := qemuNBD(t, "qcow2", file, "-r")
	tests := []struct {
		name      string
		url       string
		fail, cut int64
		retry     string // open-retry option, "" default
		wantDials int64  // 0: more than 1
		wantErr   string // "" opens
		maxTime   time.Duration
	}{
		{"refused thrice", url, 3, -1, "", 4, "", 5 * time.Second},
		{"cut in greeting", url, 2, 10, "", 3, "", 5 * time.Second},
		{"cut in option haggling", url, 2, 40, "", 3, "", 5 * time.Second},
		{"retry off", url, 1, -1, "0", 1, "connection refused", time.Second},
		{"always refused", url, 1 << 30, -1, "0.6", 0, "gave up after", 3 * time.Second},
		{"no such export", strings.TrimSuffix(url, "/x") + "/nope", 0, -1, "", 1, "no export", 2 * time.Second},
		{"no such export after refusals", strings.TrimSuffix(url, "/x") + "/nope", 2, -1, "", 3, "no export", 5 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var dials atomic.Int64
			o := &vdisk.OpenOptions{Format: "raw", ReadOnly: true, Dialer: flakyDialer(tt.fail, tt.cut, &dials)}
			if tt.retry != "" {
				o.StorageOptions = map[string]string{"open-retry": tt.retry}
			}
			start := time.Now()
			d, err := vdisk.Open(context.Background(), tt.url, o)
			el := time.Since(start)
			n := dials.Load() // before reads open the rest of a multi-conn pool
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("after %d dials: %v", dials.Load(), err)
				}
				defer d.Close()
				if got := readAll(t, d); firstDiff(got, want) >= 0 {
					t.Fatalf("differs at %d", firstDiff(got, want))
				}
			} else if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), tt.url) {
				if err == nil {
					d.Close()
				}
				t.Fatalf("err = %v, want one naming %s and saying %q", err, tt.url, tt.wantErr)
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

// TestOpenRetryRestart: the server comes up while the open is retrying.
func TestOpenRetryRestart(t *testing.T) {
	dir := t.TempDir()
	file, want := sparseQcow2(t, dir, 4<<20, [][2]int64{{0, 64 << 10}})
	srv, url := qemuNBD(t, "qcow2", file, "-r")
	srv.kill()
	go func() {
		time.Sleep(700 * time.Millisecond)
		srv.start()
	}()
	var dials atomic.Int64
	start := time.Now()
	d := openRaw(t, url, true, &vdisk.OpenOptions{Dialer: flakyDialer(0, -1, &dials)})
	if got := readAll(t, d); firstDiff(got, want) >= 0 {
		t.Fatalf("differs at %d", firstDiff(got, want))
	}
	if dials.Load() < 2 {
		t.Fatalf("opened with %d dials: the server was down", dials.Load())
	}
	t.Logf("opened after %d dials in %v", dials.Load(), time.Since(start).Round(time.Millisecond))
}

// TestOpenRetryTLS: a certificate that does not verify is not retried.
func TestOpenRetryTLS(t *testing.T) {
	dir := t.TempDir()
	creds := filepath.Join(dir, "creds")
	if err := os.Mkdir(creds, 0o700); err != nil {
		t.Fatal(err)
	}
	writeCreds(t, creds)
	file, _ := sparseQcow2(t, dir, 1<<20, nil)
	port := freePort(t)
	startServer(t, false, fmt.Sprintf("127.0.0.1:%d", port), "qemu-nbd", "-f", "qcow2", "-x", "x", "-b", "127.0.0.1", "-p", strconv.Itoa(port), "-t", "--shared=16",
		"--object", "tls-creds-x509,id=tls0,endpoint=server,verify-peer=on,dir="+creds, "--tls-creds", "tls0", file)
	url := fmt.Sprintf("nbds://127.0.0.1:%d/x", port)
	var dials atomic.Int64
	start := time.Now()
	_, err := vdisk.Open(context.Background(), url, &vdisk.OpenOptions{Format: "raw", ReadOnly: true, Dialer: flakyDialer(0, -1, &dials),
		StorageOptions: map[string]string{"tls-creds": creds, "tls-hostname": "elsewhere.example"}})
	if err == nil || !strings.Contains(err.Error(), "elsewhere.example") {
		t.Fatalf("wrong hostname: %v", err)
	}
	if dials.Load() != 1 || time.Since(start) > 3*time.Second {
		t.Fatalf("a TLS verification failure was dialled %d times in %v", dials.Load(), time.Since(start))
	}
	if errors.Is(err, driver.ErrNotFound) {
		t.Fatalf("classified as not found: %v", err)
	}
}

// TestListRetry: the export list waits for a server that refuses at first.
func TestListRetry(t *testing.T) {
	file, _ := sparseQcow2(t, t.TempDir(), 1<<20, nil)
	_, url := qemuNBD(t, "qcow2", file, "-r")
	var dials atomic.Int64
	open, _ := driver.LookupScheme("nbd")
	st, _, err := open(context.Background(), url, &driver.SchemeEnv{Dialer: flakyDialer(2, -1, &dials)})
	if err != nil {
		t.Fatal(err)
	}
	l, err := st.(driver.Lister).ListExports(context.Background(), url)
	if err != nil || len(l) != 1 || l[0].Name != "x" {
		t.Fatalf("list: %+v %v", l, err)
	}
	if dials.Load() != 3 {
		t.Fatalf("%d dials, want 3", dials.Load())
	}
}
