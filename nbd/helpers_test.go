package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
	_ "github.com/vdisk/vdisk/format/raw"
	_ "github.com/vdisk/vdisk/internal/testdrv"
)

// testLogger logs to the test when -v, else discards.
func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// sockDir returns a short directory for unix sockets (paths are limited to
// 107 bytes, which t.TempDir can exceed).
func sockDir(t testing.TB) string {
	d, err := os.MkdirTemp("", "nbdt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// newRaw creates a raw image of size bytes in dir with the given writes and
// returns its path.
func newRaw(t testing.TB, dir string, size int64, writes map[int64][]byte) string {
	t.Helper()
	p := filepath.Join(dir, "disk.raw")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for off, b := range writes {
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

func openDisk(t testing.TB, path string, ro bool) *vdisk.Disk {
	t.Helper()
	d, err := vdisk.Open(context.Background(), path, &vdisk.OpenOptions{Format: "raw", ReadOnly: ro})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// testServer is a server running on a unix socket for one test.
type testServer struct {
	srv    *Server
	sock   string
	cancel context.CancelFunc
	done   chan error
}

// serve starts s on a new unix socket; the test's cleanup stops it and
// checks that Serve returned nil.
func serve(t testing.TB, s *Server) *testServer {
	t.Helper()
	if s.Logger == nil {
		s.Logger = testLogger(t)
	}
	sock := filepath.Join(sockDir(t), "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ts := &testServer{srv: s, sock: sock, cancel: cancel, done: make(chan error, 1)}
	go func() { ts.done <- s.Serve(ctx, l) }()
	t.Cleanup(func() {
		if err := ts.stop(); err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return ts
}

func (ts *testServer) stop() error {
	ts.cancel()
	select {
	case err := <-ts.done:
		ts.done <- err
		return err
	case <-time.After(20 * time.Second):
		panic("server did not stop")
	}
}

func (ts *testServer) uri(export string) string {
	return "nbd+unix:///" + export + "?socket=" + ts.sock
}

func (ts *testServer) dial(t testing.TB, o *ClientOptions) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, "unix", ts.sock, o)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// randBytes returns n pseudo-random bytes drawn from r's stream.
func randBytes(r *rand.Rand, n int) []byte {
	var seed [32]byte
	for i := range 4 {
		binary.LittleEndian.PutUint64(seed[8*i:], r.Uint64())
	}
	b := make([]byte, n)
	rand.NewChaCha8(seed).Read(b)
	return b
}

func fileBytes(t testing.TB, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
