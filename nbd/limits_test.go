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
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/format/raw"
)

// waitFor polls cond for up to 20 s (no timing is asserted: the deadline
// only keeps a broken server from hanging the test).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// dialCtx dials the test server; connecting and negotiating must end
// within 30 s (a bound against hangs, not a timing assertion).
func dialCtx(ts *testServer, o *ClientOptions) (*Client, error) {
	nc, err := net.DialTimeout("unix", ts.sock, 30*time.Second)
	if err != nil {
		return nil, err
	}
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	c, err := NewClient(nc, o)
	if err != nil {
		nc.Close()
		return nil, err
	}
	nc.SetDeadline(time.Time{})
	return c, nil
}

// TestIdleClientDropped: with one client slot, a client that negotiates
// and then sends nothing is disconnected after the idle timeout, and the
// client waiting behind it is served.
func TestIdleClientDropped(t *testing.T) {
	p := newRaw(t, t.TempDir(), 1<<20, map[int64][]byte{0: []byte("hello")})
	d := openDisk(t, p, false)
	defer d.Close()
	ts := serve(t, &Server{MaxConns: 1, Persistent: true, IdleTimeout: time.Second, Exports: []*Export{{Disk: d}}})
	idle := rawDial(t, ts.sock)
	idle.negotiate(t, true, "")
	// One request answered first: activity does not exempt it later.
	if err := idle.request(cmdFlush, 0, 1, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	if errno, cookie, _, err := idle.simpleReply(0); err != nil || errno != 0 || cookie != 1 {
		t.Fatalf("flush reply: %d %d %v", errno, cookie, err)
	}
	c, err := dialCtx(ts, nil)
	if err != nil {
		t.Fatalf("second client not served: %v", err)
	}
	defer c.Close()
	got := make([]byte, 5)
	if _, err := c.ReadAt(got, 0); err != nil || string(got) != "hello" {
		t.Fatalf("second client read %q %v", got, err)
	}
	idle.expectClosed(t, "idle client")
}

// TestNotReadingClientDropped: a client that queues large reads and never
// reads the replies is disconnected once a reply cannot be sent for the
// idle timeout; its requests end, the buffers it held go back to the
// budget, and the next client is served.
func TestNotReadingClientDropped(t *testing.T) {
	p := newRaw(t, t.TempDir(), 64<<20, map[int64][]byte{0: bytes.Repeat([]byte{1}, 32<<20)})
	d := openDisk(t, p, false)
	defer d.Close()
	s := &Server{MaxConns: 1, Persistent: true, IdleTimeout: time.Second, Exports: []*Export{{Disk: d}}, Logger: testLogger(t)}
	if err := s.init(); err != nil {
		t.Fatal(err)
	}
	ts := serve(t, s)
	rc := rawDial(t, ts.sock)
	rc.negotiate(t, false, "")
	for i := 0; i < 8; i++ {
		if err := rc.request(cmdRead, 0, uint64(i), 0, MaxPayload, nil); err != nil {
			t.Fatal(err)
		}
	}
	c, err := dialCtx(ts, nil)
	if err != nil {
		t.Fatalf("second client not served: %v", err)
	}
	if _, err := c.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	c.Close()
	full := s.MemoryBudget - int64(cap(s.slots))*connCharge
	waitFor(t, "the budget to be returned", func() bool { return s.mem.available() == full })
	// The dropped client gets at most what was sent before the cut.
	rc.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, _ := io.Copy(io.Discard, rc.r)
	if n >= 8*(MaxPayload+16) {
		t.Errorf("the client not reading got every reply (%d bytes)", n)
	}
}

// flushGate blocks the flushes of the nbdtest-gated format until closed;
// each test using the format sets a new one.
var flushGate chan struct{}

type gatedImage struct{ driver.Image }

func (g gatedImage) Flush() error {
	<-flushGate
	return g.Image.Flush()
}

// gatedFormat is raw whose flush waits for flushGate.
var gatedFormat = &driver.Format{
	Name: "nbdtest-gated",
	Caps: driver.CapWrite,
	Open: func(ctx context.Context, p *driver.OpenParams) (driver.Image, error) {
		img, err := raw.Format.Open(ctx, p)
		if err != nil {
			return nil, err
		}
		return gatedImage{img}, nil
	},
}

func init() { driver.Register(gatedFormat) }

// TestBusyClientNotIdle: a client whose request runs longer than the idle
// timeout is not disconnected while it waits for the reply.
func TestBusyClientNotIdle(t *testing.T) {
	flushGate = make(chan struct{})
	p := newRaw(t, t.TempDir(), 1<<20, nil)
	d, err := vdisk.Open(context.Background(), p, &vdisk.OpenOptions{Format: "nbdtest-gated"})
	if err != nil {
		t.Fatal(err)
	}
	released := false
	defer func() {
		if !released {
			close(flushGate)
		}
		d.Close()
	}()
	ts := serve(t, &Server{Persistent: true, IdleTimeout: 200 * time.Millisecond, Exports: []*Export{{Disk: d}}})
	c := ts.dial(t, nil)
	done := make(chan error, 1)
	go func() { done <- c.Flush() }()
	time.Sleep(time.Second) // five idle timeouts with the flush running
	close(flushGate)
	released = true
	if err := <-done; err != nil {
		t.Fatalf("a client waiting for its reply was dropped: %v", err)
	}
	// Still connected: the running request kept it from being idle.
	if err := c.Flush(); err != nil {
		t.Fatalf("a client waiting for its reply was dropped after it: %v", err)
	}
	// Idle now, it is dropped (the client's reader sees the end).
	waitFor(t, "the idle client to be dropped", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.err != nil
	})
}

