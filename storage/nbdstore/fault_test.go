package nbdstore_test

import (
	"context"
	"errors"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

// TestCutStream cuts connections after N bytes, for many N: during the
// handshake, in request headers, in reply payloads. A cut connection is
// redialled and the request retried once, so every read either returns
// the right data or a clean error naming the URL; never wrong data.
func TestCutStream(t *testing.T) {
	srv, url := nbdkit(t, "memory", "8M")
	want := pattern(8<<20, 0x3c)
	{
		d := openRaw(t, url, false, nil)
		if _, err := d.WriteAt(want, 0); err != nil {
			t.Fatal(err)
		}
		d.Close()
	}
	_ = srv
	// Every 7 bytes through the negotiation and the first requests
	// (first connection only: its successor must succeed), then points
	// in reply payloads for both modes.
	type point struct {
		n         int64
		everyConn bool
	}
	var points []point
	for n := int64(0); n < 700; n += 7 {
		points = append(points, point{n, false})
	}
	for _, n := range []int64{300, 400, 500, 700, 1000, 4000, 70000, 300000, 1 << 20, 3 << 20} {
		points = append(points, point{n, false}, point{n, true})
	}
	for _, pt := range points {
		n, everyConn := pt.n, pt.everyConn
		{
			var dials atomic.Int64
			dialer := func(ctx context.Context, network, addr string) (net.Conn, error) {
				var d net.Dialer
				c, err := d.DialContext(ctx, network, addr)
				if err != nil {
					return nil, err
				}
				if dials.Add(1) > 1 && !everyConn {
					return c, nil
				}
				b := &atomic.Int64{}
				b.Store(n)
				return &cutConn{Conn: c, budget: b}, nil
			}
			d, err := vdisk.Open(context.Background(), url, &vdisk.OpenOptions{Format: "raw", ReadOnly: true, Dialer: dialer,
				StorageOptions: map[string]string{"reconnect-delay": "1", "multi-conn": "1", "open-retry": "0.5"}})
			if err != nil {
				// Cut during the first negotiation: a clean open error.
				if !strings.Contains(err.Error(), url) {
					t.Fatalf("cut at %d: open error without the URL: %v", n, err)
				}
				continue
			}
			got := make([]byte, len(want))
			var failed error
			end := len(want)
			if dials.Load() > 1 && !everyConn {
				// Cut during the negotiation and opened on a retry: the
				// first MiB shows the new connection reads right.
				end = 1 << 20
			}
			for off := 0; off < end; off += 1 << 20 {
				if _, err := d.ReadAt(got[off:off+1<<20], int64(off)); err != nil {
					var de *driver.Error
					if !errors.As(err, &de) || !strings.Contains(err.Error(), url) {
						t.Fatalf("cut at %d: unclear error %v", n, err)
					}
					failed = err
					continue
				}
				if firstDiff(got[off:off+1<<20], want[off:off+1<<20]) >= 0 {
					t.Fatalf("cut at %d (every connection %v): wrong data at %d", n, everyConn, off+firstDiff(got[off:off+1<<20], want[off:off+1<<20]))
				}
			}
			if failed != nil && !everyConn {
				t.Fatalf("cut at %d of the first connection only: the retry failed: %v", n, failed)
			}
			closeWithin(t, d, 5*time.Second)
			t.Logf("cut at %d (every connection %v): %d dials, error: %v", n, everyConn, dials.Load(), failed)
		}
	}
}

// TestCutWrites cuts the stream during writes: after the retry, the
// export holds what was written.
func TestCutWrites(t *testing.T) {
	_, url := nbdkit(t, "memory", "4M")
	for _, n := range []int64{300, 5000, 100000, 1<<20 + 100} {
		var dials atomic.Int64
		dialer := func(ctx context.Context, network, addr string) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, network, addr)
			if err != nil || dials.Add(1) > 1 {
				return c, err
			}
			b := &atomic.Int64{}
			b.Store(n)
			return &cutConn{Conn: c, budget: b}, nil
		}
		d := openRaw(t, url, false, &vdisk.OpenOptions{Dialer: dialer, StorageOptions: map[string]string{"multi-conn": "1"}})
		want := pattern(4<<20, byte(n))
		for off := 0; off < len(want); off += 512 << 10 {
			if _, err := d.WriteAt(want[off:off+512<<10], int64(off)); err != nil {
				t.Fatalf("cut at %d: write at %d: %v", n, off, err)
			}
		}
		if err := d.Flush(); err != nil {
			t.Fatal(err)
		}
		if got := readAll(t, d); firstDiff(got, want) >= 0 {
			t.Fatalf("cut at %d: wrong data at %d", n, firstDiff(got, want))
		}
		if dials.Load() < 2 {
			t.Fatalf("cut at %d: the connection was never cut", n)
		}
		d.Close()
	}
}

