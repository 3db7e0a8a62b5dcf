package nbd

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	mrand "math/rand/v2"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/format/raw"
)

func wantErrno(t *testing.T, err error, errno uint32, what string) {
	t.Helper()
	var ne *Error
	if !errors.As(err, &ne) || ne.Errno != errno {
		t.Errorf("%s: got %v, want %s", what, err, ErrnoName(errno))
	}
}

func TestHandshakeAndInfo(t *testing.T) {
	dir := t.TempDir()
	p := newRaw(t, dir, 4<<20, nil)
	d := openDisk(t, p, false)
	defer d.Close()
	ts := serve(t, &Server{Persistent: true, Exports: []*Export{
		{Name: "", Description: "the default", Disk: d},
		{Name: "ro", Disk: d, ReadOnly: true},
	}})
	c := ts.dial(t, nil)
	if c.Size() != 4<<20 {
		t.Errorf("size %d", c.Size())
	}
	f := c.Flags()
	for _, want := range []uint16{TFlagSendFlush, TFlagSendFUA, TFlagSendTrim, TFlagWriteZeroes, TFlagFastZero, TFlagCanMultiConn, TFlagSendCache, TFlagSendDF} {
		if f&want == 0 {
			t.Errorf("flags %#x lack %#x", f, want)
		}
	}
	if f&TFlagReadOnly != 0 {
		t.Errorf("writable export flagged read-only")
	}
	if mn, pr, mx := c.BlockSizes(); mn != 1 || pr != 4096 || mx != 32<<20 {
		t.Errorf("block sizes %d %d %d", mn, pr, mx)
	}
	ro := ts.dial(t, &ClientOptions{ExportName: "ro", NoStructuredReplies: true})
	if ro.Flags()&TFlagReadOnly == 0 || ro.Flags()&TFlagSendTrim != 0 || ro.Flags()&TFlagSendDF != 0 {
		t.Errorf("read-only export flags %#x", ro.Flags())
	}
	old := ts.dial(t, &ClientOptions{ExportNameOnly: true})
	if old.Size() != 4<<20 || old.Flags() != f {
		t.Errorf("NBD_OPT_EXPORT_NAME: size %d flags %#x, want flags %#x", old.Size(), old.Flags(), f)
	}

	nc, err := net.Dial("unix", ts.sock)
	if err != nil {
		t.Fatal(err)
	}
	list, err := ListExports(nc, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := []ExportInfo{{"", "the default"}, {"ro", ""}}
	if len(list) != 2 || list[0] != want[0] || list[1] != want[1] {
		t.Errorf("list %v, want %v", list, want)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = Dial(ctx, "unix", ts.sock, &ClientOptions{ExportName: "nope"})
	var ne *Error
	if !errors.As(err, &ne) || ne.Errno != repErrUnknown {
		t.Errorf("unknown export: %v", err)
	}
	// TLS is not configured: STARTTLS is refused by policy.
	_, err = Dial(ctx, "unix", ts.sock, &ClientOptions{TLSConfig: &tls.Config{InsecureSkipVerify: true}})
	if !errors.As(err, &ne) || ne.Errno != repErrPolicy {
		t.Errorf("STARTTLS without TLS: %v", err)
	}
}

// model is the expected content of an export.
type model struct {
	mu  sync.Mutex
	buf []byte
}

func TestReadWriteModel(t *testing.T) {
	for _, structured := range []bool{true, false} {
		name := "structured"
		if !structured {
			name = "simple"
		}
		t.Run(name, func(t *testing.T) {
			const size = 8 << 20
			dir := t.TempDir()
			r := mrand.New(mrand.NewPCG(1, 2))
			init := map[int64][]byte{0: randBytes(r, 100000), 3 << 20: randBytes(r, 1<<20)}
			p := newRaw(t, dir, size, init)
			m := &model{buf: make([]byte, size)}
			for off, b := range init {
				copy(m.buf[off:], b)
			}
			d := openDisk(t, p, false)
			defer d.Close()
			ts := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: d}}})
			c := ts.dial(t, &ClientOptions{NoStructuredReplies: !structured})
			// Each goroutine owns a slice of the disk, so the model is exact
			// while requests from all of them are pipelined.
			const workers = 8
			var wg sync.WaitGroup
			errs := make(chan error, workers)
			for w := 0; w < workers; w++ {
				wg.Add(1)
				go func(w int) {
					defer wg.Done()
					rr := mrand.New(mrand.NewPCG(uint64(w), 7))
					base, span := int64(w)*size/workers, int64(size/workers)
					for i := 0; i < 100; i++ {
						off := base + rr.Int64N(span-1)
						n := 1 + rr.Int64N(min(span-(off-base), 128<<10))
						switch op := rr.IntN(10); {
						case op < 4:
							b := randBytes(rr, int(n))
							var flags uint16
							if op == 0 {
								flags = FlagFUA
							}
							if _, err := c.Write(b, off, flags); err != nil {
								errs <- err
								return
							}
							m.mu.Lock()
							copy(m.buf[off:], b)
							m.mu.Unlock()
						case op < 6:
							flags := uint16(0)
							if op == 5 {
								flags = FlagNoHole
							}
							if err := c.WriteZeroes(off, uint32(n), flags); err != nil {
								errs <- err
								return
							}
							m.mu.Lock()
							clear(m.buf[off : off+n])
							m.mu.Unlock()
						case op < 9:
							got := make([]byte, n)
							if _, err := c.ReadAt(got, off); err != nil {
								errs <- err
								return
							}
							m.mu.Lock()
							ok := bytes.Equal(got, m.buf[off:off+n])
							m.mu.Unlock()
							if !ok {
								errs <- errors.New("read differs from the model")
								return
							}
						default:
							if err := c.Flush(); err != nil {
								errs <- err
								return
							}
						}
					}
				}(w)
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			if err := c.Cache(0, size); err != nil {
				t.Errorf("cache: %v", err)
			}
			got := make([]byte, size)
			if _, err := c.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, m.buf) {
				t.Fatal("final read differs from the model")
			}
			if err := d.Flush(); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(fileBytes(t, p), m.buf) {
				t.Fatal("image differs from the model")
			}
		})
	}
}