// TestMemoryBudget: many clients queueing large reads against a small
// budget are all answered, the server never hands out more than the budget
// (its low-water mark stays at or above zero by construction, so the
// oracle is the buffers held, sampled), and reads larger than the
// advertised payload bound are refused as the spec says.
func TestMemoryBudget(t *testing.T) {
	const budget = 8 << 20
	p := newRaw(t, t.TempDir(), 16<<20, map[int64][]byte{0: bytes.Repeat([]byte{7}, 16<<20)})
	d := openDisk(t, p, false)
	defer d.Close()
	s := &Server{Persistent: true, MemoryBudget: budget, Exports: []*Export{{Disk: d}}, Logger: testLogger(t)}
	if err := s.init(); err != nil {
		t.Fatal(err)
	}
	ts := serve(t, s)
	reqMem := budget - int64(cap(s.slots))*connCharge
	if cap(s.slots) != budget/2/connCharge {
		t.Errorf("connections: %d, want %d (half the budget)", cap(s.slots), budget/2/connCharge)
	}
	c := ts.dial(t, nil)
	_, _, maxp := c.BlockSizes()
	if int64(maxp) > reqMem-requestCharge || maxp%PreferredBlockSize != 0 || maxp == 0 {
		t.Fatalf("advertised maximum payload %d with %d bytes for requests", maxp, reqMem)
	}
	wantErrno(t, c.Do(cmdRead, 0, 0, maxp+1, make([]byte, maxp+1)), EOVERFLOW, "read above the advertised maximum")
	ns := ts.dial(t, &ClientOptions{NoStructuredReplies: true})
	wantErrno(t, ns.Do(cmdRead, 0, 0, maxp+1, make([]byte, maxp+1)), EINVAL, "read above the advertised maximum (simple replies)")
	// A write above it is refused and its payload skipped: the
	// connection goes on.
	wantErrno(t, ns.Do(cmdWrite, 0, 0, maxp+4096, make([]byte, maxp+4096)), EINVAL, "write above the advertised maximum")
	if _, err := ns.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatalf("connection unusable after a refused write: %v", err)
	}
	c.Close()
	ns.Close()

	var lowMu sync.Mutex
	low := reqMem
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			a := s.mem.available()
			lowMu.Lock()
			low = min(low, a)
			lowMu.Unlock()
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	// Clients queue reads of the maximum size, then read the replies
	// late: without the budget each connection would hold 4 buffers.
	const clients = 12
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rc := rawDial(t, ts.sock)
			rc.negotiate(t, false, "")
			for k := 0; k < 4; k++ {
				if err := rc.request(cmdRead, 0, uint64(k), 0, maxp, nil); err != nil {
					errs <- err
					return
				}
			}
			time.Sleep(50 * time.Millisecond)
			for k := 0; k < 4; k++ {
				errno, _, data, err := rc.simpleReply(int(maxp))
				if err != nil || errno != 0 || data[0] != 7 {
					errs <- errors.New("read failed")
					return
				}
			}
			rc.send(reqBytes(cmdDisc, 0, 9, 0, 0))
		}()
	}
	wg.Wait()
	close(stop)
	<-sampled
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if low < 0 {
		t.Errorf("budget overdrawn: %d", low)
	}
	if low > reqMem-int64(maxp) {
		t.Errorf("the budget was never used by a maximum read (low-water %d of %d): the test does not load the server", low, reqMem)
	}
	waitFor(t, "the budget to be returned", func() bool { return s.mem.available() == reqMem })
}