// TestServerRestart kills qemu-nbd in the middle of reads and starts it
// again on the same port: the reads resume after the reconnect.
func TestServerRestart(t *testing.T) {
	dir := t.TempDir()
	file, want := sparseQcow2(t, dir, 16<<20, [][2]int64{{0, 16 << 20}})
	srv, url := qemuNBD(t, "qcow2", file, "-r")
	d := openRaw(t, url, true, &vdisk.OpenOptions{StorageOptions: map[string]string{"reconnect-delay": "10"}})
	stop := make(chan struct{})
	restarted := make(chan struct{})
	go func() {
		defer close(restarted)
		select {
		case <-stop:
			return
		case <-time.After(100 * time.Millisecond):
		}
		srv.kill()
		time.Sleep(300 * time.Millisecond)
		srv.start()
	}()
	deadline := time.Now().Add(1500 * time.Millisecond)
	rounds := 0
	for time.Now().Before(deadline) {
		got := make([]byte, 1<<20)
		off := int64(rounds%16) << 20
		if _, err := d.ReadAt(got, off); err != nil {
			close(stop)
			<-restarted
			t.Fatalf("round %d: %v", rounds, err)
		}
		if i := firstDiff(got, want[off:off+1<<20]); i >= 0 {
			t.Fatalf("round %d: wrong data at %d", rounds, off+int64(i))
		}
		rounds++
	}
	<-restarted
	t.Logf("%d reads of 1 MiB across a restart", rounds)
}

// TestServerGone: with the server dead for good, requests end with a
// clear error after the reconnect delay, and Close does not hang.
func TestServerGone(t *testing.T) {
	srv, url := nbdkit(t, "memory", "1M")
	d, err := vdisk.Open(context.Background(), url, &vdisk.OpenOptions{Format: "raw", StorageOptions: map[string]string{"reconnect-delay": "0.5"}})
	if err != nil {
		t.Fatal(err)
	}
	srv.kill()
	start := time.Now()
	_, err = d.ReadAt(make([]byte, 4096), 8192)
	if err == nil || !strings.Contains(err.Error(), url) || !strings.Contains(err.Error(), "8192") {
		t.Fatalf("read from a dead server: %v", err)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Fatalf("failing took %v", el)
	}
	t.Logf("error after %v: %v", time.Since(start), err)
	closeWithin(t, d, 5*time.Second)
}

// TestStalledServer: a server that stops answering is cut by the request
// timeout, and Close ends blocked calls.
func TestStalledServer(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close() // accept, say nothing
		}
	}()
	url := "nbd://" + l.Addr().String() + "/x"
	start := time.Now()
	_, err = vdisk.Open(context.Background(), url, &vdisk.OpenOptions{Format: "raw", ReadOnly: true, StorageOptions: map[string]string{"open-timeout": "0.3"}})
	if err == nil || !strings.Contains(err.Error(), url) {
		t.Fatalf("open of a silent server: %v", err)
	}
	if el := time.Since(start); el > 3*time.Second {
		t.Fatalf("open took %v", el)
	}
}

func closeWithin(t testing.TB, d *vdisk.Disk, limit time.Duration) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		d.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(limit):
		t.Fatalf("Close hangs")
	}
}