// expectedStatus computes the descriptors of the two contexts from Disk.Map.
func expectedStatus(t *testing.T, d *vdisk.Disk) (base, depth []BlockExtent) {
	t.Helper()
	err := d.Map(context.Background(), 0, d.Size(), func(e vdisk.Extent) error {
		var bf, df uint32
		if !e.IsData() {
			bf |= StateHole
		}
		if e.ReadsZero() {
			bf |= StateZero
		}
		if e.Present() {
			df = uint32(e.Depth + 1)
		}
		base = mergeExt(base, BlockExtent{uint32(e.Length), bf})
		depth = mergeExt(depth, BlockExtent{uint32(e.Length), df})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return base, depth
}

func mergeExt(l []BlockExtent, e BlockExtent) []BlockExtent {
	if k := len(l); k > 0 && l[k-1].Flags == e.Flags {
		l[k-1].Length += e.Length
		return l
	}
	return append(l, e)
}

// fullStatus walks the whole export with block status requests.
func fullStatus(t *testing.T, c *Client, ctxName string, reqOne bool) []BlockExtent {
	t.Helper()
	var out []BlockExtent
	var flags uint16
	if reqOne {
		flags = FlagReqOne
	}
	for off := int64(0); off < c.Size(); {
		n := uint32(min(c.Size()-off, 1<<30))
		st, err := c.BlockStatus(off, n, flags)
		if err != nil {
			t.Fatal(err)
		}
		l := st[ctxName]
		if len(l) == 0 || (reqOne && len(l) != 1) {
			t.Fatalf("block status at %d: %d extents for %s", off, len(l), ctxName)
		}
		for _, e := range l {
			if e.Length == 0 {
				t.Fatal("zero-length extent")
			}
			out = mergeExt(out, e)
			off += int64(e.Length)
		}
	}
	return out
}

func TestBlockStatusMatchesMap(t *testing.T) {
	dir := t.TempDir()
	p := newRaw(t, dir, 16<<20, map[int64][]byte{
		0:        bytes.Repeat([]byte{1}, 4096),
		1 << 20:  bytes.Repeat([]byte{2}, 64<<10),
		8 << 20:  bytes.Repeat([]byte{3}, 1<<20),
		15 << 20: bytes.Repeat([]byte{4}, 8192),
	})
	d := openDisk(t, p, true)
	defer d.Close()
	ts := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: d}}})
	c := ts.dial(t, &ClientOptions{MetaContexts: []string{ContextBaseAllocation, ContextAllocationDepth, "base:", "x-unknown:foo"}})
	if len(c.Contexts()) != 2 {
		t.Fatalf("contexts %v", c.Contexts())
	}
	wantBase, wantDepth := expectedStatus(t, d)
	for _, reqOne := range []bool{false, true} {
		if got := fullStatus(t, c, ContextBaseAllocation, reqOne); !equalExt(got, wantBase) {
			t.Errorf("base:allocation (req_one %v)\n got %v\nwant %v", reqOne, got, wantBase)
		}
		if got := fullStatus(t, c, ContextAllocationDepth, reqOne); !equalExt(got, wantDepth) {
			t.Errorf("qemu:allocation-depth (req_one %v)\n got %v\nwant %v", reqOne, got, wantDepth)
		}
	}
	// Replies cut short at maxExtents descriptors still add up.
	saved := maxExtents.Swap(2)
	got := fullStatus(t, c, ContextBaseAllocation, false)
	maxExtents.Store(saved)
	if !equalExt(got, wantBase) {
		t.Errorf("base:allocation with short replies\n got %v\nwant %v", got, wantBase)
	}
	// REQ_ONE never exceeds the request.
	st, err := c.BlockStatus(1<<20+100, 1000, FlagReqOne)
	if err != nil {
		t.Fatal(err)
	}
	if l := st[ContextBaseAllocation]; len(l) != 1 || l[0].Length != 1000 || l[0].Flags != 0 {
		t.Errorf("REQ_ONE inside data: %v", l)
	}
	// Past the end, and without contexts: EINVAL.
	_, err = c.BlockStatus(16<<20-512, 1024, 0)
	wantErrno(t, err, EINVAL, "block status past the end")
	plain := ts.dial(t, nil)
	_, err = plain.BlockStatus(0, 4096, 0)
	wantErrno(t, err, EINVAL, "block status without contexts")
	// SET_META_CONTEXT ignores wildcards.
	other := ts.dial(t, &ClientOptions{ExportName: "", MetaContexts: []string{"qemu:"}})
	if len(other.Contexts()) != 0 {
		t.Errorf("SET_META_CONTEXT selected wildcard: %v", other.Contexts())
	}
}

