package s3

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

// TestServerStoppedMidRead: reads while the server is down fail cleanly
// after bounded retries; a server back within the retries is not noticed.
func TestServerStoppedMidRead(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	data := randBytes(5, 4<<20)
	s.put("f/stop.raw", data)
	st := s.storage("block-size", "64K", "cache-blocks", "4", "read-ahead", "0", "retries", "3")
	f, err := st.Open("f/stop.raw", driver.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	if _, err := f.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, data[:1<<20]) {
		t.Fatal(err)
	}
	s.stop()
	start := time.Now()
	_, err = f.ReadAt(buf, 2<<20)
	if err == nil || !strings.Contains(err.Error(), "s3://images/f/stop.raw") || errors.Is(err, ErrChanged) {
		t.Fatalf("read with the server down: %v", err)
	}
	t.Logf("server down: failed after %v: %v", time.Since(start).Round(time.Millisecond), err)
	if d := time.Since(start); d > 30*time.Second {
		t.Fatalf("retries took %v", d)
	}

	// Down for a moment: the retries cover it.
	g, err := s.storage("block-size", "64K", "read-ahead", "0", "retries", "6").Open("f/stop.raw", driver.ReadOnly)
	if err == nil {
		t.Fatal("opened with the server down")
	}
	s.start()
	g, err = s.storage("block-size", "64K", "read-ahead", "0", "retries", "6").Open("f/stop.raw", driver.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	s.stop()
	restarted := make(chan error, 1)
	go func() {
		time.Sleep(300 * time.Millisecond)
		restarted <- s.startErr()
	}()
	_, err = g.ReadAt(buf, 3<<20)
	if rerr := <-restarted; rerr != nil {
		t.Fatal(rerr)
	}
	if err != nil || !bytes.Equal(buf, data[3<<20:]) {
		t.Fatalf("read across a restart: %v", err)
	}
}

// TestObjectReplacedAfterOpen: a reader pinned to the ETag at open gets a
// clear error once the object is replaced, never a mix of versions.
func TestObjectReplacedAfterOpen(t *testing.T) {
	s := startServer(t)
	a, b := randBytes(6, 2<<20), randBytes(7, 2<<20)
	s.put("f/swap.raw", a)
	ctx := context.Background()
	d, err := vdisk.Open(ctx, s3url("f/swap.raw"), &vdisk.OpenOptions{Format: "raw", ReadOnly: true, Dialer: s.dial.Dial, StorageOptions: s.opts("block-size", "64K", "read-ahead", "0")})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	buf := make([]byte, 64<<10)
	if _, err := d.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, a[:len(buf)]) {
		t.Fatal(err)
	}
	s.put("f/swap.raw", b)
	_, err = d.ReadAt(buf, 1<<20)
	if !errors.Is(err, ErrChanged) || !strings.Contains(err.Error(), "s3://images/f/swap.raw") || !strings.Contains(err.Error(), "replaced") {
		t.Fatalf("read after the object was replaced: %v", err)
	}
	// A new open sees the new version.
	st := s.storage()
	f, err := st.Open("f/swap.raw", driver.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(buf, 1<<20); err != nil || !bytes.Equal(buf, b[1<<20:1<<20+len(buf)]) {
		t.Fatalf("reopened: %v", err)
	}
}

// TestUploadCutMidway: part uploads that keep failing end the convert with
// an error naming the object, and leave no object and no parts.
func TestUploadCutMidway(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	src := makeSource(t, 40<<20)
	for _, c := range []struct{ format string }{{"raw"}, {"qcow2"}} {
		key := "f/cut." + c.format
		s.dial.partPuts.Store(0)
		s.dial.failPartsAfter.Store(2)
		err := convertTo(t, s, src, s3url(key), c.format, nil, false, "part-size", "5M", "mem-parts", "2", "retries", "2")
		s.dial.failPartsAfter.Store(0)
		if err == nil || !strings.Contains(err.Error(), "s3://images/"+key) {
			t.Fatalf("%s: convert with the upload cut: %v", c.format, err)
		}
		t.Logf("%s: %v", c.format, err)
		if s.exists(key) {
			t.Fatalf("%s: a partial object was left", c.format)
		}
		if u := s.uploads(); len(u) != 0 {
			t.Fatalf("%s: orphaned uploads: %v", c.format, u)
		}
	}
}
