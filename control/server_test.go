package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
	_ "github.com/vdisk/vdisk/format/all"
)

const diskSize = 4 << 20

// chain makes base.qcow2 (0x11 over [0, 1M)) under top.qcow2 (0x22 over
// [512K, 1.5M)) in a new directory and returns the open chain and the
// content it reads.
func chain(t testing.TB) (d *vdisk.Disk, want []byte, dir string) {
	t.Helper()
	ctx := context.Background()
	dir = t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	bd, err := vdisk.Create(ctx, base, &vdisk.CreateOptions{Format: "qcow2", Size: diskSize})
	if err != nil {
		t.Fatal(err)
	}
	want = make([]byte, diskSize)
	write := func(d *vdisk.Disk, b byte, off, n int) {
		t.Helper()
		p := bytes.Repeat([]byte{b}, n)
		if _, err := d.WriteAt(p, int64(off)); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], p)
	}
	write(bd, 0x11, 0, 1<<20)
	if err := bd.Close(); err != nil {
		t.Fatal(err)
	}
	d, err = vdisk.Create(ctx, filepath.Join(dir, "top.qcow2"), &vdisk.CreateOptions{Format: "qcow2", Backing: "base.qcow2", BackingFormat: "qcow2"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	write(d, 0x22, 512<<10, 1<<20)
	return d, want, dir
}

// checkContent reads d whole and compares it with want.
func checkContent(t *testing.T, d *vdisk.Disk, want []byte) {
	t.Helper()
	got := make([]byte, len(want))
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("content differs at %d: %#x, want %#x", i, got[i], want[i])
	}
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// server starts a Server for exports on a socket in a new directory and
// returns it and the socket's path. Cleanup closes it and checks Serve's
// result.
func server(t *testing.T, exports []Export, o *Options, hook func(ctx context.Context, id string)) (*Server, string) {
	t.Helper()
	s, err := NewServer(exports, o)
	if err != nil {
		t.Fatal(err)
	}
	s.testHook = hook
	dir, err := os.MkdirTemp("", "vdc")
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "control.sock")
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	t.Cleanup(func() {
		s.Close()
		if err := <-done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
		if _, err := os.Lstat(sock); err == nil {
			t.Error("the socket outlived the server")
		}
		os.RemoveAll(dir)
	})
	return s, sock
}

func dial(t *testing.T, sock string) *Client {
	t.Helper()
	c, err := Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func call(t *testing.T, c *Client, cmd string, args, result any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.Call(ctx, cmd, args, result); err != nil {
		t.Fatalf("%s: %v", cmd, err)
	}
}

// callErr runs a command that must fail with class.
func callErr(t *testing.T, c *Client, class, cmd string, args any) string {
	t.Helper()
	err := c.Call(context.Background(), cmd, args, nil)
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("%s %v: error %v, want a %s reply", cmd, args, err, class)
	}
	if e.Class != class {
		t.Errorf("%s %v: class %s (%s), want %s", cmd, args, e.Class, e.Desc, class)
	}
	return e.Desc
}

// rawConn is a connection speaking the protocol by hand.
type rawConn struct {
	t *testing.T
	c net.Conn
	r *bufio.Reader
}

func rawDial(t *testing.T, sock string) *rawConn {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &rawConn{t, c, bufio.NewReader(c)}
}

// roundTrip sends line and returns the reply line decoded.
func (rc *rawConn) roundTrip(line string) map[string]any {
	rc.t.Helper()
	rc.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(rc.c, line+"\n"); err != nil {
		rc.t.Fatal(err)
	}
	return rc.read()
}