func equalExt(a, b []BlockExtent) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestChainAllocationDepth serves a testdiff image over a raw base: the
// depth context tells the layers apart.
func TestChainAllocationDepth(t *testing.T) {
	dir := t.TempDir()
	base := newRaw(t, dir, 4<<20, map[int64][]byte{0: bytes.Repeat([]byte{9}, 1<<20)})
	top := filepath.Join(dir, "top.tdf")
	d, err := vdisk.Create(context.Background(), top, &vdisk.CreateOptions{Format: "testdiff", Backing: "disk.raw", BackingFormat: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.WriteAt(bytes.Repeat([]byte{7}, 64<<10), 512<<10); err != nil {
		t.Fatal(err)
	}
	if err := d.WriteZeroes(2<<20, 64<<10, false); err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	_ = base
	ts := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: d}}})
	c := ts.dial(t, &ClientOptions{MetaContexts: []string{ContextBaseAllocation, ContextAllocationDepth}})
	wantBase, wantDepth := expectedStatus(t, d)
	gotDepth := fullStatus(t, c, ContextAllocationDepth, false)
	if !equalExt(gotDepth, wantDepth) {
		t.Errorf("depth\n got %v\nwant %v", gotDepth, wantDepth)
	}
	if got := fullStatus(t, c, ContextBaseAllocation, false); !equalExt(got, wantBase) {
		t.Errorf("base\n got %v\nwant %v", got, wantBase)
	}
	seen := map[uint32]bool{}
	for _, e := range gotDepth {
		seen[e.Flags] = true
	}
	if !seen[1] || !seen[2] {
		t.Errorf("depths 1 and 2 expected in %v", gotDepth)
	}
	got := make([]byte, 4<<20)
	if _, err := c.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 4<<20)
	if _, err := d.ReadAt(want, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Error("chain read differs")
	}
}

// noZeroFormat is raw without efficient zeroing, for FAST_ZERO.
var noZeroFormat = &driver.Format{
	Name: "nbdtest-nozero",
	Caps: driver.CapWrite,
	Open: func(ctx context.Context, p *driver.OpenParams) (driver.Image, error) {
		img, err := raw.Format.Open(ctx, p)
		if err != nil {
			return nil, err
		}
		return struct{ driver.Image }{img}, nil
	},
}

func init() { driver.Register(noZeroFormat) }