// TestPoolFIFO: a large acquisition waiting in the pool is not overtaken
// by small ones that arrive after it.
func TestPoolFIFO(t *testing.T) {
	p := newPool(10)
	if !p.tryAcquire(8) {
		t.Fatal("tryAcquire on a fresh pool")
	}
	got := make(chan struct{})
	go func() {
		p.acquire(10, nil)
		close(got)
	}()
	waitFor(t, "the waiter to queue", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return len(p.waiters) == 1
	})
	if p.tryAcquire(1) {
		t.Error("a small acquisition overtook a waiting large one")
	}
	quit := make(chan struct{})
	close(quit)
	if p.acquire(1, quit) {
		t.Error("acquire after quit closed succeeded while a waiter was ahead")
	}
	p.release(8)
	<-got
	if p.available() != 0 {
		t.Errorf("available %d after the grant, want 0", p.available())
	}
	p.release(10)
	if p.available() != 10 {
		t.Errorf("available %d, want 10", p.available())
	}
}

// recordImage is raw that records the longest zero and discard call it
// gets.
type recordImage struct{ driver.Image }

var longestCall atomic.Int64

func (r recordImage) WriteZeroes(off, n int64, unmap bool) error {
	longestCall.Store(max(longestCall.Load(), n))
	return r.Image.(driver.Zeroer).WriteZeroes(off, n, unmap)
}

func (r recordImage) Discard(off, n int64) error {
	longestCall.Store(max(longestCall.Load(), n))
	return r.Image.(driver.Discarder).Discard(off, n)
}

var recordFormat = &driver.Format{
	Name: "nbdtest-record",
	Caps: raw.Format.Caps,
	Open: func(ctx context.Context, p *driver.OpenParams) (driver.Image, error) {
		img, err := raw.Format.Open(ctx, p)
		if err != nil {
			return nil, err
		}
		return recordImage{img}, nil
	},
}

func init() { driver.Register(recordFormat) }

