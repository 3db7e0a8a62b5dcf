package s3

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/s3/s3test"
)

const (
	testAccess = "vdiskaccess"
	testSecret = "vdisksecret1234567890"
	testBucket = "images"
)

// server is a versitygw on loopback with the POSIX backend on a temp dir.
type server struct {
	t         testing.TB
	bin, dir  string
	addr      string
	cmd       *exec.Cmd
	dial      *countingDialer
	keepAlive bool
}

func startServer(t testing.TB) *server {
	t.Helper()
	return startServerKeepAlive(t, false)
}

// startServerKeepAlive starts a server that keeps connections open
// between requests when keepAlive (versitygw closes them by default).
func startServerKeepAlive(t testing.TB, keepAlive bool) *server {
	t.Helper()
	s := &server{t: t, bin: s3test.Bin(t), dir: t.TempDir(), dial: &countingDialer{}, keepAlive: keepAlive}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.addr = l.Addr().String()
	l.Close()
	s.start()
	t.Cleanup(s.stop)
	cl := s.client(testAccess, testSecret)
	if err := cl.MakeBucket(context.Background(), testBucket, minio.MakeBucketOptions{}); err != nil {
		t.Fatalf("make bucket: %v", err)
	}
	return s
}

// start runs the gateway (again, after stop: same port, same data).
func (s *server) start() {
	s.t.Helper()
	if err := s.startErr(); err != nil {
		s.t.Fatal(err)
	}
}

