package nbd

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"math/rand/v2"
	"os"
	"syscall"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/sockpair"
	"github.com/vdisk/vdisk/storage/osfs"
)

// TestSendFile: reads of a raw image on a local file at least sendMin
// long are sent from the file by the kernel, with simple, structured and
// extended replies, around holes, at unaligned offsets and up to the end;
// the bytes are the file's. A file that shrank under the open image sends
// zeros for what it lost (as a read of the raw image returns), and the
// connection goes on. TLS connections read and write as before.
func TestSendFile(t *testing.T) {
	const size = 8 << 20
	rng := rand.New(rand.NewPCG(7, 7))
	data := randBytes(rng, 3<<20)
	tail := randBytes(rng, 1<<20)
	p := newRaw(t, t.TempDir(), size, map[int64][]byte{0: data, size - 1<<20: tail})
	want := make([]byte, size)
	copy(want, data)
	copy(want[size-1<<20:], tail)
	d := openDisk(t, p, false)
	defer d.Close()
	ts := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: d}}})
	reads := []struct{ off, n int64 }{
		{0, 64 << 10}, {4096, 1 << 20}, {12345, 200000}, {3<<20 - 100<<10, 300 << 10},
		{0, size}, {size - 64<<10, 64 << 10}, {size - 1<<20 - 7, 1<<20 + 7},
	}
	for _, o := range []*ClientOptions{{NoStructuredReplies: true}, {}, {ExtendedHeaders: true}} {
		c := ts.dial(t, o)
		before := fileSent.Load()
		var sendable int64
		for _, r := range reads {
			buf := make([]byte, r.n)
			if err := c.Do(cmdRead, 0, uint64(r.off), uint32(r.n), buf); err != nil {
				t.Fatalf("read %d+%d (%+v): %v", r.off, r.n, o, err)
			}
			if !bytes.Equal(buf, want[r.off:r.off+r.n]) {
				t.Fatalf("read %d+%d (%+v): wrong bytes", r.off, r.n, o)
			}
			if o.NoStructuredReplies && (r.off+r.n <= 3<<20 || r.off >= size-1<<20) {
				sendable += r.n
			}
		}
		got := fileSent.Load() - before
		if got == 0 || got < sendable {
			t.Fatalf("%+v: %d bytes sent from the file, want at least %d", o, got, sendable)
		}
		c.Close()
	}

	// The file shrinks under the open image: the lost bytes come as zeros.
	if err := os.Truncate(p, 2<<20); err != nil {
		t.Fatal(err)
	}
	c := ts.dial(t, &ClientOptions{NoStructuredReplies: true})
	buf := make([]byte, 3<<20)
	if err := c.Do(cmdRead, 0, 0, uint32(len(buf)), buf); err != nil {
		t.Fatalf("read past the shrunk file: %v", err)
	}
	wantShrunk := append(append([]byte{}, data[:2<<20]...), make([]byte, 1<<20)...)
	if !bytes.Equal(buf, wantShrunk) {
		t.Fatal("read past the shrunk file: not the file's bytes then zeros")
	}
	small := make([]byte, 4096)
	if err := c.Do(cmdRead, 0, 0, 4096, small); err != nil || !bytes.Equal(small, data[:4096]) {
		t.Fatalf("the connection after a short send: %v", err)
	}
}

// TestSendFileTLS: over TLS nothing is sent from files (the kernel cannot
// encrypt), and large reads are right.
func TestSendFileTLS(t *testing.T) {
	rng := rand.New(rand.NewPCG(8, 8))
	data := randBytes(rng, 2<<20)
	p := newRaw(t, t.TempDir(), 2<<20, map[int64][]byte{0: data})
	d := openDisk(t, p, true)
	defer d.Close()
	cert := selfSigned(t)
	ts := serve(t, &Server{Exports: []*Export{{Disk: d}}, TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}, TLSRequired: true})
	c := ts.dial(t, &ClientOptions{TLSConfig: &tls.Config{InsecureSkipVerify: true}})
	before := fileSent.Load()
	buf := make([]byte, 2<<20)
	if err := c.Do(cmdRead, 0, 0, uint32(len(buf)), buf); err != nil || !bytes.Equal(buf, data) {
		t.Fatalf("read over TLS: %v", err)
	}
	if n := fileSent.Load() - before; n != 0 {
		t.Fatalf("%d bytes sent from the file over TLS", n)
	}
}

