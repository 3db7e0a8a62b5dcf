package nbdstore_test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
	_ "github.com/vdisk/vdisk/format/qcow2"
	_ "github.com/vdisk/vdisk/format/raw"
	"github.com/vdisk/vdisk/internal/qemutest"
	_ "github.com/vdisk/vdisk/storage/nbdstore"
)

// freePort returns a loopback port nobody listens on (for a moment).
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// server is an NBD server process started by a test.
type server struct {
	t    testing.TB
	name string
	args []string
	addr string // host:port, or the socket path
	unix bool

	mu  sync.Mutex
	cmd *exec.Cmd
	out *bytes.Buffer
}

// startServer runs name with args (which must make it listen on addr)
// until the test ends, and waits until it accepts connections.
func startServer(t testing.TB, unix bool, addr, name string, args ...string) *server {
	t.Helper()
	qemutest.Require(t, name)
	s := &server{t: t, name: name, args: args, addr: addr, unix: unix}
	s.start()
	t.Cleanup(s.kill)
	return s
}

func (s *server) start() {
	s.t.Helper()
	cmd := exec.Command(s.name, s.args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out := &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	s.mu.Lock()
	s.cmd, s.out = cmd, out
	s.mu.Unlock()
	network := "tcp"
	if s.unix {
		network = "unix"
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout(network, s.addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			s.kill()
			s.t.Fatalf("%s %v did not start listening on %s: %v\n%s", s.name, s.args, s.addr, err, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// kill ends the server's process group and waits for it.
func (s *server) kill() {
	s.mu.Lock()
	cmd := s.cmd
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	cmd.Wait()
}

// qemuNBD serves file (of format) on a fresh loopback port as export
// "x"; extra arguments go before the file.
func qemuNBD(t testing.TB, format, file string, extra ...string) (*server, string) {
	t.Helper()
	port := freePort(t)
	args := append([]string{"-f", format, "-x", "x", "-b", "127.0.0.1", "-p", strconv.Itoa(port), "-t", "--shared=16", "--cache=writeback"}, extra...)
	s := startServer(t, false, fmt.Sprintf("127.0.0.1:%d", port), "qemu-nbd", append(args, file)...)
	return s, fmt.Sprintf("nbd://127.0.0.1:%d/x", port)
}

// nbdkit serves a plugin on a fresh loopback port.
func nbdkit(t testing.TB, plugin ...string) (*server, string) {
	t.Helper()
	port := freePort(t)
	args := append([]string{"-f", "-i", "127.0.0.1", "-p", strconv.Itoa(port)}, plugin...)
	s := startServer(t, false, fmt.Sprintf("127.0.0.1:%d", port), "nbdkit", args...)
	return s, fmt.Sprintf("nbd://127.0.0.1:%d/", port)
}

// pattern is deterministic test content.
func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7+i/511) ^ seed
	}
	return b
}

// sparseQcow2 builds a qcow2 of size bytes with qemu-io writes at the
// given offsets (patterns 0x11, 0x22, ...) and returns its path and the
// content it should read as.
func sparseQcow2(t testing.TB, dir string, size int64, writes [][2]int64) (string, []byte) {
	t.Helper()
	p := filepath.Join(dir, "base.qcow2")
	qemutest.Create(t, "qcow2", p, strconv.FormatInt(size, 10))
	want := make([]byte, size)
	var cmds []string
	for i, w := range writes {
		pat := byte(0x11 * (i + 1))
		cmds = append(cmds, fmt.Sprintf("write -P %d %d %d", pat, w[0], w[1]))
		for j := w[0]; j < w[0]+w[1]; j++ {
			want[j] = pat
		}
	}
	if len(cmds) > 0 {
		qemutest.IO(t, "qcow2", p, cmds...)
	}
	return p, want
}

func openRaw(t testing.TB, url string, ro bool, o *vdisk.OpenOptions) *vdisk.Disk {
	t.Helper()
	if o == nil {
		o = &vdisk.OpenOptions{}
	}
	o.Format, o.ReadOnly = "raw", ro
	d, err := vdisk.Open(context.Background(), url, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func readAll(t testing.TB, d *vdisk.Disk) []byte {
	t.Helper()
	b := make([]byte, d.Size())
	if _, err := d.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}

// countingConn counts the bytes read from a connection.
type countingConn struct {
	net.Conn
	n *atomic.Int64
}

func (c countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// countingDialer counts the bytes read on all its connections.
func countingDialer(n *atomic.Int64, conns *atomic.Int64) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		conns.Add(1)
		return countingConn{c, n}, nil
	}
}

// cutConn closes itself once budget bytes have crossed it (both ways).
type cutConn struct {
	net.Conn
	budget *atomic.Int64
}

func (c *cutConn) take(n int) (int, bool) {
	left := c.budget.Add(-int64(n))
	if left >= 0 {
		return n, true
	}
	return int(max(int64(n)+left, 0)), false
}

func (c *cutConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		if k, ok := c.take(n); !ok {
			c.Conn.Close()
			return k, net.ErrClosed
		}
	}
	return n, err
}

func (c *cutConn) Write(p []byte) (int, error) {
	k, ok := c.take(len(p))
	if !ok {
		n, _ := c.Conn.Write(p[:k])
		c.Conn.Close()
		return n, net.ErrClosed
	}
	return c.Conn.Write(p)
}

func writeFile(name string, b []byte) error { return os.WriteFile(name, b, 0o644) }