func (rc *rawConn) read() map[string]any {
	rc.t.Helper()
	rc.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := rc.r.ReadBytes('\n')
	if err != nil {
		rc.t.Fatalf("reading a reply: %v", err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		rc.t.Fatalf("reply %q: %v", b, err)
	}
	return m
}

// expectEOF checks that the server closes the connection.
func (rc *rawConn) expectEOF(within time.Duration) {
	rc.t.Helper()
	rc.c.SetReadDeadline(time.Now().Add(within))
	b, err := rc.r.ReadBytes('\n')
	// Closing a unix socket with unread data resets it.
	if err != io.EOF && !errors.Is(err, syscall.ECONNRESET) {
		rc.t.Fatalf("connection still open: read %q, %v", b, err)
	}
}

func errClass(m map[string]any) string {
	e, _ := m["error"].(map[string]any)
	c, _ := e["class"].(string)
	return c
}

func TestControlQueryExports(t *testing.T) {
	d, _, dir := chain(t)
	_, sock := server(t, []Export{{Name: "", Disk: d}, {Name: "alias", Disk: d}}, nil, nil)
	c := dial(t, sock)
	var list []ExportInfo
	call(t, c, "query-exports", nil, &list)
	if len(list) != 2 || list[0].Name != "" || list[1].Name != "alias" {
		t.Fatalf("exports: %+v", list)
	}
	e := list[0]
	top, base := filepath.Join(dir, "top.qcow2"), filepath.Join(dir, "base.qcow2")
	if e.Top != top || e.Size != diskSize || e.Job != "" || len(e.Layers) != 2 {
		t.Fatalf("export: %+v", e)
	}
	if l := e.Layers[0]; l.Name != top || l.Format != "qcow2" || l.ReadOnly {
		t.Errorf("top layer: %+v", l)
	}
	if l := e.Layers[1]; l.Name != base || l.Format != "qcow2" || !l.ReadOnly {
		t.Errorf("base layer: %+v", l)
	}
	var jobs []JobInfo
	call(t, c, "query-jobs", nil, &jobs)
	if jobs == nil || len(jobs) != 0 {
		t.Errorf("jobs: %#v", jobs)
	}
	// The wire format: ids are echoed whatever their type; arguments may
	// be absent, null or {}.
	rc := rawDial(t, sock)
	for _, id := range []string{`1`, `"a"`, `{"x": [1, 2]}`, `null`} {
		m := rc.roundTrip(`{"execute": "query-jobs", "arguments": {}, "id": ` + id + `}`)
		got, _ := json.Marshal(m["id"])
		var w any
		json.Unmarshal([]byte(id), &w)
		want, _ := json.Marshal(w)
		if string(got) != string(want) || m["return"] == nil {
			t.Errorf("id %s: reply %v", id, m)
		}
	}
	m := rc.roundTrip(`{"execute":"flush","arguments":null}`)
	if _, ok := m["id"]; ok || m["return"] == nil {
		t.Errorf("reply without id: %v", m)
	}
	if r, ok := m["return"].(map[string]any); !ok || len(r) != 0 {
		t.Errorf("flush returns %v, want {}", m["return"])
	}
	call(t, c, "flush", FlushArgs{Export: new("alias")}, nil)
}

func TestControlErrors(t *testing.T) {
	d, _, _ := chain(t)
	_, sock := server(t, []Export{{Name: "", Disk: d}}, nil, nil)
	rc := rawDial(t, sock)
	for _, tc := range []struct{ line, class string }{
		{`not json`, ClassGeneric},
		{`[1, 2]`, ClassGeneric},
		{`null`, ClassGeneric},
		{`{"execute": "no-such-command", "id": 7}`, ClassCommandNotFound},
		{`{"arguments": {}}`, ClassInvalidParameter},
		{`{"execute": 3}`, ClassInvalidParameter},
		{`{"execute": "query-jobs", "extra": 1}`, ClassInvalidParameter},
		{`{"execute": "query-jobs", "arguments": {"x": 1}}`, ClassInvalidParameter},
		{`{"execute": "query-jobs", "arguments": [1]}`, ClassInvalidParameter},
		{`{"execute": "commit", "arguments": {"export": "", "bogus": true}}`, ClassInvalidParameter},
		{`{"execute": "commit", "arguments": {"export": 5}}`, ClassInvalidParameter},
		{`{"execute": "commit", "arguments": {"base": "one"}}`, ClassInvalidParameter},
		{`{"execute": "commit", "arguments": {"base": 2}}`, ClassInvalidParameter},
		{`{"execute": "commit", "arguments": {"base": 0}}`, ClassInvalidParameter},
		{`{"execute": "commit", "arguments": {"export": "nope"}}`, ClassInvalidParameter},
		{`{"execute": "stream", "arguments": {"base": -1}}`, ClassInvalidParameter},
		{`{"execute": "stream", "arguments": {"base": 2}}`, ClassInvalidParameter},
		{`{"execute": "snapshot", "arguments": {}}`, ClassInvalidParameter},
		{`{"execute": "snapshot", "arguments": {"file": "../escape.qcow2"}}`, ClassInvalidParameter},
		{`{"execute": "snapshot", "arguments": {"file": ".."}}`, ClassInvalidParameter},
		{`{"execute": "snapshot", "arguments": {"file": "/tmp/abs.qcow2"}}`, ClassInvalidParameter},
		{`{"execute": "snapshot", "arguments": {"file": "sub/x.qcow2"}}`, ClassInvalidParameter},
		{`{"execute": "snapshot", "arguments": {"file": "top.qcow2"}}`, ClassGeneric},           // exists
		{`{"execute": "snapshot", "arguments": {"file": "x", "format": "nope"}}`, ClassGeneric}, // vdisk error
		{`{"execute": "cancel", "arguments": {}}`, ClassInvalidParameter},
		{`{"execute": "cancel", "arguments": {"job-id": "job-99"}}`, ClassInvalidParameter},
		{`{"execute": "flush", "arguments": {"export": "nope"}}`, ClassInvalidParameter},
	} {
		m := rc.roundTrip(tc.line)
		if got := errClass(m); got != tc.class {
			t.Errorf("%s: reply %v, want class %s", tc.line, m, tc.class)
		}
		if e, _ := m["error"].(map[string]any); e == nil || e["desc"] == "" {
			t.Errorf("%s: no description: %v", tc.line, m)
		}
	}
	// The connection survives all that; nothing was created.
	if m := rc.roundTrip(`{"execute": "query-exports"}`); m["return"] == nil {
		t.Errorf("after errors: %v", m)
	}
	if n := len(d.Layers()); n != 2 {
		t.Errorf("the chain has %d layers after refused requests", n)
	}
	// The client returns error replies as *Error.
	c := dial(t, sock)
	desc := callErr(t, c, ClassCommandNotFound, "frobnicate", nil)
	if !strings.Contains(desc, "frobnicate") {
		t.Errorf("desc %q", desc)
	}
	callErr(t, c, ClassInvalidParameter, "commit", map[string]any{"export": "", "typo": 1})
	call(t, c, "query-jobs", nil, nil) // still usable
}

func TestControlReadOnlyExports(t *testing.T) {
	d, _, _ := chain(t)
	_, sock := server(t, []Export{{Name: "ro", Disk: d, ReadOnly: true}, {Name: "s", Disk: d, BackingReadOnly: true}}, nil, nil)
	c := dial(t, sock)
	callErr(t, c, ClassGeneric, "commit", CommitArgs{Export: "ro"})
	callErr(t, c, ClassGeneric, "stream", StreamArgs{Export: "ro"})
	callErr(t, c, ClassGeneric, "snapshot", SnapshotArgs{Export: "ro", File: "n.qcow2"})
	callErr(t, c, ClassGeneric, "commit", CommitArgs{Export: "s"})
}

func TestControlLongLine(t *testing.T) {
	d, _, _ := chain(t)
	_, sock := server(t, []Export{{Disk: d}}, &Options{MaxLine: 1024}, nil)
	rc := rawDial(t, sock)
	// A line of exactly MaxLine bytes is served.
	req := `{"execute": "query-jobs", "id": "` + strings.Repeat("x", 1024-len(`{"execute": "query-jobs", "id": ""}`)) + `"}`
	if len(req) != 1024 {
		t.Fatal(len(req))
	}
	if m := rc.roundTrip(req); m["return"] == nil {
		t.Fatalf("a line of MaxLine bytes: %v", m)
	}
	// One more byte is refused, and the connection closed.
	m := rc.roundTrip(`{"execute": "query-jobs", "id": "` + strings.Repeat("x", 1025-len(`{"execute": "query-jobs", "id": ""}`)) + `"}`)
	if errClass(m) != ClassInvalidParameter {
		t.Fatalf("overlong line: %v", m)
	}
	rc.expectEOF(5 * time.Second)
	// Much longer, without a newline at all.
	rc = rawDial(t, sock)
	go rc.c.Write(bytes.Repeat([]byte("a"), 1<<20))
	if m := rc.read(); errClass(m) != ClassInvalidParameter {
		t.Fatalf("1 MiB line: %v", m)
	}
	rc.expectEOF(5 * time.Second)
}

func TestControlTooManyConnections(t *testing.T) {
	d, _, _ := chain(t)
	s, sock := server(t, []Export{{Disk: d}}, &Options{MaxConns: 2}, nil)
	a, b := rawDial(t, sock), rawDial(t, sock)
	a.roundTrip(`{"execute": "query-jobs"}`)
	b.roundTrip(`{"execute": "query-jobs"}`)
	over := rawDial(t, sock)
	if m := over.read(); errClass(m) != ClassGeneric || !strings.Contains(m["error"].(map[string]any)["desc"].(string), "too many") {
		t.Fatalf("third connection: %v", m)
	}
	over.expectEOF(5 * time.Second)
	// The client reports it.
	if c, err := Dial(sock); err == nil {
		err = c.Call(context.Background(), "query-jobs", nil, nil)
		c.Close()
		if err == nil || !strings.Contains(err.Error(), "too many") {
			t.Errorf("client over the limit: %v", err)
		}
	}
	// A slot frees when a client leaves.
	a.c.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		s.mu.Lock()
		n := s.active
		s.mu.Unlock()
		if n < 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the slot of a closed connection was not freed")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if m := rawDial(t, sock).roundTrip(`{"execute": "query-jobs"}`); m["return"] == nil {
		t.Fatalf("after a slot freed: %v", m)
	}
}