// TestHugeZeroTrimCache: TRIM, WRITE_ZEROES and CACHE over almost 4 GiB
// are done in pieces without large allocations, with the right result.
func TestHugeZeroTrimCache(t *testing.T) {
	const size = 4 << 30
	data := bytes.Repeat([]byte{0x5a}, 64<<10)
	p := newRaw(t, t.TempDir(), size, map[int64][]byte{3 << 30: data, size - 8192: data[:8192]})
	d, err := vdisk.Open(context.Background(), p, &vdisk.OpenOptions{Format: "nbdtest-record"})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ts := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: d}}})
	c := ts.dial(t, nil)
	const n = 0xffff_f000 // the largest 4 KiB-aligned length
	measure := func(what string, f func() error) {
		t.Helper()
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		if err := f(); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		runtime.ReadMemStats(&after)
		alloc := after.TotalAlloc - before.TotalAlloc
		t.Logf("%s of %d bytes: %d bytes allocated", what, uint64(n), alloc)
		if alloc > 16<<20 {
			t.Errorf("%s of %d bytes allocated %d bytes", what, uint64(n), alloc)
		}
	}
	measure("cache", func() error { return c.Cache(0, n) })
	measure("trim", func() error { return c.Trim(0, n, 0) })
	measure("write zeroes", func() error { return c.WriteZeroes(0, n, 0) })
	measure("write zeroes (no hole)", func() error { return c.WriteZeroes(0, n, FlagNoHole) })
	// The Disk (and the range lock it takes) saw pieces only.
	if l := longestCall.Load(); l > chunkLen || l == 0 {
		t.Errorf("longest zero/discard call reaching the image: %d bytes (pieces of at most %d expected)", l, chunkLen)
	}
	got := make([]byte, 64<<10)
	if _, err := c.ReadAt(got, 3<<30); err != nil || !bytes.Equal(got, make([]byte, len(got))) {
		t.Errorf("zeroed range reads %x... %v", got[:8], err)
	}
	// The last 4 KiB is outside the zeroed range and keeps its data.
	if _, err := c.ReadAt(got[:4096], size-4096); err != nil || !bytes.Equal(got[:4096], data[:4096]) {
		t.Errorf("data after the zeroed range changed: %x... %v", got[:8], err)
	}
}

// TestServeConnLimits: ServeConn applies Allow and the connection limit
// like Serve.
func TestServeConnLimits(t *testing.T) {
	p := newRaw(t, t.TempDir(), 1<<20, nil)
	d := openDisk(t, p, false)
	defer d.Close()
	s := &Server{MaxConnections: 1, Exports: []*Export{{Disk: d}}, Logger: testLogger(t),
		Allow: func(a net.Addr) bool { ta, ok := a.(*net.TCPAddr); return ok && ta.IP.IsLoopback() }}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			nc, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- nc
		}
	}()
	serveOne := func(nc net.Conn) chan error {
		ch := make(chan error, 1)
		go func() { ch <- s.ServeConn(context.Background(), nc) }()
		return ch
	}
	// A unix socket peer does not pass the filter (it has no IP).
	a, b := net.Pipe()
	defer b.Close()
	if err := s.ServeConn(context.Background(), a); !errors.Is(err, ErrRefused) {
		t.Errorf("ServeConn of a refused peer: %v", err)
	}
	// A TCP client from the loopback is served; while it is, a second one
	// is refused by the connection limit.
	c1, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	first := serveOne(<-accepted)
	cl, err := NewClient(c1, nil)
	if err != nil {
		t.Fatalf("first client: %v", err)
	}
	c2, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if err := s.ServeConn(context.Background(), <-accepted); !errors.Is(err, ErrTooManyConnections) {
		t.Errorf("ServeConn beyond the limit: %v", err)
	}
	c2.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := c2.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Errorf("the refused client was not closed: %d %v", n, err)
	}
	c2.Close()
	cl.Close()
	if err := <-first; err != nil {
		t.Errorf("first client: %v", err)
	}
}

// tlsCreds writes a CA, a server certificate and a client certificate
// signed by it in qemu's directory layout into dir, and a client
// certificate signed by another CA into dir/rogue.
func tlsCreds(t *testing.T, dir string) {
	t.Helper()
	ca, caKey := newCert(t, nil, nil, "vdisk test CA", true, 0)
	writePEM(t, filepath.Join(dir, CredsCACert), "CERTIFICATE", ca.Raw)
	srv, srvKey := newCert(t, ca, caKey, "localhost", false, x509.ExtKeyUsageServerAuth)
	writePEM(t, filepath.Join(dir, CredsServerCert), "CERTIFICATE", srv.Raw)
	writeKey(t, filepath.Join(dir, CredsServerKey), srvKey)
	cli, cliKey := newCert(t, ca, caKey, "client", false, x509.ExtKeyUsageClientAuth)
	writePEM(t, filepath.Join(dir, CredsClientCert), "CERTIFICATE", cli.Raw)
	writeKey(t, filepath.Join(dir, CredsClientKey), cliKey)
	rogue := filepath.Join(dir, "rogue")
	os.Mkdir(rogue, 0o700)
	other, otherKey := newCert(t, nil, nil, "other CA", true, 0)
	rc, rcKey := newCert(t, other, otherKey, "client", false, x509.ExtKeyUsageClientAuth)
	writePEM(t, filepath.Join(rogue, CredsCACert), "CERTIFICATE", ca.Raw)
	writePEM(t, filepath.Join(rogue, CredsClientCert), "CERTIFICATE", rc.Raw)
	writeKey(t, filepath.Join(rogue, CredsClientKey), rcKey)
}

