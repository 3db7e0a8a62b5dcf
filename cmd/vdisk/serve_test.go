package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vdisk/vdisk/nbd"
)

// runServe runs `vdisk serve args...` in-process until it returns. The
// serve command is added to the tree when root.go does not register it.
func runServe(ctx context.Context, args ...string) result {
	var out, errb bytes.Buffer
	a := &app{ctx: ctx, stdin: strings.NewReader(""), stdout: &out, stderr: &errb, hooks: &hooks{}, name: "vdisk"}
	a.log = slog.New(newLineHandler(&errb, a.name, slog.LevelWarn))
	root := a.newRootCmd()
	found := false
	for _, c := range root.Commands() {
		found = found || c.Name() == "serve"
	}
	if !found {
		root.AddCommand(a.newServeCmd())
	}
	root.SetArgs(append([]string{"serve"}, args...))
	cmd, err := root.ExecuteC()
	code := 0
	if err != nil {
		code = a.fail(root, cmd, err)
	}
	return result{out.String(), errb.String(), code}
}

// serving is a `vdisk serve` running in the background.
type serving struct {
	cancel context.CancelFunc
	done   chan result
}

// startServe runs serve in the background and waits until ready() is true.
func startServe(t *testing.T, ready func() bool, args ...string) *serving {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	s := &serving{cancel: cancel, done: make(chan result, 1)}
	go func() { s.done <- runServe(ctx, args...) }()
	deadline := time.Now().Add(10 * time.Second)
	for !ready() {
		select {
		case r := <-s.done:
			t.Fatalf("vdisk serve %s ended early: exit %d\n%s", strings.Join(args, " "), r.code, r.stderr)
		default:
		}
		if time.Now().After(deadline) {
			cancel()
			t.Fatalf("vdisk serve %s did not start", strings.Join(args, " "))
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Cleanup(func() { s.stop(t) })
	return s
}

// stop cancels the server (as SIGINT does) and returns its result.
func (s *serving) stop(t *testing.T) result {
	t.Helper()
	s.cancel()
	select {
	case r := <-s.done:
		s.done <- r
		return r
	case <-time.After(20 * time.Second):
		t.Fatal("vdisk serve did not stop")
	}
	return result{}
}

// wait waits for the server to end by itself.
func (s *serving) wait(t *testing.T) result {
	t.Helper()
	select {
	case r := <-s.done:
		s.done <- r
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("vdisk serve did not exit by itself")
	}
	return result{}
}

func sockPath(t *testing.T) string {
	d, err := os.MkdirTemp("", "vds")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return filepath.Join(d, "nbd.sock")
}

func sockReady(sock string) func() bool {
	return func() bool {
		c, err := net.Dial("unix", sock)
		if err != nil {
			return false
		}
		c.Close()
		return true
	}
}

func nbdURI(sock, export string) string { return "nbd+unix:///" + export + "?socket=" + sock }

func runTool(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Fatalf("%s is required by these tests (./test.sh installs it)", name)
	}
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}

func mustTool(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := runTool(t, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func TestServeExports(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "a.raw")
	sparseRaw(t, img, 8<<20, map[int64][]byte{1 << 20: pattern(0xaa, 64<<10)})
	img2 := filepath.Join(dir, "b.raw")
	sparseRaw(t, img2, 1<<20, map[int64][]byte{0: pattern(0x11, 4096)})
	sock := sockPath(t)
	pid := filepath.Join(dir, "pid")
	s := startServe(t, sockReady(sock), "-k", sock, "-f", "raw", "-t", "-e", "0", "-D", "first", "--pid-file", pid,
		"--export", "second="+img2, "--export", "alias="+img, img)
	if b, err := os.ReadFile(pid); err != nil || strings.TrimSpace(string(b)) != strconv.Itoa(os.Getpid()) {
		t.Errorf("pid file: %q %v", b, err)
	}
	out := mustTool(t, "nbdinfo", "--list", nbdURI(sock, ""))
	for _, want := range []string{"export=\"\"", "description: first", "export=\"second\"", "export=\"alias\""} {
		if !strings.Contains(out, want) {
			t.Errorf("nbdinfo --list lacks %q:\n%s", want, out)
		}
	}
	if out := mustTool(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", img, nbdURI(sock, "")); !strings.Contains(out, "identical") {
		t.Errorf("compare default export: %s", out)
	}
	if out := mustTool(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", img2, nbdURI(sock, "second")); !strings.Contains(out, "identical") {
		t.Errorf("compare second export: %s", out)
	}
	// Two names for one image share its Disk: a write through one shows
	// through the other at once.
	mustTool(t, "qemu-io", "-f", "raw", nbdURI(sock, "alias"), "-c", "write -P 0x42 4M 64k")
	mustTool(t, "qemu-io", "-f", "raw", nbdURI(sock, ""), "-c", "read -P 0x42 4M 64k")
	if r := s.stop(t); r.code != 0 {
		t.Fatalf("serve: exit %d: %s", r.code, r.stderr)
	}
	if exists(pid) || exists(sock) {
		t.Error("pid file or socket left behind")
	}
	b, err := os.ReadFile(img)
	if err != nil || !bytes.Equal(b[4<<20:4<<20+64<<10], pattern(0x42, 64<<10)) {
		t.Error("the write did not reach the image")
	}
}

func TestServeReadOnlyAndOneShot(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "a.raw")
	sparseRaw(t, img, 1<<20, map[int64][]byte{0: pattern(7, 4096)})
	sock := sockPath(t)
	// Without -t the server exits once its client is gone.
	s := startServe(t, func() bool { return exists(sock) }, "-k", sock, "-r", "-f", "raw", img)
	out := mustTool(t, "nbdinfo", "--json", nbdURI(sock, ""))
	if !strings.Contains(out, `"is_read_only": true`) || !strings.Contains(out, `"can_multi_conn": false`) {
		t.Errorf("nbdinfo on -r -e 1:\n%s", out)
	}
	if r := s.wait(t); r.code != 0 {
		t.Fatalf("one-shot serve: exit %d: %s", r.code, r.stderr)
	}
	s = startServe(t, func() bool { return exists(sock) }, "-k", sock, "-r", "-t", img)
	if out, err := runTool(t, "qemu-io", "-f", "raw", nbdURI(sock, ""), "-c", "write 0 4k"); err == nil && !strings.Contains(out, "failed") {
		t.Errorf("write on a read-only export succeeded:\n%s", out)
	}
	mustTool(t, "qemu-io", "-f", "raw", "-r", nbdURI(sock, ""), "-c", "read -P 7 0 4k")
	if r := s.stop(t); r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
}

func TestServeSnapshot(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "a.raw")
	sparseRaw(t, img, 2<<20, map[int64][]byte{0: pattern(1, 64<<10)})
	orig, _ := os.ReadFile(img)
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)

	t.Run("unsupported", func(t *testing.T) {
		saved := snapshotFormats
		snapshotFormats = []string{"no-such-format"}
		defer func() { snapshotFormats = saved }()
		r := runServe(context.Background(), "-s", "-k", sockPath(t), "-f", "raw", img)
		oneErrorLine(t, r, "vdisk serve")
		if !strings.Contains(r.stderr, "--snapshot needs a differencing image format") {
			t.Errorf("stderr: %s", r.stderr)
		}
	})
	for _, f := range []string{"vdtest", ""} {
		name := f
		if f == "" {
			name = "default" // qcow2 or vdi, whichever is registered first
		}
		t.Run(name, func(t *testing.T) {
			saved := snapshotFormats
			if f != "" {
				// vdtest (registered by these tests) stands in.
				snapshotFormats = append([]string{f}, saved...)
			}
			defer func() { snapshotFormats = saved }()
			sock := sockPath(t)
			s := startServe(t, sockReady(sock), "-s", "-t", "-k", sock, img)
			mustTool(t, "qemu-io", "-f", "raw", nbdURI(sock, ""), "-c", "write -P 0x33 32k 64k", "-c", "write -z 1M 4k")
			mustTool(t, "qemu-io", "-f", "raw", nbdURI(sock, ""), "-c", "read -P 1 0 32k", "-c", "read -P 0x33 32k 64k")
			// The overlay holds the writes (depth 1), the image the rest.
			out := mustTool(t, "nbdinfo", "--map=qemu:allocation-depth", nbdURI(sock, ""))
			if !strings.Contains(out, " 1  local") || !strings.Contains(out, " 2  backing depth 2") {
				t.Errorf("allocation depth of the overlay:\n%s", out)
			}
			if r := s.stop(t); r.code != 0 {
				t.Fatalf("exit %d: %s", r.code, r.stderr)
			}
			if now, _ := os.ReadFile(img); !bytes.Equal(now, orig) {
				t.Error("--snapshot modified the image")
			}
			ents, _ := os.ReadDir(tmp)
			for _, e := range ents {
				if strings.HasPrefix(e.Name(), "vdisk-serve-") {
					t.Errorf("overlay left behind in TMPDIR: %s", e.Name())
				}
			}
		})
	}
}

