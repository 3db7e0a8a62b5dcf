package osfs

import (
	"bytes"
	"io"
	"path/filepath"
	"testing"
	"time"

	"github.com/vdisk/vdisk/internal/sockpair"
)

// TestSendTo: sendfile moves the file's bytes to a unix socket at any
// offset, in pieces larger than the socket's buffer (waiting for room),
// stops short at the file's end, and fails with the deadline of a
// connection whose reader is gone quiet; a closed file is an error.
func TestSendTo(t *testing.T) {
	dir := t.TempDir()
	want, f := randomFile(t, filepath.Join(dir, "f"), 5*mib+333, 2)
	defer f.Close()
	a, b := sockpair.Unix(t)
	rc, err := a.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ off, n, sent int64 }{
		{0, 4096, 4096},
		{12345, 3 * mib, 3 * mib}, // more than the socket buffer holds
		{int64(len(want)) - 1000, 4096, 1000},
		{int64(len(want)) + 10, 4096, 0},
	} {
		got := make(chan []byte, 1)
		go func() {
			buf := make([]byte, c.sent)
			if _, err := io.ReadFull(b, buf); err != nil {
				t.Error(err)
			}
			got <- buf
		}()
		n, err := f.SendTo(rc, c.off, c.n)
		if err != nil || n != c.sent {
			t.Fatalf("SendTo(%d, %d) = %d, %v; want %d", c.off, c.n, n, err, c.sent)
		}
		end := min(c.off+c.sent, int64(len(want)))
		if buf := <-got; !bytes.Equal(buf, want[min(c.off, end):end]) {
			t.Fatalf("SendTo(%d, %d): the bytes differ", c.off, c.n)
		}
	}
	// Nobody reads: the write deadline ends the send.
	a.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
	if n, err := f.SendTo(rc, 0, int64(len(want))); err == nil || n >= int64(len(want)) {
		t.Fatalf("send to a reader gone quiet: %d, %v", n, err)
	}
	f.Close()
	if _, err := f.SendTo(rc, 0, 10); err == nil {
		t.Fatal("send from a closed file succeeded")
	}
}