var serial int64

// newCert makes a certificate signed by parent (self-signed when nil).
func newCert(t *testing.T, parent *x509.Certificate, parentKey *ecdsa.PrivateKey, cn string, isCA bool, usage x509.ExtKeyUsage) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial++
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		BasicConstraintsValid: true, IsCA: isCA,
	}
	if isCA {
		tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign
	} else {
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{usage}
		if usage == x509.ExtKeyUsageServerAuth {
			tmpl.DNSNames = []string{"localhost"}
			tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
		}
	}
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

func writeKey(t *testing.T, path string, key *ecdsa.PrivateKey) {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, path, "PRIVATE KEY", der)
}

// TestTLSClientCertificates: a server with verify-peer admits a client
// with a certificate signed by its CA and refuses one without a
// certificate, one signed by another CA, and one not starting TLS.
func TestTLSClientCertificates(t *testing.T) {
	dir := t.TempDir()
	tlsCreds(t, dir)
	p := newRaw(t, t.TempDir(), 1<<20, map[int64][]byte{0: []byte("secret")})
	d := openDisk(t, p, false)
	defer d.Close()
	cfg, err := ServerTLSCreds(dir, true)
	if err != nil {
		t.Fatal(err)
	}
	ts := serve(t, &Server{Persistent: true, TLSConfig: cfg, Exports: []*Export{{Disk: d}}})

	good, err := ClientTLSCreds(dir, "localhost")
	if err != nil {
		t.Fatal(err)
	}
	if len(good.Certificates) != 1 {
		t.Fatal("ClientTLSCreds did not load the client certificate")
	}
	c, err := dialCtx(ts, &ClientOptions{TLSConfig: good})
	if err != nil {
		t.Fatalf("client with a certificate of the CA: %v", err)
	}
	got := make([]byte, 6)
	if _, err := c.ReadAt(got, 0); err != nil || string(got) != "secret" {
		t.Errorf("read %q %v", got, err)
	}
	c.Close()

	noCert, err := ClientTLSConfig(filepath.Join(dir, CredsCACert), "", "", "localhost")
	if err != nil {
		t.Fatal(err)
	}
	rogue, err := ClientTLSCreds(filepath.Join(dir, "rogue"), "localhost")
	if err != nil {
		t.Fatal(err)
	}
	for name, o := range map[string]*ClientOptions{
		"no certificate":        {TLSConfig: noCert},
		"another CA's":          {TLSConfig: rogue},
		"no TLS":                nil,
		"no TLS, EXPORT_NAME":   {ExportNameOnly: true},
		"self-signed, no chain": {TLSConfig: &tls.Config{ServerName: "localhost", RootCAs: good.RootCAs, Certificates: []tls.Certificate{selfSigned(t)}}},
	} {
		c, err := dialCtx(ts, o)
		if err == nil {
			_, err = c.ReadAt(got, 0)
			c.Close()
		}
		if err == nil {
			t.Errorf("%s: client admitted", name)
		}
	}
	// The server still serves.
	c, err = dialCtx(ts, &ClientOptions{TLSConfig: good})
	if err != nil {
		t.Fatalf("after refusals: %v", err)
	}
	c.Close()
}
