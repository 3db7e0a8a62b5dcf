package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	osexec "os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// liveSize is the virtual size of the test chains: large enough that a
// live job lasts a good number of client writes.
const liveSize = 256 << 20

// liveChain makes, with qemu-img and qemu-io, base.qcow2 (256 MiB, 0x11
// over [0, 96M)) under overlay.qcow2 (0x22 over [64M, 192M)), and ref.raw,
// a raw copy of what the chain reads.
func liveChain(t *testing.T) (dir, base, overlay, ref string) {
	t.Helper()
	dir = t.TempDir()
	base = filepath.Join(dir, "base.qcow2")
	overlay = filepath.Join(dir, "overlay.qcow2")
	ref = filepath.Join(dir, "ref.raw")
	mustQemu(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "256M")
	mustQemu(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 96M", base)
	mustQemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", overlay)
	mustQemu(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x22 64M 128M", overlay)
	mustQemu(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", overlay, ref)
	return dir, base, overlay, ref
}

// serveControl starts `vdisk serve --control` on overlay and returns the
// control and NBD sockets.
func serveControl(t *testing.T, overlay string, extra ...string) (s *serving, ctl, nbdSock string) {
	t.Helper()
	nbdSock = sockPath(t)
	ctl = filepath.Join(filepath.Dir(nbdSock), "ctl.sock")
	args := append([]string{"--control", ctl, "-k", nbdSock, "-t", "-e", "0", "-f", "qcow2"}, extra...)
	s = startServe(t, func() bool { return sockReady(nbdSock)() && exists(ctl) }, append(args, overlay)...)
	return s, ctl, nbdSock
}

// clientWriter writes, through NBD with qemu-io, rounds of 64 KiB writes
// at random places, each round with its own pattern, and the same writes
// to the raw reference file (once stopped).
type clientWriter struct {
	t   *testing.T
	uri string
	ref string
	// started is closed after the first round.
	started chan struct{}
	stopped atomic.Bool
	rounds  atomic.Int64 // rounds written through NBD
	wg      sync.WaitGroup
	err     error
	done    [][]string // the qemu-io commands of each round written
}

func startWriter(t *testing.T, nbdSock, ref string) *clientWriter {
	w := &clientWriter{t: t, uri: nbdURI(nbdSock, ""), ref: ref, started: make(chan struct{})}
	w.wg.Add(1)
	go w.run()
	<-w.started
	return w
}

func (w *clientWriter) run() {
	defer w.wg.Done()
	defer func() {
		select {
		case <-w.started:
		default:
			close(w.started)
		}
	}()
	rng := rand.New(rand.NewPCG(7, 11))
	for round := 0; !w.stopped.Load(); round++ {
		var cmds []string
		for i := 0; i < 16; i++ {
			off := rng.IntN(liveSize/4096-16) * 4096
			cmds = append(cmds, "-c", fmt.Sprintf("write -P 0x%x %d 64k", 0x40+round%128, off))
		}
		if out, err := toolOutput("qemu-io", append([]string{"-f", "raw", w.uri}, cmds...)...); err != nil {
			w.err = fmt.Errorf("qemu-io on NBD, round %d: %v\n%s", round, err, out)
			return
		}
		w.rounds.Add(1)
		w.done = append(w.done, cmds)
		if round == 0 {
			close(w.started)
		}
	}
}

// stop ends the writes and makes the same writes to the reference.
func (w *clientWriter) stop() {
	w.t.Helper()
	w.stopped.Store(true)
	w.wg.Wait()
	if w.err != nil {
		w.t.Fatal(w.err)
	}
	for _, cmds := range w.done {
		mustQemu(w.t, "qemu-io", append([]string{"-f", "raw", w.ref}, cmds...)...)
	}
}

// during runs fn while w writes and checks that w completed writes
// meanwhile (so that the job really ran under client writes).
func (w *clientWriter) during(what string, fn func()) {
	w.t.Helper()
	before := w.rounds.Load()
	start := time.Now()
	fn()
	el := time.Since(start)
	n := w.rounds.Load() - before
	w.t.Logf("%s took %v; the client wrote %d rounds of 16 writes meanwhile", what, el.Round(time.Millisecond), n)
	if n < 1 {
		w.t.Errorf("%s ended before the client wrote anything: the test proves nothing", what)
	}
}

// toolOutput runs a tool and returns its combined output (for
// goroutines other than the test's, which cannot fail the test).
func toolOutput(name string, args ...string) (string, error) {
	out, err := osexec.Command(name, args...).CombinedOutput()
	return string(out), err
}

func identical(t *testing.T, what, fmtA, a, fmtB, b string) {
	t.Helper()
	out, code := runQemu(t, "qemu-img", "compare", "-f", fmtA, "-F", fmtB, a, b)
	if code != 0 {
		t.Errorf("%s: qemu-img compare %s %s: exit %d\n%s", what, a, b, code, out)
	}
}

func checkClean(t *testing.T, images ...string) {
	t.Helper()
	for _, img := range images {
		if out, code := runQemu(t, "qemu-img", "check", "-f", "qcow2", img); code != 0 {
			t.Errorf("qemu-img check %s: exit %d\n%s", img, code, out)
		}
	}
}

func TestControlServeCommit(t *testing.T) {
	_, base, overlay, ref := liveChain(t)
	s, ctl, nbdSock := serveControl(t, overlay)
	fi, err := os.Lstat(ctl)
	if err != nil || fi.Mode().Type() != fs.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Fatalf("control socket: %v, %v (want a socket with mode 0600)", fi.Mode(), err)
	}

	// A client writes while the commit runs.
	w := startWriter(t, nbdSock, ref)
	var r result
	// The rate limit keeps the job running for about 4 s whatever the
	// machine's speed, so the client's writes meet it.
	w.during("commit --server", func() { r = vdiskRun(t, "commit", "--server", ctl, "-p", "-r", "64M") })
	w.stop()
	if r.code != 0 || r.stdout != "Image committed.\n" || !strings.Contains(r.stderr, "(100.00/100%)") {
		t.Fatalf("commit --server: exit %d\nstdout: %q\nstderr: %q", r.code, r.stdout, r.stderr)
	}
	// Nothing the client wrote is lost: the chain reads it all.
	identical(t, "the served disk after a live commit", "raw", nbdURI(nbdSock, ""), "raw", ref)
	// A second commit, with no client writing, leaves it all in the base.
	mustQemu(t, "qemu-io", "-f", "raw", nbdURI(nbdSock, ""), "-c", "write -P 0x5a 250M 1M")
	mustQemu(t, "qemu-io", "-f", "raw", ref, "-c", "write -P 0x5a 250M 1M")
	r = mustRun(t, "commit", "--server", ctl, "-q")
	if r.stdout != "" || r.stderr != "" {
		t.Errorf("commit -q printed %q %q", r.stdout, r.stderr)
	}
	jobs := mustRun(t, "jobs", "--server", ctl, "--output", "json")
	var list []map[string]any
	if err := json.Unmarshal([]byte(jobs.stdout), &list); err != nil || len(list) != 2 {
		t.Fatalf("jobs --output json: %v\n%s", err, jobs.stdout)
	}
	t.Logf("the live commit copied %v bytes (the disk is %d)", list[0]["total"], liveSize)
	for _, j := range list {
		if j["type"] != "commit" || j["status"] != "concluded" || j["export"] != "" || j["done"] != j["total"] {
			t.Errorf("job %v", j)
		}
	}
	if r := s.stop(t); r.code != 0 {
		t.Fatalf("serve: exit %d: %s", r.code, r.stderr)
	}
	if exists(ctl) {
		t.Error("the control socket outlived the server")
	}
	identical(t, "the base after the commits", "qcow2", base, "raw", ref)
	identical(t, "the chain after the commits", "qcow2", overlay, "raw", ref)
	mustQemu(t, "qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x5a 250M 1M", base)
	checkClean(t, base, overlay)
	// The overlay was emptied: it maps nothing of its own.
	out := mustQemu(t, "qemu-img", "map", "--output=json", "-f", "qcow2", overlay)
	if strings.Contains(out, `"depth": 0, "present": true`) {
		t.Errorf("the overlay still holds data after the commit:\n%s", out)
	}
}

func TestControlServeSnapshot(t *testing.T) {
	dir, base, overlay, ref := liveChain(t)
	s, ctl, nbdSock := serveControl(t, overlay)
	w := startWriter(t, nbdSock, ref)
	r := mustRun(t, "snapshot", "--server", ctl, "-c", "snap1.qcow2")
	snap := filepath.Join(dir, "snap1.qcow2")
	if r.stdout != snap+"\n" {
		t.Errorf("snapshot --server printed %q, want %q", r.stdout, snap+"\n")
	}
	// From now on the old top does not change.
	old, err := os.ReadFile(overlay)
	if err != nil {
		t.Fatal(err)
	}
	// The client goes on writing, to the new top.
	for n := w.rounds.Load(); w.rounds.Load() < n+3; {
		time.Sleep(10 * time.Millisecond)
	}
	w.stop()
	// Refused: a name that exists, a path out of the directory.
	for _, bad := range []string{"snap1.qcow2", "../x.qcow2", "/tmp/x.qcow2", "sub/x.qcow2"} {
		r := vdiskRun(t, "snapshot", "--server", ctl, "-c", bad)
		oneErrorLine(t, r, "vdisk snapshot")
	}
	if exists(filepath.Join(filepath.Dir(dir), "x.qcow2")) {
		t.Error("a snapshot was created outside the top's directory")
	}
	r = mustRun(t, "snapshot", "--server", ctl, "-c", "snap2.img", "-F", "qcow2")
	snap2 := filepath.Join(dir, "snap2.img")
	mustQemu(t, "qemu-io", "-f", "raw", nbdURI(nbdSock, ""), "-c", "write -P 0x99 250M 1M")
	mustQemu(t, "qemu-io", "-f", "raw", ref, "-c", "write -P 0x99 250M 1M")

	jobs := mustRun(t, "jobs", "--server", ctl)
	lines := strings.Split(strings.TrimSuffix(jobs.stdout, "\n"), "\n")
	if len(lines) != 4 {
		t.Fatalf("jobs: want a header and 3 jobs (refused names start none):\n%s", jobs.stdout)
	}
	// Columns line up: every field starts where its header does; the
	// error column may be empty. No line ends with a space.
	for _, col := range []string{"TYPE", "EXPORT", "STATUS", "PROGRESS", "ERROR"} {
		at := strings.Index(lines[0], col)
		if at < 0 {
			t.Fatalf("header lacks %s: %q", col, lines[0])
		}
		for _, l := range lines[1:] {
			if col == "ERROR" && len(l) < at {
				continue
			}
			if len(l) <= at || l[at-1] != ' ' || l[at] == ' ' {
				t.Errorf("column %s does not line up:\n%s", col, jobs.stdout)
			}
		}
	}
	for _, l := range lines {
		if strings.HasSuffix(l, " ") {
			t.Errorf("trailing space in %q", l)
		}
	}
	for i, re := range []*regexp.Regexp{
		regexp.MustCompile(`^job-1 +snapshot +"" +concluded +-$`),
		regexp.MustCompile(`^job-2 +snapshot +"" +failed +- +.*exists`),
		regexp.MustCompile(`^job-3 +snapshot +"" +concluded +-$`),
	} {
		if !re.MatchString(lines[i+1]) {
			t.Errorf("jobs line %d %q does not match %s", i+1, lines[i+1], re)
		}
	}
	if r.stdout != snap2+"\n" {
		t.Errorf("snapshot -F printed %q", r.stdout)
	}

	if r := s.stop(t); r.code != 0 {
		t.Fatalf("serve: exit %d: %s", r.code, r.stderr)
	}
	if now, _ := os.ReadFile(overlay); string(now) != string(old) {
		t.Error("the old top changed after the snapshot")
	}
	out := mustQemu(t, "qemu-img", "info", "--backing-chain", "-U", snap2)
	for _, want := range []string{"backing file: snap1.qcow2", "backing file: overlay.qcow2", "backing file: base.qcow2"} {
		if !strings.Contains(out, want) {
			t.Errorf("chain of the new top lacks %q:\n%s", want, out)
		}
	}
	identical(t, "the new chain", "qcow2", snap2, "raw", ref)
	checkClean(t, base, overlay, snap, snap2)
}

func TestJobsCommandErrors(t *testing.T) {
	_, _, overlay, ref := liveChain(t)
	_, ctl, nbdSock := serveControl(t, overlay)
	missing := filepath.Join(t.TempDir(), "nope.sock")
	for _, tc := range []struct {
		prefix string
		args   []string
	}{
		{"vdisk jobs", []string{"jobs", "--server", missing}},
		{"vdisk jobs", []string{"jobs", "--server", ctl, "--cancel", "job-42"}},
		{"vdisk commit", []string{"commit", "--server", missing}},
		{"vdisk commit", []string{"commit", "--server", ctl, "no-such-export"}},
		{"vdisk commit", []string{"commit", "--server", ctl, "-b", "5"}},
		{"vdisk commit", []string{"commit", "--server", ctl, "-b", "other.qcow2"}},
		{"vdisk stream", []string{"stream", "--server", ctl, "--base", "3"}},
		{"vdisk snapshot", []string{"snapshot", "--server", ctl, "-c", "x.qcow2", "-F", "nosuch"}},
	} {
		r := vdiskRun(t, tc.args...)
		oneErrorLine(t, r, tc.prefix)
		if r.code != 1 {
			t.Errorf("%v: exit %d", tc.args, r.code)
		}
	}
	// Usage errors: the message and a hint to --help.
	for _, args := range [][]string{
		{"jobs"},
		{"jobs", "--server", ctl, "--output", "xml"},
		{"commit", "--server", ctl, "-f", "qcow2"},
		{"commit", "--server", ctl, "a", "b"},
		{"commit", "--detach", overlay},
		{"stream", "--server", ctl, "--base", "-1"},
		{"stream", "--detach", overlay},
		{"snapshot", "--server", ctl},
		{"snapshot", "--server", ctl, "-l"},
		{"snapshot", "-F", "qcow2", "-c", "x", overlay},
	} {
		r := vdiskRun(t, args...)
		prefix := "vdisk " + args[0] + ": "
		if r.code != 1 || !strings.HasPrefix(r.stderr, prefix) || !strings.Contains(r.stderr, "--help") {
			t.Errorf("%v: exit %d, stderr %q", args, r.code, r.stderr)
		}
	}
	if strings.Contains(vdiskRun(t, "commit", "--server", missing).stderr, "dial unix") {
		t.Error("the connection error is not short")
	}
	// --detach prints the job's ID; -b names the base by file name.
	r := mustRun(t, "commit", "--server", ctl, "--detach", "-b", "base.qcow2")
	id := strings.TrimSpace(r.stdout)
	if !regexp.MustCompile(`^job-\d+$`).MatchString(id) {
		t.Fatalf("commit --detach printed %q", r.stdout)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		out := mustRun(t, "jobs", "--server", ctl).stdout
		if regexp.MustCompile(`(?m)^` + id + ` +commit +"" +concluded +100\.00%$`).MatchString(out) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the detached job did not conclude:\n%s", out)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// A job that fails: stream after the chain was pulled in has nothing
	// to do, but a commit has no backing file to write into.
	mustRun(t, "stream", "--server", ctl, "-q")
	r = vdiskRun(t, "commit", "--server", ctl)
	oneErrorLine(t, r, "vdisk commit")
	if !strings.Contains(r.stderr, "no backing file") {
		t.Errorf("commit without a backing file: %q", r.stderr)
	}
	identical(t, "after stream", "raw", nbdURI(nbdSock, ""), "raw", ref)
}

func TestStreamServer(t *testing.T) {
	_, base, overlay, ref := liveChain(t)
	s, ctl, nbdSock := serveControl(t, overlay)
	w := startWriter(t, nbdSock, ref)
	var r result
	w.during("stream --server", func() { r = mustRun(t, "stream", "--server", ctl, "-p", "-r", "64M") })
	w.stop()
	if r.stdout != "Image streamed.\n" || !strings.Contains(r.stderr, "(100.00/100%)") {
		t.Errorf("stream --server: %q %q", r.stdout, r.stderr)
	}
	if r := s.stop(t); r.code != 0 {
		t.Fatalf("serve: exit %d: %s", r.code, r.stderr)
	}
	if out := mustQemu(t, "qemu-img", "info", overlay); strings.Contains(out, "backing file") {
		t.Errorf("the overlay still has a backing file:\n%s", out)
	}
	identical(t, "the streamed image", "qcow2", overlay, "raw", ref)
	checkClean(t, base, overlay)
}

func TestStreamOffline(t *testing.T) {
	dir, base, overlay, ref := liveChain(t)
	// A third image: stream with --base 1 pulls only the overlay in.
	top := filepath.Join(dir, "top.qcow2")
	mustQemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "overlay.qcow2", "-F", "qcow2", top)
	mustQemu(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x33 100M 4M", top)
	mustQemu(t, "qemu-io", "-f", "raw", "-c", "write -P 0x33 100M 4M", ref)
	r := mustRun(t, "stream", "--base", "2", "-f", "qcow2", top)
	if r.stdout != "Image streamed.\n'"+overlay+"' left the chain (not deleted).\n" {
		t.Errorf("stream --base 2: %q", r.stdout)
	}
	out := mustQemu(t, "qemu-img", "info", "--backing-chain", top)
	if !strings.Contains(out, "backing file: base.qcow2") || strings.Contains(out, "overlay.qcow2") {
		t.Errorf("chain after stream --base 2:\n%s", out)
	}
	identical(t, "after stream --base 2", "qcow2", top, "raw", ref)
	r = mustRun(t, "stream", "-q", top)
	if r.stdout != "" {
		t.Errorf("stream -q printed %q", r.stdout)
	}
	if out := mustQemu(t, "qemu-img", "info", top); strings.Contains(out, "backing file") {
		t.Errorf("stream left a backing file:\n%s", out)
	}
	identical(t, "after stream", "qcow2", top, "raw", ref)
	checkClean(t, base, overlay, top)
	oneErrorLine(t, vdiskRun(t, "stream", "--base", "5", top), "vdisk stream")
	if r := vdiskRun(t, "stream"); r.code != 1 || !strings.HasPrefix(r.stderr, "vdisk stream: expecting one image file name\n") {
		t.Errorf("stream without a file: %d %q", r.code, r.stderr)
	}
}

func TestControlServeSocketFile(t *testing.T) {
	_, _, overlay, _ := liveChain(t)
	dir, err := os.MkdirTemp("", "vdc")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	ctl := filepath.Join(dir, "ctl")
	// A regular file in the way is left alone.
	os.WriteFile(ctl, []byte("keep"), 0o644)
	r := runServe(context.Background(), "--control", ctl, "-k", filepath.Join(dir, "nbd"), "-t", overlay)
	oneErrorLine(t, r, "vdisk serve")
	if b, _ := os.ReadFile(ctl); string(b) != "keep" {
		t.Error("serve clobbered a regular file at the control path")
	}
	if exists(filepath.Join(dir, "nbd")) {
		t.Error("the NBD socket outlived a failed start")
	}
	// The control server refuses a read-only export's jobs, and a
	// temporary overlay's commit.
	os.Remove(ctl)
	nbdSock := filepath.Join(dir, "nbd")
	s := startServe(t, func() bool { return sockReady(nbdSock)() && exists(ctl) }, "--control", ctl, "-k", nbdSock, "-t", "-r", overlay)
	oneErrorLine(t, vdiskRun(t, "commit", "--server", ctl), "vdisk commit")
	oneErrorLine(t, vdiskRun(t, "snapshot", "--server", ctl, "-c", "x.qcow2"), "vdisk snapshot")
	s.stop(t)
	s = startServe(t, func() bool { return sockReady(nbdSock)() && exists(ctl) }, "--control", ctl, "-k", nbdSock, "-t", "-s", overlay)
	r = vdiskRun(t, "commit", "--server", ctl)
	oneErrorLine(t, r, "vdisk commit")
	if !strings.Contains(r.stderr, "temporary overlay") {
		t.Errorf("commit on -s: %q", r.stderr)
	}
	if r := s.stop(t); r.code != 0 {
		t.Fatalf("serve: exit %d: %s", r.code, r.stderr)
	}
	if exists(ctl) {
		t.Error("socket left behind")
	}
}
