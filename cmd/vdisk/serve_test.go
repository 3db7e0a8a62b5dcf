package main

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
	"log/slog"
	"math/big"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
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