func TestErrors(t *testing.T) {
	dir := t.TempDir()
	p := newRaw(t, dir, 1<<20, nil)
	d := openDisk(t, p, false)
	defer d.Close()
	nz, err := vdisk.Open(context.Background(), newRaw(t, t.TempDir(), 1<<20, nil), &vdisk.OpenOptions{Format: "nbdtest-nozero"})
	if err != nil {
		t.Fatal(err)
	}
	defer nz.Close()
	ts := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: d}, {Name: "ro", Disk: d, ReadOnly: true}, {Name: "nz", Disk: nz}}})
	for _, structured := range []bool{true, false} {
		c := ts.dial(t, &ClientOptions{NoStructuredReplies: !structured})
		ro := ts.dial(t, &ClientOptions{ExportName: "ro", NoStructuredReplies: !structured})
		buf := make([]byte, 4096)
		_, err := ro.WriteAt(buf, 0)
		wantErrno(t, err, EPERM, "write on read-only")
		wantErrno(t, ro.Trim(0, 4096, 0), EPERM, "trim on read-only")
		wantErrno(t, ro.WriteZeroes(0, 4096, 0), EPERM, "write zeroes on read-only")
		if err := ro.Flush(); err != nil {
			t.Errorf("flush on read-only: %v", err)
		}
		if _, err := ro.ReadAt(buf, 0); err != nil {
			t.Errorf("read on read-only: %v", err)
		}
		_, err = c.ReadAt(buf, 1<<20-100)
		wantErrno(t, err, EINVAL, "read past the end")
		wantErrno(t, c.Do(cmdRead, 0, 1<<63, 4096, buf), EINVAL, "read at a huge offset")
		wantErrno(t, c.Do(cmdRead, 0, ^uint64(0), 4096, buf), EINVAL, "read at offset overflowing")
		_, err = c.WriteAt(buf, 1<<20-100)
		wantErrno(t, err, ENOSPC, "write past the end")
		wantErrno(t, c.Trim(1<<20, 1, 0), EINVAL, "trim past the end")
		wantErrno(t, c.WriteZeroes(1<<20-1, 2, 0), ENOSPC, "write zeroes past the end")
		wantErrno(t, c.Do(42, 0, 0, 0, nil), EINVAL, "unknown command")
		wantErrno(t, c.Do(cmdFlush, FlagReqOne, 0, 0, nil), EINVAL, "bad flag")
		wantErrno(t, c.Do(cmdRead, 1<<9, 0, 4096, buf), EINVAL, "unknown flag")
		big := make([]byte, MaxPayload+1)
		want := uint32(EINVAL)
		if structured {
			want = EOVERFLOW
		}
		wantErrno(t, c.Do(cmdRead, 0, 0, MaxPayload+1, big), want, "oversized read")
		if structured {
			if err := c.Do(cmdRead, FlagDF, 0, 128<<10, make([]byte, 128<<10)); err != nil {
				t.Errorf("DF read: %v", err)
			}
		} else {
			wantErrno(t, c.Do(cmdRead, FlagDF, 0, 4096, buf), EINVAL, "DF without structured replies")
		}
		if err := c.WriteZeroes(0, 4096, FlagFastZero); err != nil {
			t.Errorf("fast zero on raw: %v", err)
		}
		nzc := ts.dial(t, &ClientOptions{ExportName: "nz", NoStructuredReplies: !structured})
		wantErrno(t, nzc.WriteZeroes(0, 4096, FlagFastZero), ENOTSUP, "fast zero without efficient zeroing")
		if err := nzc.WriteZeroes(0, 4096, 0); err != nil {
			t.Errorf("slow zero: %v", err)
		}
		// Zero-length requests are harmless.
		if err := c.Do(cmdRead, 0, 0, 0, nil); err != nil {
			t.Errorf("zero-length read: %v", err)
		}
		if err := c.Do(cmdWrite, 0, 0, 0, nil); err != nil {
			t.Errorf("zero-length write: %v", err)
		}
		// The connection still works after all that.
		if _, err := c.WriteAt([]byte("still alive"), 0); err != nil {
			t.Fatal(err)
		}
		if _, err := c.ReadAt(buf[:11], 0); err != nil || string(buf[:11]) != "still alive" {
			t.Fatalf("read back: %q %v", buf[:11], err)
		}
	}
}