func TestServeTCPAndAllowFrom(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "a.raw")
	sparseRaw(t, img, 1<<20, nil)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
	l.Close()
	tcpReady := func() bool {
		c, err := net.Dial("tcp", "127.0.0.1:"+port)
		if err == nil {
			c.Close()
		}
		return err == nil
	}
	s := startServe(t, tcpReady, "-p", port, "-t", "-e", "0", "--allow-from", "127.0.0.0/8", img)
	if out := mustTool(t, "nbdinfo", "--size", "nbd://127.0.0.1:"+port); strings.TrimSpace(out) != "1048576" {
		t.Errorf("nbdinfo --size over TCP: %s", out)
	}
	s.stop(t)
	s = startServe(t, tcpReady, "-p", port, "-t", "--allow-from", "10.1.2.3,192.168.0.0/16", img)
	if out, err := runTool(t, "nbdinfo", "--size", "nbd://127.0.0.1:"+port); err == nil {
		t.Errorf("a client outside --allow-from was served: %s", out)
	}
	if r := s.stop(t); r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
}

func writeCert(t *testing.T, dir string) (certFile, keyFile string) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "localhost"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, DNSNames: []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600)
	return certFile, keyFile
}

func TestServeTLS(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "a.raw")
	sparseRaw(t, img, 1<<20, map[int64][]byte{0: []byte("secret")})
	cert, key := writeCert(t, dir)
	sock := sockPath(t)
	startServe(t, sockReady(sock), "-k", sock, "-t", "-e", "0", "--tls-cert", cert, "--tls-key", key, "--tls-required", img)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := nbd.Dial(ctx, "unix", sock, &nbd.ClientOptions{TLSConfig: &tls.Config{InsecureSkipVerify: true}})
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 6)
	if _, err := c.ReadAt(b, 0); err != nil || string(b) != "secret" {
		t.Errorf("read over TLS: %q %v", b, err)
	}
	c.Close()
	// libnbd (GnuTLS) interoperates too.
	if out := mustTool(t, "nbdinfo", "--size", "nbds+unix:///?socket="+sock+"&tls-verify-peer=false"); strings.TrimSpace(out) != "1048576" {
		t.Errorf("nbdinfo over TLS: %s", out)
	}
	if out, err := runTool(t, "nbdinfo", nbdURI(sock, "")); err == nil {
		t.Errorf("a plain client was served with --tls-required:\n%s", out)
	}
}