func (s *server) startErr() error {
	args := []string{"--access", testAccess, "--secret", testSecret, "--port", s.addr, "--quiet"}
	if s.keepAlive {
		args = append(args, "--keep-alive")
	}
	cmd := exec.Command(s.bin, append(args, "posix", s.dir)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return err
	}
	s.cmd = cmd
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", s.addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			s.stop()
			return fmt.Errorf("versitygw did not listen on %s: %v\n%s", s.addr, err, out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop kills the gateway's process group.
func (s *server) stop() {
	if s.cmd == nil {
		return
	}
	syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	s.cmd.Wait()
	s.cmd = nil
}

// client is a plain minio client for checking what the server holds.
func (s *server) client(access, secret string) *minio.Client {
	s.t.Helper()
	cl, err := minio.New(s.addr, &minio.Options{Creds: credentials.NewStaticV4(access, secret, ""), BucketLookup: minio.BucketLookupPath, Region: "us-east-1"})
	if err != nil {
		s.t.Fatal(err)
	}
	return cl
}

// opts are the storage options reaching this server.
func (s *server) opts(extra ...string) map[string]string {
	m := map[string]string{
		"endpoint":          "http://" + s.addr,
		"access-key-id":     testAccess,
		"secret-access-key": testSecret,
	}
	for i := 0; i+1 < len(extra); i += 2 {
		m[extra[i]] = extra[i+1]
	}
	return m
}

// env is a SchemeEnv for this server dialling through the counting dialer.
func (s *server) env(extra ...string) *driver.SchemeEnv {
	return &driver.SchemeEnv{Dialer: s.dial.Dial, Options: s.opts(extra...)}
}

// storage opens the test bucket's storage.
func (s *server) storage(extra ...string) *Storage {
	s.t.Helper()
	st, err := New(testBucket, s.env(extra...))
	if err != nil {
		s.t.Fatal(err)
	}
	return st
}

// url is the s3:// name of key in the test bucket.
func s3url(key string) string { return "s3://" + testBucket + "/" + key }

// put stores data as key directly.
func (s *server) put(key string, data []byte) {
	s.t.Helper()
	_, err := s.client(testAccess, testSecret).PutObject(context.Background(), testBucket, key, bytes.NewReader(data), int64(len(data)), minio.PutObjectOptions{})
	if err != nil {
		s.t.Fatal(err)
	}
}

// get downloads key.
func (s *server) get(key string) []byte {
	s.t.Helper()
	o, err := s.client(testAccess, testSecret).GetObject(context.Background(), testBucket, key, minio.GetObjectOptions{})
	if err != nil {
		s.t.Fatal(err)
	}
	defer o.Close()
	var b bytes.Buffer
	if _, err := b.ReadFrom(o); err != nil {
		s.t.Fatalf("get %s: %v", key, err)
	}
	return b.Bytes()
}

// download stores key in a local file and returns its path.
func (s *server) download(key string) string {
	s.t.Helper()
	p := filepath.Join(s.t.TempDir(), filepath.Base(key))
	if err := s.client(testAccess, testSecret).FGetObject(context.Background(), testBucket, key, p, minio.GetObjectOptions{}); err != nil {
		s.t.Fatalf("download %s: %v", key, err)
	}
	return p
}

// uploads lists the multipart uploads in progress.
func (s *server) uploads() []string {
	s.t.Helper()
	core := minio.Core{Client: s.client(testAccess, testSecret)}
	res, err := core.ListMultipartUploads(context.Background(), testBucket, "", "", "", "", 1000)
	if err != nil {
		s.t.Fatalf("list uploads: %v", err)
	}
	var out []string
	for _, u := range res.Uploads {
		out = append(out, u.Key+" "+u.UploadID)
	}
	return out
}

// exists reports whether key is an object.
func (s *server) exists(key string) bool {
	_, err := s.client(testAccess, testSecret).StatObject(context.Background(), testBucket, key, minio.StatObjectOptions{})
	return err == nil
}

// countingDialer counts connections, requests and bytes, and injects
// faults: refuse new connections, or cut the connection of every part
// upload after the first failPartsAfter.
type countingDialer struct {
	conns, gets, puts atomic.Int64
	bytesIn, bytesOut atomic.Int64
	refuse            atomic.Bool
	failPartsAfter    atomic.Int64 // part uploads allowed before every further one fails; 0: never
	partPuts          atomic.Int64
	mu                sync.Mutex
	live              []net.Conn
}

func (d *countingDialer) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	if d.refuse.Load() {
		return nil, fmt.Errorf("dial %s: refused by the test", addr)
	}
	var nd net.Dialer
	c, err := nd.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	d.conns.Add(1)
	cc := &countingConn{Conn: c, d: d}
	d.mu.Lock()
	d.live = append(d.live, cc)
	d.mu.Unlock()
	return cc, nil
}

// reset zeroes the counters.
func (d *countingDialer) reset() {
	d.conns.Store(0)
	d.gets.Store(0)
	d.puts.Store(0)
	d.bytesIn.Store(0)
	d.bytesOut.Store(0)
}

// closeAll closes every connection made so far (a server going away).
func (d *countingDialer) closeAll() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, c := range d.live {
		c.Close()
	}
	d.live = nil
}

type countingConn struct {
	net.Conn
	d      *countingDialer
	sent   atomic.Int64
	closed atomic.Bool
}

func (c *countingConn) Close() error {
	c.closed.Store(true)
	return c.Conn.Close()
}

// open counts the connections made and not closed.
func (d *countingDialer) open() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for _, c := range d.live {
		if !c.(*countingConn).closed.Load() {
			n++
		}
	}
	return n
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.d.bytesIn.Add(int64(n))
	return n, err
}

func (c *countingConn) Write(p []byte) (int, error) {
	// Requests start a write of their own (net/http flushes the header).
	switch {
	case bytes.HasPrefix(p, []byte("GET ")):
		c.d.gets.Add(1)
	case bytes.HasPrefix(p, []byte("PUT ")):
		c.d.puts.Add(1)
	}
	if bytes.HasPrefix(p, []byte("PUT ")) && bytes.Contains(p[:bytes.IndexByte(p, '\n')+1], []byte("uploadId=")) {
		n := c.d.partPuts.Add(1)
		if lim := c.d.failPartsAfter.Load(); lim > 0 && n > lim {
			c.Conn.Close()
			return 0, fmt.Errorf("connection cut by the test (part upload %d)", n)
		}
	}
	n, err := c.Conn.Write(p)
	c.sent.Add(int64(n))
	c.d.bytesOut.Add(int64(n))
	return n, err
}