// shortSender sends the first half of what it is asked for, as a file
// that ends early does; refuse makes it refuse instead.
type shortSender struct {
	data   []byte
	refuse bool
}

func (s shortSender) SendTo(rc syscall.RawConn, off, n int64) (int64, error) {
	if s.refuse {
		return 0, driver.Errorf(driver.ErrUnsupported, "short", off, "refused")
	}
	half := s.data[off : off+n/2]
	var werr error
	err := rc.Write(func(fd uintptr) bool {
		for len(half) > 0 {
			k, err := syscall.Write(int(fd), half)
			if err == syscall.EAGAIN {
				return false
			}
			if err != nil {
				werr = err
				return true
			}
			half = half[k:]
		}
		return true
	})
	if err == nil {
		err = werr
	}
	return n/2 - int64(len(half)), err
}

// TestSendFileShort: a send the file cuts short is made up with zeros, in
// stream order after what was queued; a refusal sends nothing and turns
// sending from files off for the connection.
func TestSendFileShort(t *testing.T) {
	a, b := sockpair.Unix(t)
	var w replyWriter
	w.setConn(a)
	if w.rc == nil {
		t.Fatal("a unix socket has no raw connection")
	}
	data := randBytes(rand.New(rand.NewPCG(9, 9)), 1<<20)
	got := make(chan []byte, 1)
	go func() {
		buf := make([]byte, 3+1<<20)
		_, err := io.ReadFull(b, buf)
		if err != nil {
			t.Error(err)
		}
		got <- buf
	}()
	w.lock()
	w.buf = append(w.buf, "hdr"...)
	if !w.sendFile(shortSender{data: data}, 0, 1<<20) {
		t.Fatal("sendFile refused")
	}
	if err := w.unlock(); err != nil {
		t.Fatal(err)
	}
	buf := <-got
	want := append(append([]byte("hdr"), data[:1<<19]...), make([]byte, 1<<19)...)
	if !bytes.Equal(buf, want) {
		t.Fatal("a short send is not the header, the file's bytes, then zeros")
	}

	w.lock()
	if w.sendFile(shortSender{refuse: true}, 0, 4096) {
		t.Fatal("a refused send reported sent")
	}
	w.unlock()
	if !w.noSend.Load() || w.sendFile(shortSender{data: data}, 0, 4096) {
		t.Fatal("sending from files stays on after a refusal")
	}
}

// refusingStorage opens local files whose kernel send is refused, as an
// O_DIRECT file's is.
type refusingStorage struct{ driver.Storage }

func (s refusingStorage) Open(name string, flag driver.OpenFlag) (driver.File, error) {
	f, err := s.Storage.Open(name, flag)
	if err != nil {
		return nil, err
	}
	return refusingFile{f}, nil
}

type refusingFile struct{ driver.File }

func (f refusingFile) SendTo(rc syscall.RawConn, off, n int64) (int64, error) {
	return 0, driver.Errorf(driver.ErrUnsupported, f.Name(), off, "refused")
}

// TestSendFileRefused: when the kernel refuses to send from the file
// after the reply's header went out, the bytes are read and sent instead,
// in simple and structured replies, and the connection stops trying.
func TestSendFileRefused(t *testing.T) {
	rng := rand.New(rand.NewPCG(10, 10))
	data := randBytes(rng, 2<<20)
	p := newRaw(t, t.TempDir(), 2<<20, map[int64][]byte{0: data})
	d, err := vdisk.Open(context.Background(), p, &vdisk.OpenOptions{Format: "raw", ReadOnly: true, Storage: refusingStorage{osfs.New()}})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ts := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: d}}})
	for _, o := range []*ClientOptions{{NoStructuredReplies: true}, {}} {
		c := ts.dial(t, o)
		before := fileSent.Load()
		for _, r := range []struct{ off, n int64 }{{0, 1 << 20}, {4096, 300000}, {0, 2 << 20}} {
			buf := make([]byte, r.n)
			if err := c.Do(cmdRead, 0, uint64(r.off), uint32(r.n), buf); err != nil || !bytes.Equal(buf, data[r.off:r.off+r.n]) {
				t.Fatalf("%+v: read %d+%d after a refused send: %v", o, r.off, r.n, err)
			}
		}
		if n := fileSent.Load() - before; n != 0 {
			t.Fatalf("%+v: %d bytes counted as sent from the file", o, n)
		}
		c.Close()
	}
}