func TestServeUsageErrors(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "a.raw")
	sparseRaw(t, img, 1<<20, nil)
	for _, args := range [][]string{
		{},
		{"--export", "noequals"},
		{"--export", "x=" + img, "--export", "x=" + img},
		{"--tls-required", img},
		{"--tls-cert", "c.pem", img},
		{"-e", "-1", img},
		{"--allow-from", "not-an-ip", img},
		{img, img},
		{"-k", filepath.Join(dir, "s"), filepath.Join(dir, "missing.raw")},
	} {
		r := runServe(context.Background(), args...)
		if r.code != 1 || !strings.HasPrefix(r.stderr, "vdisk serve: ") {
			t.Errorf("serve %v: exit %d, stderr %q", args, r.code, r.stderr)
		}
	}
}

// TestServeSignal runs vdisk serve as a child process (this test binary in
// helper mode) and stops it with SIGTERM: it exits 0 with every write
// flushed to the image.
func TestServeSignal(t *testing.T) {
	if os.Getenv("VDISK_SERVE_HELPER") == "1" {
		// As Main does: a context cancelled by SIGINT/SIGTERM.
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		r := runServe(ctx, strings.Split(os.Getenv("VDISK_SERVE_ARGS"), "\x1f")...)
		stop()
		os.Stderr.WriteString(r.stderr)
		os.Exit(r.code)
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "a.raw")
	sparseRaw(t, img, 1<<20, nil)
	sock := sockPath(t)
	cmd := exec.Command(os.Args[0], "-test.run=^TestServeSignal$")
	cmd.Env = append(os.Environ(), "VDISK_SERVE_HELPER=1",
		"VDISK_SERVE_ARGS="+strings.Join([]string{"-t", "-k", sock, "-f", "raw", img}, "\x1f"))
	var errb bytes.Buffer
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	deadline := time.Now().Add(20 * time.Second)
	for !sockReady(sock)() {
		if time.Now().After(deadline) {
			t.Fatalf("helper did not start: %s", errb.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	mustTool(t, "qemu-io", "-f", "raw", nbdURI(sock, ""), "-c", "write -P 0x5e 0 64k")
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	err := cmd.Wait()
	var ee *exec.ExitError
	if errors.As(err, &ee) || err != nil {
		t.Fatalf("serve after SIGTERM: %v\n%s", err, errb.String())
	}
	b, _ := os.ReadFile(img)
	if !bytes.Equal(b[:64<<10], pattern(0x5e, 64<<10)) {
		t.Error("write lost")
	}
	if exists(sock) {
		t.Error("socket left behind")
	}
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
}

func tcpReady(port string) func() bool {
	return func() bool {
		c, err := net.Dial("tcp", "127.0.0.1:"+port)
		if err == nil {
			c.Close()
		}
		return err == nil
	}
}

// boundedTool runs a tool with a 60 s bound (against hangs; no timing is
// asserted).
func boundedTool(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Fatalf("%s is required by these tests (./test.sh installs it)", name)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out), err
}

// nbdHandshake runs a minimal fixed-newstyle negotiation on nc (NBD_OPT_GO
// of the default export, simple replies) and returns the export size.
func nbdHandshake(nc net.Conn) (int64, error) {
	r := bufio.NewReader(nc)
	greet := make([]byte, 18)
	if _, err := io.ReadFull(r, greet); err != nil {
		return 0, err
	}
	if string(greet[:8]) != "NBDMAGIC" {
		return 0, fmt.Errorf("bad greeting % x", greet)
	}
	var msg []byte
	msg = binary.BigEndian.AppendUint32(msg, 3) // fixed newstyle, no zeroes
	msg = binary.BigEndian.AppendUint64(msg, 0x49484156454f5054)
	msg = binary.BigEndian.AppendUint32(msg, 7) // NBD_OPT_GO
	msg = binary.BigEndian.AppendUint32(msg, 6)
	msg = append(msg, 0, 0, 0, 0, 0, 0) // name "", no info requests
	if _, err := nc.Write(msg); err != nil {
		return 0, err
	}
	var size int64
	for {
		h := make([]byte, 20)
		if _, err := io.ReadFull(r, h); err != nil {
			return 0, err
		}
		typ := binary.BigEndian.Uint32(h[12:])
		data := make([]byte, binary.BigEndian.Uint32(h[16:]))
		if _, err := io.ReadFull(r, data); err != nil {
			return 0, err
		}
		switch {
		case typ == 1: // ACK
			if r.Buffered() != 0 {
				return 0, errors.New("data after the NBD_OPT_GO reply")
			}
			return size, nil
		case typ == 3 && len(data) == 12 && binary.BigEndian.Uint16(data) == 0:
			size = int64(binary.BigEndian.Uint64(data[2:]))
		case typ&(1<<31) != 0:
			return 0, fmt.Errorf("NBD_OPT_GO refused: %#x %s", typ, data)
		}
	}
}

func nbdRequest(typ uint16, cookie, off uint64, length uint32) []byte {
	b := binary.BigEndian.AppendUint32(nil, 0x25609513)
	b = binary.BigEndian.AppendUint16(b, 0)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	return binary.BigEndian.AppendUint32(b, length)
}

// expectEOF checks that the server closes nc (what it sent before is
// skipped).
func expectEOF(t *testing.T, nc net.Conn, what string) {
	t.Helper()
	nc.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.Copy(io.Discard, nc); err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("%s: not disconnected by the server: %v", what, err)
	}
}

// TestServeIdleTimeout: with -e 1, a client that completes the handshake
// and then sleeps, and one that queues reads and does not read the
// replies, are each disconnected after --idle-timeout, and nbdinfo and
// qemu-img waiting behind them are served.
func TestServeIdleTimeout(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "a.raw")
	if err := os.WriteFile(img, pattern(0x61, 32<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	startServe(t, tcpReady(port), "-p", port, "-t", "-e", "1", "--idle-timeout", "1s", "-f", "raw", img)
	uri := "nbd://127.0.0.1:" + port

	t.Run("idle", func(t *testing.T) {
		nc, err := net.Dial("tcp", "127.0.0.1:"+port)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		nc.SetDeadline(time.Now().Add(30 * time.Second))
		if size, err := nbdHandshake(nc); err != nil || size != 32<<20 {
			t.Fatalf("handshake: size %d, %v", size, err)
		}
		out, err := boundedTool(t, "nbdinfo", "--size", uri)
		if err != nil || strings.TrimSpace(out) != strconv.Itoa(32<<20) {
			t.Fatalf("nbdinfo behind an idle client: %v\n%s", err, out)
		}
		expectEOF(t, nc, "idle client")
	})
	t.Run("not-reading", func(t *testing.T) {
		nc, err := net.Dial("tcp", "127.0.0.1:"+port)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		nc.SetDeadline(time.Now().Add(30 * time.Second))
		if _, err := nbdHandshake(nc); err != nil {
			t.Fatal(err)
		}
		// Far more than the socket buffers hold: the server's writes
		// block until the write deadline.
		for i := 0; i < 8; i++ {
			if _, err := nc.Write(nbdRequest(0, uint64(i), 0, 32<<20)); err != nil {
				t.Fatal(err)
			}
		}
		out, err := boundedTool(t, "qemu-img", "info", "--output=json", "-f", "raw", uri)
		if err != nil || !strings.Contains(out, `"virtual-size": 33554432`) {
			t.Fatalf("qemu-img behind a client not reading its replies: %v\n%s", err, out)
		}
		expectEOF(t, nc, "client not reading")
	})
}

// TestServeTLSClientCertificates: with qemu's credentials directory
// (--tls-creds) or --tls-ca, clients need a certificate signed by the CA:
// nbdinfo and qemu-img with one are admitted, without one (or without TLS)
// refused.
func TestServeTLSClientCertificates(t *testing.T) {
	creds := t.TempDir()
	writeCreds(t, creds)
	noCert := t.TempDir() // the CA only: the server is trusted, the client has nothing to show
	copyFile(t, filepath.Join(creds, nbd.CredsCACert), filepath.Join(noCert, nbd.CredsCACert))
	dir := t.TempDir()
	img := filepath.Join(dir, "a.raw")
	sparseRaw(t, img, 1<<20, map[int64][]byte{0: []byte("secret")})

	for _, mode := range []string{"creds", "ca"} {
		t.Run(mode, func(t *testing.T) {
			port := freePort(t)
			args := []string{"-p", port, "-t", "-e", "0", "-f", "raw"}
			if mode == "creds" {
				args = append(args, "--tls-creds", creds)
			} else {
				args = append(args, "--tls-cert", filepath.Join(creds, nbd.CredsServerCert),
					"--tls-key", filepath.Join(creds, nbd.CredsServerKey), "--tls-ca", filepath.Join(creds, nbd.CredsCACert))
			}
			s := startServe(t, tcpReady(port), append(args, img)...)
			tlsURI := func(d string) string { return "nbds://127.0.0.1:" + port + "/?tls-certificates=" + d }
			if out, err := boundedTool(t, "nbdinfo", "--size", tlsURI(creds)); err != nil || strings.TrimSpace(out) != "1048576" {
				t.Errorf("nbdinfo with a client certificate: %v\n%s", err, out)
			}
			qemu := func(d string) (string, error) {
				return boundedTool(t, "qemu-img", "info", "--output=json",
					"--object", "tls-creds-x509,id=tls0,endpoint=client,dir="+d,
					"--image-opts", "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port="+port+",tls-creds=tls0")
			}
			if out, err := qemu(creds); err != nil || !strings.Contains(out, `"virtual-size": 1048576`) {
				t.Errorf("qemu-img with a client certificate: %v\n%s", err, out)
			}
			if out, err := boundedTool(t, "nbdinfo", "--size", tlsURI(noCert)); err == nil {
				t.Errorf("nbdinfo without a client certificate was admitted:\n%s", out)
			}
			if out, err := qemu(noCert); err == nil {
				t.Errorf("qemu-img without a client certificate was admitted:\n%s", out)
			}
			if out, err := boundedTool(t, "nbdinfo", "--size", "nbd://127.0.0.1:"+port); err == nil {
				t.Errorf("a client without TLS was admitted (client authentication implies --tls-required):\n%s", out)
			}
			// The package's client with the same credentials.
			cfg, err := nbd.ClientTLSCreds(creds, "127.0.0.1")
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			c, err := nbd.Dial(ctx, "tcp", "127.0.0.1:"+port, &nbd.ClientOptions{TLSConfig: cfg})
			if err != nil {
				t.Fatalf("nbd client with a certificate: %v", err)
			}
			b := make([]byte, 6)
			if _, err := c.ReadAt(b, 0); err != nil || string(b) != "secret" {
				t.Errorf("read over TLS: %q %v", b, err)
			}
			c.Close()
			if r := s.stop(t); r.code != 0 {
				t.Errorf("exit %d: %s", r.code, r.stderr)
			}
		})
	}
}

// writeCreds writes a CA and a server and a client certificate signed by
// it in qemu's credentials directory layout.
func writeCreds(t *testing.T, dir string) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "vdisk test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		BasicConstraintsValid: true, IsCA: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	writePEMFile(t, filepath.Join(dir, nbd.CredsCACert), "CERTIFICATE", caDER)
	leaf := func(serial int64, cn string, usage x509.ExtKeyUsage, certFile, keyFile string) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			BasicConstraintsValid: true, KeyUsage: x509.KeyUsageDigitalSignature,
			ExtKeyUsage: []x509.ExtKeyUsage{usage},
		}
		if usage == x509.ExtKeyUsageServerAuth {
			tmpl.DNSNames = []string{"localhost"}
			tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kder, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		writePEMFile(t, filepath.Join(dir, certFile), "CERTIFICATE", der)
		writePEMFile(t, filepath.Join(dir, keyFile), "PRIVATE KEY", kder)
	}
	leaf(2, "localhost", x509.ExtKeyUsageServerAuth, nbd.CredsServerCert, nbd.CredsServerKey)
	leaf(3, "client", x509.ExtKeyUsageClientAuth, nbd.CredsClientCert, nbd.CredsClientKey)
}