// TestLifecycle: without Persistent, Serve returns once the last client is
// gone; with MaxConns 1 a second client waits for the first and
// CAN_MULTI_CONN is not advertised.
func TestLifecycle(t *testing.T) {
	p := newRaw(t, t.TempDir(), 1<<20, nil)
	d := openDisk(t, p, false)
	defer d.Close()
	s := &Server{MaxConns: 1, Exports: []*Export{{Disk: d}}, Logger: testLogger(t)}
	sock := filepath.Join(sockDir(t), "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(context.Background(), l) }()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c1, err := Dial(ctx, "unix", sock, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c1.Flags()&TFlagCanMultiConn != 0 {
		t.Error("CAN_MULTI_CONN advertised with a single connection slot")
	}
	second := make(chan error, 1)
	go func() {
		c2, err := Dial(ctx, "unix", sock, nil)
		if err == nil {
			c2.Close()
		}
		second <- err
	}()
	select {
	case err := <-second:
		t.Fatalf("second client served while the first is connected (%v)", err)
	case <-time.After(300 * time.Millisecond):
	}
	c1.Close()
	// The first client left: the server stops, and the waiting client is
	// never served.
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after the last client left")
	}
	if err := <-second; err == nil {
		t.Error("second client was served after shutdown")
	}
}

// TestShutdownDrains: cancelling Serve lets in-flight requests finish and
// closes connections; the client sees the connection end.
func TestShutdownDrains(t *testing.T) {
	p := newRaw(t, t.TempDir(), 4<<20, nil)
	d := openDisk(t, p, false)
	defer d.Close()
	ts := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: d}}})
	c := ts.dial(t, nil)
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b := make([]byte, 1<<20)
			for {
				if _, err := c.WriteAt(b, 0); err != nil {
					return
				}
			}
		}()
	}
	time.Sleep(100 * time.Millisecond)
	if err := ts.stop(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if _, err := c.ReadAt(make([]byte, 10), 0); err == nil {
		t.Error("connection still usable after shutdown")
	}
}

func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "localhost"},
		DNSNames:     []string{"localhost"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func TestTLS(t *testing.T) {
	p := newRaw(t, t.TempDir(), 1<<20, nil)
	d := openDisk(t, p, false)
	defer d.Close()
	cert := selfSigned(t)
	for _, required := range []bool{false, true} {
		ts := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: d}},
			TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}, TLSRequired: required})
		c := ts.dial(t, &ClientOptions{TLSConfig: &tls.Config{InsecureSkipVerify: true}, MetaContexts: []string{ContextBaseAllocation}})
		msg := []byte("over tls")
		if _, err := c.WriteAt(msg, 4096); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		if _, err := c.ReadAt(got, 4096); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("read %q %v", got, err)
		}
		if _, err := c.BlockStatus(0, 1<<20, 0); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		plain, err := Dial(ctx, "unix", ts.sock, nil)
		cancel()
		if required {
			var ne *Error
			if !errors.As(err, &ne) || ne.Errno != repErrTLSReqd {
				t.Errorf("plain client on a TLS-only server: %v", err)
			}
		} else if err != nil {
			t.Errorf("plain client on a TLS-optional server: %v", err)
		} else {
			plain.Close()
		}
	}
}

// TestSlowClientDoesNotBlockOthers: a client that sends reads and never
// reads the replies stalls only itself.
func TestSlowClientDoesNotBlockOthers(t *testing.T) {
	p := newRaw(t, t.TempDir(), 64<<20, map[int64][]byte{0: bytes.Repeat([]byte{1}, 32<<20)})
	d := openDisk(t, p, false)
	defer d.Close()
	ts := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: d}}})
	rc := rawDial(t, ts.sock)
	rc.negotiate(t, true, "")
	// Queue far more than the connection buffers: 200 x 32 MiB reads.
	go func() {
		for i := 0; i < 200; i++ {
			if err := rc.request(cmdRead, 0, uint64(i), 0, MaxPayload, nil); err != nil {
				return
			}
		}
	}()
	time.Sleep(200 * time.Millisecond)
	start := time.Now()
	c := ts.dial(t, nil)
	b := make([]byte, 4096)
	for i := 0; i < 100; i++ {
		if _, err := c.WriteAt(b, int64(i)*4096); err != nil {
			t.Fatal(err)
		}
		if _, err := c.ReadAt(b, int64(i)*4096); err != nil {
			t.Fatal(err)
		}
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Errorf("the other client took %v", el)
	}
	t.Logf("other client: %v", time.Since(start))
	rc.nc.Close()
}