func TestControlIdleTimeout(t *testing.T) {
	d, _, _ := chain(t)
	_, sock := server(t, []Export{{Disk: d}}, &Options{IdleTimeout: 200 * time.Millisecond}, nil)
	rc := rawDial(t, sock)
	rc.roundTrip(`{"execute": "query-jobs"}`)
	// Half a request, then nothing: the deadline covers the whole line.
	io.WriteString(rc.c, `{"execute": `)
	start := time.Now()
	rc.expectEOF(5 * time.Second)
	if el := time.Since(start); el < 150*time.Millisecond {
		t.Errorf("closed after %v, before the idle timeout", el)
	}
}

// waitJob polls query-jobs until job id has ended.
func waitJob(t *testing.T, c *Client, id string) JobInfo {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		var jobs []JobInfo
		call(t, c, "query-jobs", nil, &jobs)
		found := false
		for _, j := range jobs {
			if j.ID == id {
				found = true
				if j.Status != StatusRunning {
					return j
				}
			}
		}
		if !found {
			t.Fatalf("job %s is not listed: %+v", id, jobs)
		}
		if time.Now().After(deadline) {
			t.Fatalf("job %s did not end", id)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestControlCommit(t *testing.T) {
	d, want, dir := chain(t)
	_, sock := server(t, []Export{{Name: "vm", Disk: d}}, nil, nil)
	c := dial(t, sock)

	// A writer changes the disk during the commit: the disk reads what it
	// wrote, before, during and after the commit.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	var werr error
	go func() {
		defer wg.Done()
		rng := rand.New(rand.NewPCG(1, 2))
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			off := rng.IntN(diskSize/4096) * 4096
			n := min((1+rng.IntN(32))*4096, diskSize-off)
			p := bytes.Repeat([]byte{byte(0x30 + i%64)}, n)
			_, err := d.WriteAt(p, int64(off))
			if err == nil {
				copy(want[off:], p)
			}
			if err != nil {
				werr = err
				return
			}
		}
	}()
	var st JobStarted
	call(t, c, "commit", CommitArgs{Export: "vm"}, &st)
	if st.JobID == "" {
		t.Fatal("no job id")
	}
	j := waitJob(t, c, st.JobID)
	close(stop)
	wg.Wait()
	if werr != nil {
		t.Fatal(werr)
	}
	if j.Status != StatusConcluded || j.Type != JobCommit || j.Export != "vm" || j.Error != "" || j.Total < diskSize || j.Done != j.Total {
		t.Fatalf("job: %+v", j)
	}
	checkContent(t, d, want)
	// Ended jobs stay listed.
	var jobs []JobInfo
	call(t, c, "query-jobs", nil, &jobs)
	if len(jobs) != 1 || jobs[0].ID != st.JobID {
		t.Errorf("jobs after the end: %+v", jobs)
	}
	var exps []ExportInfo
	call(t, c, "query-exports", nil, &exps)
	if exps[0].Job != "" || len(exps[0].Layers) != 2 {
		t.Errorf("export after the commit: %+v", exps[0])
	}
	// And so does the chain once reopened.
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	re, err := vdisk.Open(context.Background(), filepath.Join(dir, "top.qcow2"), &vdisk.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer re.Close()
	checkContent(t, re, want)
}

func TestControlCommitIntoBaseOnly(t *testing.T) {
	d, want, dir := chain(t)
	_, sock := server(t, []Export{{Disk: d}}, nil, nil)
	c := dial(t, sock)
	var st JobStarted
	call(t, c, "commit", CommitArgs{}, &st)
	if j := waitJob(t, c, st.JobID); j.Status != StatusConcluded {
		t.Fatalf("job: %+v", j)
	}
	checkContent(t, d, want)
	// The top was emptied.
	err := d.Map(context.Background(), 0, diskSize, func(e vdisk.Extent) error {
		if e.Depth == 0 && e.Present() {
			t.Errorf("the top still holds [%d, +%d) after the commit", e.Start, e.Length)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// With keep it is not: commit again after a write.
	if _, err := d.WriteAt(bytes.Repeat([]byte{0x44}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	copy(want, bytes.Repeat([]byte{0x44}, 4096))
	call(t, c, "commit", CommitArgs{Keep: true}, &st)
	if j := waitJob(t, c, st.JobID); j.Status != StatusConcluded {
		t.Fatalf("job: %+v", j)
	}
	if e, err := d.Status(0, 4096); err != nil || e.Depth != 0 || !e.IsData() {
		t.Errorf("the top after commit with keep: %+v %v", e, err)
	}
	checkContent(t, d, want)
	d.Close()
	// The top was emptied: the base alone reads the content.
	b, err := vdisk.Open(context.Background(), filepath.Join(dir, "base.qcow2"), &vdisk.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	checkContent(t, b, want)
}

// blocker is a test hook that holds every job at its first progress
// report until released (or until the job's context ends).
type blocker struct {
	started chan string
	release chan struct{}
	once    sync.Once
}

func newBlocker() *blocker {
	return &blocker{started: make(chan string, 16), release: make(chan struct{})}
}

func (b *blocker) hook(ctx context.Context, id string) {
	select {
	case b.started <- id:
	default:
	}
	select {
	case <-b.release:
	case <-ctx.Done():
	}
}

func (b *blocker) free() { b.once.Do(func() { close(b.release) }) }

// waitStarted waits for a job to report progress.
func (b *blocker) waitStarted(t *testing.T) {
	t.Helper()
	select {
	case <-b.started:
	case <-time.After(30 * time.Second):
		t.Fatal("the job never reported progress")
	}
}

func TestControlCancel(t *testing.T) {
	d, want, _ := chain(t)
	b := newBlocker()
	_, sock := server(t, []Export{{Name: "vm", Disk: d}}, nil, b.hook)
	defer b.free()
	c := dial(t, sock)
	var st JobStarted
	call(t, c, "commit", CommitArgs{Export: "vm"}, &st)
	b.waitStarted(t)
	// Busy while it runs.
	var exps []ExportInfo
	call(t, c, "query-exports", nil, &exps)
	if exps[0].Job != JobCommit {
		t.Errorf("export job: %q", exps[0].Job)
	}
	callErr(t, c, ClassGeneric, "commit", CommitArgs{Export: "vm"})
	callErr(t, c, ClassGeneric, "stream", StreamArgs{Export: "vm"})
	desc := callErr(t, c, ClassGeneric, "snapshot", SnapshotArgs{Export: "vm", File: "new.qcow2"})
	if !strings.Contains(desc, "busy") {
		t.Errorf("busy desc: %q", desc)
	}
	var jobs []JobInfo
	call(t, c, "query-jobs", nil, &jobs)
	if len(jobs) != 1 || jobs[0].Status != StatusRunning || jobs[0].Total == 0 {
		t.Errorf("running job: %+v", jobs)
	}
	call(t, c, "cancel", CancelArgs{JobID: st.JobID}, nil)
	j := waitJob(t, c, st.JobID)
	if j.Status != StatusCancelled || j.Error != "" {
		t.Fatalf("cancelled job: %+v", j)
	}
	callErr(t, c, ClassGeneric, "cancel", CancelArgs{JobID: st.JobID})
	checkContent(t, d, want)
	// The disk is free again: a new commit runs to the end.
	b.free()
	call(t, c, "commit", CommitArgs{Export: "vm"}, &st)
	if j := waitJob(t, c, st.JobID); j.Status != StatusConcluded {
		t.Fatalf("commit after a cancel: %+v", j)
	}
	checkContent(t, d, want)
}

func TestControlCloseCancelsJobs(t *testing.T) {
	d, want, _ := chain(t)
	b := newBlocker()
	s, sock := server(t, []Export{{Disk: d}}, nil, b.hook)
	c := dial(t, sock)
	var st JobStarted
	call(t, c, "stream", StreamArgs{}, &st)
	b.waitStarted(t)
	done := make(chan struct{})
	go func() { s.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("Close did not return")
	}
	if s.jobs[0].status != StatusCancelled {
		t.Errorf("job after Close: %s", s.jobs[0].status)
	}
	if d.Job() != "" {
		t.Errorf("the disk still runs %q", d.Job())
	}
	checkContent(t, d, want)
	if err := c.Call(context.Background(), "query-jobs", nil, nil); err == nil {
		t.Error("a connection survived Close")
	}
	if _, err := Dial(sock); err == nil {
		t.Error("the server accepts after Close")
	}
}

func TestControlStream(t *testing.T) {
	d, want, _ := chain(t)
	_, sock := server(t, []Export{{Disk: d}}, nil, nil)
	c := dial(t, sock)
	var st JobStarted
	call(t, c, "stream", StreamArgs{}, &st)
	j := waitJob(t, c, st.JobID)
	if j.Status != StatusConcluded || j.Type != JobStream {
		t.Fatalf("job: %+v", j)
	}
	var exps []ExportInfo
	call(t, c, "query-exports", nil, &exps)
	if len(exps[0].Layers) != 1 {
		t.Errorf("layers after stream: %+v", exps[0].Layers)
	}
	checkContent(t, d, want)
}

func TestControlSnapshot(t *testing.T) {
	d, want, dir := chain(t)
	_, sock := server(t, []Export{{Name: "vm", Disk: d}}, &Options{MaxEndedJobs: 2}, nil)
	c := dial(t, sock)
	var res SnapshotResult
	call(t, c, "snapshot", SnapshotArgs{Export: "vm", File: "s1.qcow2"}, &res)
	if res.File != filepath.Join(dir, "s1.qcow2") {
		t.Errorf("new top %q", res.File)
	}
	var exps []ExportInfo
	call(t, c, "query-exports", nil, &exps)
	if e := exps[0]; e.Top != res.File || len(e.Layers) != 3 || !e.Layers[1].ReadOnly || e.Layers[1].Name != filepath.Join(dir, "top.qcow2") {
		t.Errorf("export after the snapshot: %+v", e)
	}
	// Writes go to the new top; the old one no longer changes.
	old, _ := os.ReadFile(filepath.Join(dir, "top.qcow2"))
	p := bytes.Repeat([]byte{0x77}, 64<<10)
	if _, err := d.WriteAt(p, 2<<20); err != nil {
		t.Fatal(err)
	}
	copy(want[2<<20:], p)
	call(t, c, "flush", FlushArgs{}, nil)
	if now, _ := os.ReadFile(filepath.Join(dir, "top.qcow2")); !bytes.Equal(now, old) {
		t.Error("the old top changed after the snapshot")
	}
	checkContent(t, d, want)
	// With a format; a name that exists is refused.
	call(t, c, "snapshot", SnapshotArgs{Export: "vm", File: "s2.img", Format: "qcow2"}, &res)
	callErr(t, c, ClassGeneric, "snapshot", SnapshotArgs{Export: "vm", File: "s1.qcow2"})
	call(t, c, "snapshot", SnapshotArgs{Export: "vm", File: "s3.qcow2"}, &res)
	// Snapshots are listed as jobs; only the last 2 ended ones are kept.
	var jobs []JobInfo
	call(t, c, "query-jobs", nil, &jobs)
	if len(jobs) != 2 || jobs[0].Type != JobSnapshot || jobs[1].Status != StatusConcluded || jobs[0].Status != StatusFailed || jobs[0].Error == "" {
		t.Errorf("jobs: %+v", jobs)
	}
	// The chain has 5 layers: commit into the base (index 4) drops the 3
	// between it and the top.
	var st JobStarted
	call(t, c, "commit", CommitArgs{Export: "vm", Base: new(4)}, &st)
	if j := waitJob(t, c, st.JobID); j.Status != StatusConcluded {
		t.Fatalf("commit into the base: %+v", j)
	}
	call(t, c, "query-exports", nil, &exps)
	if e := exps[0]; len(e.Layers) != 2 || e.Layers[1].Name != filepath.Join(dir, "base.qcow2") {
		t.Errorf("export after commit -b 4: %+v", e)
	}
	checkContent(t, d, want)
	d.Close()
	re, err := vdisk.Open(context.Background(), res.File, &vdisk.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer re.Close()
	if n := len(re.Layers()); n != 2 {
		t.Errorf("reopened chain has %d layers, want 2", n)
	}
	checkContent(t, re, want)
}

func TestControlListen(t *testing.T) {
	dir, err := os.MkdirTemp("", "vdl")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "s")
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Lstat(sock)
	if err != nil || fi.Mode().Type() != fs.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket: %v %v", fi.Mode(), err)
	}
	if _, err := Listen(sock); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("second Listen on a live socket: %v", err)
	}
	// A stale socket (nobody listening) is replaced.
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	l, err = Listen(sock)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	l.Close()
	if _, err := os.Lstat(sock); err == nil {
		t.Error("Close left the socket")
	}
	// Anything else is left alone.
	os.WriteFile(sock, []byte("data"), 0o644)
	if _, err := Listen(sock); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("Listen over a regular file: %v", err)
	}
	if b, _ := os.ReadFile(sock); string(b) != "data" {
		t.Error("the regular file was touched")
	}
}

func TestControlClientContext(t *testing.T) {
	d, _, _ := chain(t)
	_, sock := server(t, []Export{{Disk: d}}, nil, nil)
	c := dial(t, sock)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := c.Call(ctx, "query-jobs", nil, nil); !errors.Is(err, context.Canceled) {
		t.Errorf("call with a cancelled context: %v", err)
	}
	call(t, c, "query-jobs", nil, nil) // nothing was sent: still usable

	// A server that never answers: the call ends with its context, and
	// the client is unusable afterwards.
	dir := t.TempDir()
	mute := filepath.Join(dir, "mute.sock")
	l, err := net.Listen("unix", mute)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	mc := dial(t, mute)
	ctx, cancel = context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := mc.Call(ctx, "query-jobs", nil, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("call to a mute server: %v", err)
	}
	if err := mc.Call(context.Background(), "query-jobs", nil, nil); err == nil {
		t.Error("a client broken by an interrupted call still works")
	}
}

// TestControlBackgroundJob: a background job (serve --prefetch) is listed
// by query-jobs with its progress, can be cancelled, and does not keep a
// commit or stream off the disk; its end does not forget the job running
// beside it.
func TestControlBackgroundJob(t *testing.T) {
	d, want, _ := chain(t)
	b := newBlocker()
	s, sock := server(t, []Export{{Name: "vm", Disk: d}}, nil, b.hook)
	c := dial(t, sock)
	id, err := s.StartBackground("vm", JobPrefetch, func(ctx context.Context, progress func(done, total int64)) error {
		progress(1, 4)
		<-ctx.Done()
		return ctx.Err()
	})
	if err != nil {
		t.Fatal(err)
	}
	b.waitStarted(t)
	var jobs []JobInfo
	call(t, c, "query-jobs", nil, &jobs)
	if len(jobs) != 1 || jobs[0].ID != id || jobs[0].Type != JobPrefetch || jobs[0].Status != StatusRunning || jobs[0].Done != 1 || jobs[0].Total != 4 {
		t.Fatalf("query-jobs: %+v", jobs)
	}
	b.free()
	var st JobStarted
	call(t, c, "stream", StreamArgs{Export: "vm"}, &st)
	call(t, c, "cancel", CancelArgs{JobID: id}, nil)
	if j := waitJob(t, c, id); j.Status != StatusCancelled {
		t.Errorf("background job after cancel: %+v", j)
	}
	if j := waitJob(t, c, st.JobID); j.Status != StatusConcluded {
		t.Errorf("stream beside the background job: %+v", j)
	}
	checkContent(t, d, want)
	if _, err := s.StartBackground("nope", JobPrefetch, nil); err == nil {
		t.Error("a background job on an unknown export started")
	}
}
