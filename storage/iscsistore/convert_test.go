package iscsistore_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// countConn counts the bytes the target sends.
type countConn struct {
	net.Conn
	n *atomic.Int64
}

func (c countConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// A sparse LUN converts to a local qcow2 reading only its allocated data
// (GET LBA STATUS holes are skipped), and the copy is identical.
func TestSparseConvert(t *testing.T) {
	const size = 256 << 20
	tg, _ := newTarget(t, size)
	url := tg.URL(1)
	qemuIO(t, url, "write -P 7 1M 1M", "write -P 8 100M 512k", "write -P 9 255M 64k")
	var got atomic.Int64
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		nc, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return countConn{nc, &got}, nil
	}
	ctx := context.Background()
	src, err := vdisk.Open(ctx, url, &vdisk.OpenOptions{Format: "raw", ReadOnly: true, Dialer: dial})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dstName := filepath.Join(t.TempDir(), "copy.qcow2")
	dst, err := vdisk.Create(ctx, dstName, &vdisk.CreateOptions{Format: "qcow2", Size: size})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := vdisk.Convert(ctx, dst, src, nil); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
	allocated := int64(1<<20 + 512<<10 + 64<<10)
	t.Logf("converted a %d MiB LUN with %d KiB allocated in %v, %d KiB received", size>>20, allocated>>10, time.Since(start).Round(time.Millisecond), got.Load()>>10)
	if got.Load() > allocated+allocated/4+256<<10 {
		t.Fatalf("received %d bytes for %d allocated", got.Load(), allocated)
	}
	if !qemutest.Compare(t, "raw", url, "qcow2", dstName) {
		t.Fatal("qemu-img compare: the copy differs from the LUN")
	}
	if r := qemutest.Check(t, "qcow2", dstName); r.Corruptions != 0 || r.Leaks != 0 {
		t.Fatalf("qemu-img check: %+v", r)
	}
	if fi, err := os.Stat(dstName); err != nil || fi.Size() > 8<<20 {
		t.Fatalf("copy is %d bytes: %v", fi.Size(), err)
	}
}