func writePEMFile(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestServeLimitUsageErrors(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "a.raw")
	sparseRaw(t, img, 1<<20, nil)
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"-k", filepath.Join(dir, "s"), "--allow-from", "127.0.0.1", img}, "does not go with -k"},
		{[]string{"--max-connections", "0", img}, "--max-connections"},
		{[]string{"--memory-budget", "1M", img}, "--memory-budget"},
		{[]string{"--memory-budget", "lots", img}, "--memory-budget"},
		{[]string{"--idle-timeout", "-1s", img}, "--idle-timeout"},
		{[]string{"--tls-ca", "ca.pem", img}, "--tls-ca needs"},
		{[]string{"--tls-creds", dir, "--tls-cert", "c", "--tls-key", "k", img}, "--tls-creds"},
		{[]string{"--tls-creds", filepath.Join(dir, "none"), "-k", filepath.Join(dir, "s"), img}, "server-cert.pem"},
	} {
		r := runServe(context.Background(), c.args...)
		if r.code != 1 || !strings.HasPrefix(r.stderr, "vdisk serve: ") || !strings.Contains(r.stderr, c.want) {
			t.Errorf("serve %v: exit %d, stderr %q (want %q)", c.args, r.code, r.stderr, c.want)
		}
	}
}

// procStatus returns a field of /proc/PID/status in bytes.
func procStatus(t *testing.T, pid int, field string) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				t.Fatalf("%s: %q", field, line)
			}
			return kb << 10
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// TestServeManyConnections builds vdisk (without the race detector,
// whatever this test runs with: its RSS is measured) and runs `vdisk serve
// -e 0` with its default limits as a child, then opens 1,000 connections
// at once, each queueing four 1 MiB reads and reading the replies only
// later (which pins the reply buffers): 1 GiB of buffers if the 256
// connections served at once could all have theirs. Every client is served
// or refused cleanly (a full listen backlog), every reply carries the
// image's data, and the child's peak RSS (VmHWM) rises by no more than the
// default memory budget.
func TestServeManyConnections(t *testing.T) {
	const (
		clients = 1000
		reads   = 4
		readLen = 1 << 20
		budget  = 256 << 20 // the default
	)
	dir := t.TempDir()
	bin := buildVdisk(t, dir)
	img := filepath.Join(dir, "a.raw")
	if err := os.WriteFile(img, pattern(0x77, 8<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := sockPath(t)
	cmd := exec.Command(bin, "serve", "-t", "-e", "0", "-k", sock, "-f", "raw", img)
	var errb bytes.Buffer
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	deadline := time.Now().Add(20 * time.Second)
	for !exists(sock) {
		if time.Now().After(deadline) {
			t.Fatalf("vdisk serve did not start: %s", errb.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	pid := cmd.Process.Pid
	base := procStatus(t, pid, "VmRSS")

	var served, refused atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	start := make(chan struct{})
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			<-start
			nc, err := net.DialTimeout("unix", sock, 60*time.Second)
			if err != nil {
				refused.Add(1) // backlog full: refused by the kernel
				return
			}
			defer nc.Close()
			nc.SetDeadline(time.Now().Add(120 * time.Second))
			if _, err := nbdHandshake(nc); err != nil {
				if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
					refused.Add(1)
					return
				}
				errs <- fmt.Errorf("client %d: handshake: %w", i, err)
				return
			}
			for k := 0; k < reads; k++ {
				if _, err := nc.Write(nbdRequest(0, uint64(k), uint64(k)*readLen, readLen)); err != nil {
					errs <- fmt.Errorf("client %d: %w", i, err)
					return
				}
			}
			time.Sleep(100 * time.Millisecond)
			h := make([]byte, 16)
			for k := 0; k < reads; k++ {
				if _, err := io.ReadFull(nc, h); err != nil {
					errs <- fmt.Errorf("client %d: reply: %w", i, err)
					return
				}
				if binary.BigEndian.Uint32(h) != 0x67446698 || binary.BigEndian.Uint32(h[4:]) != 0 {
					errs <- fmt.Errorf("client %d: reply % x", i, h)
					return
				}
				if _, err := io.ReadFull(nc, h[:1]); err != nil || h[0] != 0x77 {
					errs <- fmt.Errorf("client %d: data %x %v", i, h[0], err)
					return
				}
				if _, err := io.CopyN(io.Discard, nc, readLen-1); err != nil {
					errs <- fmt.Errorf("client %d: data: %w", i, err)
					return
				}
			}
			nc.Write(nbdRequest(2, 99, 0, 0)) // NBD_CMD_DISC
			served.Add(1)
		}(i)
	}
	close(start)
	wg.Wait()
	close(errs)
	n := 0
	for err := range errs {
		if n++; n <= 10 {
			t.Error(err)
		}
	}
	hwm := procStatus(t, pid, "VmHWM")
	t.Logf("%d served, %d refused; child RSS %d MiB before, peak %d MiB (rise %d MiB, budget %d MiB)",
		served.Load(), refused.Load(), base>>20, hwm>>20, (hwm-base)>>20, budget>>20)
	if served.Load()+refused.Load() != clients {
		t.Errorf("%d clients neither served nor refused cleanly", clients-served.Load()-refused.Load())
	}
	if served.Load() < clients/2 {
		t.Errorf("only %d of %d clients served", served.Load(), clients)
	}
	if hwm-base > budget {
		t.Errorf("the server's RSS rose by %d MiB, past its %d MiB budget", (hwm-base)>>20, budget>>20)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("serve after SIGTERM: %v\n%s", err, errb.String())
	}
}

// buildVdisk builds the vdisk command into dir, for tests that run it as
// a process of its own.
func buildVdisk(t *testing.T, dir string) string {
	t.Helper()
	bin := filepath.Join(dir, "vdisk")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Env = append(os.Environ(), "GOFLAGS=")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}
