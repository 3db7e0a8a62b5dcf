package disktest

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/vdisk/vdisk/driver"
)

// LiveConns counts the network connections dialled through it that are
// not yet closed.
type LiveConns struct{ n atomic.Int64 }

// N is the number of connections open.
func (l *LiveConns) N() int64 { return l.n.Load() }

// Track counts c until it is closed.
func (l *LiveConns) Track(c net.Conn) net.Conn {
	l.n.Add(1)
	return &trackedConn{Conn: c, l: l}
}

// Dial dials like a net.Dialer and tracks the connection (a
// driver.SchemeEnv Dialer).
func (l *LiveConns) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return l.Track(c), nil
}

type trackedConn struct {
	net.Conn
	once sync.Once
	l    *LiveConns
}

func (c *trackedConn) Close() error {
	c.once.Do(func() { c.l.n.Add(-1) })
	return c.Conn.Close()
}

// CheckStorageCloser checks that st, a storage built for a network name
// whose connections live counts, is a driver.StorageCloser that closes, at
// CloseStorage, the connections of the files still open from it (their
// reads then fail with ErrClosed, a second Close is harmless), and
// connects again when used afterwards: with none, one and all of the
// files (opened by name) left open.
func CheckStorageCloser(t *testing.T, st driver.Storage, name string, live *LiveConns) {
	t.Helper()
	if _, ok := st.(driver.StorageCloser); !ok {
		t.Fatalf("%T is not a driver.StorageCloser", st)
	}
	for _, c := range []struct {
		name   string
		open   int // files opened
		closed int // of them closed before CloseStorage
	}{
		{"none left", 2, 2},
		{"one left", 2, 1},
		{"all left", 3, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			var files []driver.File
			for range c.open {
				f, err := st.Open(name, driver.ReadOnly)
				if err != nil {
					t.Fatal(err)
				}
				files = append(files, f)
			}
			for _, f := range files[:c.closed] {
				if err := f.Close(); err != nil {
					t.Fatal(err)
				}
			}
			if n := live.N(); n != int64(c.open-c.closed) {
				t.Fatalf("%d connections open with %d files open", n, c.open-c.closed)
			}
			if err := driver.CloseStorage(st); err != nil {
				t.Fatal(err)
			}
			if n := live.N(); n != 0 {
				t.Fatalf("%d connections still open after CloseStorage", n)
			}
			for _, f := range files[c.closed:] {
				if _, err := f.ReadAt(make([]byte, 512), 0); !errors.Is(err, driver.ErrClosed) {
					t.Fatalf("read from a file closed with its storage: %v", err)
				}
				f.Close() // again: harmless
			}
			// Used again afterwards, the storage connects again.
			f, err := st.Open(name, driver.ReadOnly)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := f.ReadAt(make([]byte, 512), 0); err != nil {
				t.Fatal(err)
			}
			f.Close()
			if n := live.N(); n != 0 {
				t.Fatalf("%d connections open after the last Close", n)
			}
		})
	}
}
