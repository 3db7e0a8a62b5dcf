package iscsistore_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/iscsistore"
)

// cutConn drops the connection at the cutAt-th PDU boundary of the
// target's stream (read side) or before the cutAt-th PDU the initiator
// writes (each write is one whole PDU).
type cutConn struct {
	net.Conn
	readCut, writeCut int
	reads, writes     int
	hdr               []byte
	need              int
	cut               atomic.Bool
}

func (c *cutConn) boundary() bool {
	c.reads++
	return c.readCut > 0 && c.reads == c.readCut
}

func (c *cutConn) Read(p []byte) (int, error) {
	if c.cut.Load() {
		return 0, io.EOF
	}
	n, err := c.Conn.Read(p)
	for i := 0; i < n; {
		if c.need > 0 {
			k := min(c.need, n-i)
			c.need -= k
			i += k
			if c.need == 0 && c.boundary() {
				c.cut.Store(true)
				c.Conn.Close()
				return i, nil
			}
			continue
		}
		k := min(48-len(c.hdr), n-i)
		c.hdr = append(c.hdr, p[i:i+k]...)
		i += k
		if len(c.hdr) == 48 {
			dl := int(c.hdr[5])<<16 | int(c.hdr[6])<<8 | int(c.hdr[7])
			c.need = int(c.hdr[4])*4 + (dl+3)&^3
			c.hdr = c.hdr[:0]
			if c.need == 0 && c.boundary() {
				c.cut.Store(true)
				c.Conn.Close()
				return i, nil
			}
		}
	}
	return n, err
}

func (c *cutConn) Write(p []byte) (int, error) {
	if c.cut.Load() {
		return 0, net.ErrClosed
	}
	c.writes++
	if c.writeCut > 0 && c.writes == c.writeCut {
		c.cut.Store(true)
		c.Conn.Close()
		return 0, net.ErrClosed
	}
	return c.Conn.Write(p)
}

// cutDialer cuts only the first connection; the re-login goes through.
func cutDialer(readCut, writeCut int) (driver.Dialer, *atomic.Int32) {
	var dials atomic.Int32
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		nc, err := d.DialContext(ctx, network, addr)
		if err != nil || dials.Add(1) > 1 {
			return nc, err
		}
		return &cutConn{Conn: nc, readCut: readCut, writeCut: writeCut}, nil
	}, &dials
}

// Cut the stream at every PDU boundary in a range, in both directions:
// each open+write+read either succeeds with the right data (the command
// was retried after a new login) or fails with a clear error; it never
// returns wrong data.
func TestCutAtEveryPDU(t *testing.T) {
	tg, file := newTarget(t, 4<<20)
	url := tg.URL(1)
	ctx := context.Background()
	var recovered, failed, openFailed int
	for dir := 0; dir < 2; dir++ {
		for k := 1; k <= 45; k++ {
			rc, wc := k, 0
			if dir == 1 {
				rc, wc = 0, k
			}
			dial, dials := cutDialer(rc, wc)
			d, err := vdisk.Open(ctx, url, &vdisk.OpenOptions{Format: "raw", Dialer: dial})
			if err != nil {
				openFailed++
				if !strings.Contains(err.Error(), tg.IQN) {
					t.Fatalf("cut %d/%d: open error without the URL: %v", dir, k, err)
				}
				continue
			}
			seed := byte(dir*64 + k)
			data := pattern(700<<10+3, seed)
			off := int64(k*4096 + 7)
			_, werr := d.WriteAt(data, off)
			got := make([]byte, len(data))
			_, rerr := d.ReadAt(got, off)
			d.Close()
			if werr != nil || rerr != nil {
				failed++
				for _, err := range []error{werr, rerr} {
					if err != nil && !strings.Contains(err.Error(), tg.IQN) {
						t.Fatalf("cut %d/%d: error without the URL: %v", dir, k, err)
					}
				}
				continue
			}
			mustEqual(t, "read after cut", got, data)
			mustEqual(t, "LUN after cut", readFile(t, file, off, int64(len(data))), data)
			if dials.Load() > 1 {
				recovered++
			}
		}
	}
	t.Logf("cut points: %d recovered by a new login, %d failed cleanly, %d failed at open", recovered, failed, openFailed)
	if recovered < 40 {
		t.Fatalf("only %d cuts recovered", recovered)
	}
}

// tgtd is killed while a long read is in flight: the read fails with a
// clear error naming the LUN (no wrong data); once tgtd is back, the same
// open file logs in again and reads the right bytes.
func TestTargetKilledMidRead(t *testing.T) {
	const size = 64 << 20
	tg, file := newTarget(t, size)
	url := tg.URL(1)
	want := pattern(size, 9)
	if err := os.WriteFile(file, want, 0o644); err != nil {
		t.Fatal(err)
	}
	st, name, err := iscsistore.Open(context.Background(), url, &driver.SchemeEnv{Options: map[string]string{"timeout": "5", "open-retry": "2"}})
	if err != nil {
		t.Fatal(err)
	}
	f, err := st.Open(name, driver.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var wg sync.WaitGroup
	var readErr error
	got := make([]byte, size)
	started := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		close(started)
		for i := 0; i < 50 && readErr == nil; i++ {
			_, readErr = f.ReadAt(got, 0)
			if readErr == nil && !bytes.Equal(got, want) {
				readErr = errors.New("wrong data")
			}
		}
	}()
	<-started
	time.Sleep(30 * time.Millisecond)
	tg.Kill()
	wg.Wait()
	if readErr == nil {
		t.Fatal("the reads outlived tgtd")
	}
	if readErr.Error() == "wrong data" || !strings.Contains(readErr.Error(), tg.IQN) || !strings.Contains(readErr.Error(), "offset") {
		t.Fatalf("read error: %v", readErr)
	}
	t.Logf("read error while tgtd is down: %v", readErr)
	tg.Restart(map[int]string{1: file}, true)
	clear(got)
	if _, err := f.ReadAt(got, 0); err != nil {
		t.Fatalf("read after restart: %v", err)
	}
	mustEqual(t, "read after restart", got, want)
}
