package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vdisk/vdisk"
)

// Defaults of Options.
const (
	DefaultMaxConns     = 16
	DefaultMaxLine      = 64 << 10
	DefaultIdleTimeout  = 10 * time.Minute
	DefaultMaxEndedJobs = 64
)

// ErrServerClosed is what Serve returns after Close.
var ErrServerClosed = errors.New("control: server closed")

// Export is a disk the server controls, under its export name.
type Export struct {
	Name string
	Disk *vdisk.Disk
	// ReadOnly refuses every job and snapshot (a disk opened read-only
	// refuses them anyway).
	ReadOnly bool
	// BackingReadOnly refuses commit: the images below the top must not
	// be written (vdisk serve -s serves a throw-away overlay over them).
	BackingReadOnly bool
}

// Options configures a Server; the zero value takes the defaults.
type Options struct {
	// MaxConns is the number of connections served at once; further
	// ones get an error line and are closed.
	MaxConns int
	// MaxLine is the longest request line, in bytes.
	MaxLine int
	// IdleTimeout closes a connection that sends no complete request for
	// that long (it also bounds the time to write a reply).
	IdleTimeout time.Duration
	// MaxEndedJobs is how many ended jobs query-jobs keeps listing.
	MaxEndedJobs int
	// Logger receives job starts and ends at debug level, failures as
	// warnings; nil discards them.
	Logger *slog.Logger
}

// Server serves the control protocol for a fixed set of exports.
type Server struct {
	exports map[string]*Export
	names   []string
	o       Options
	log     *slog.Logger

	ctx    context.Context // cancelled by Close; parent of the jobs'
	cancel context.CancelFunc

	mu        sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	conns     map[net.Conn]struct{}
	active    int
	jobs      []*job // creation order
	running   map[*vdisk.Disk]*job
	nextID    int

	connWG sync.WaitGroup
	jobWG  sync.WaitGroup

	// testHook, when set (by tests), runs at every progress report of a
	// job, with the job's context.
	testHook func(ctx context.Context, id string)
}

// job is a live job started through the server.
type job struct {
	id, typ, export string
	disk            *vdisk.Disk
	cancel          context.CancelFunc
	done, total     int64 // guarded by progressMu
	progressMu      sync.Mutex
	// guarded by Server.mu
	status string
	err    string
}

// progress returns the job's progress callback.
func (s *Server) progress(ctx context.Context, j *job) func(done, total int64) {
	return func(done, total int64) {
		j.progressMu.Lock()
		j.done, j.total = done, total
		j.progressMu.Unlock()
		if s.testHook != nil {
			s.testHook(ctx, j.id)
		}
	}
}

// NewServer returns a server for exports (names must be distinct; two
// names may share a disk).
func NewServer(exports []Export, o *Options) (*Server, error) {
	s := &Server{
		exports:   map[string]*Export{},
		listeners: map[net.Listener]struct{}{},
		conns:     map[net.Conn]struct{}{},
		running:   map[*vdisk.Disk]*job{},
	}
	if o != nil {
		s.o = *o
	}
	if s.o.MaxConns <= 0 {
		s.o.MaxConns = DefaultMaxConns
	}
	if s.o.MaxLine <= 0 {
		s.o.MaxLine = DefaultMaxLine
	}
	if s.o.IdleTimeout <= 0 {
		s.o.IdleTimeout = DefaultIdleTimeout
	}
	if s.o.MaxEndedJobs <= 0 {
		s.o.MaxEndedJobs = DefaultMaxEndedJobs
	}
	s.log = s.o.Logger
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	for _, e := range exports {
		if e.Disk == nil {
			return nil, fmt.Errorf("control: export %q has no disk", e.Name)
		}
		if _, dup := s.exports[e.Name]; dup {
			return nil, fmt.Errorf("control: export name %q given twice", e.Name)
		}
		s.exports[e.Name] = &e
		s.names = append(s.names, e.Name)
	}
	slices.Sort(s.names)
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s, nil
}

// Serve accepts connections on l until Close (then it returns
// ErrServerClosed) or until l fails. It closes l.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
		l.Close()
	}()
	var delay time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			if s.isClosed() {
				return ErrServerClosed
			}
			var ne net.Error
			if (errors.As(err, &ne) && ne.Timeout()) || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				s.log.Warn("control: accept failed; retrying", "error", err, "delay", delay)
				time.Sleep(delay)
				continue
			}
			return err
		}
		delay = 0
		s.mu.Lock()
		switch {
		case s.closed:
			c.Close()
		case s.active >= s.o.MaxConns:
			s.connWG.Add(1)
			go s.refuse(c)
		default:
			s.active++
			s.conns[c] = struct{}{}
			s.connWG.Add(1)
			go s.handle(c)
		}
		s.mu.Unlock()
	}
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// Close stops accepting, closes every connection, cancels the running
// jobs and waits for them (and for requests being answered) to end. The
// exports' disks stay open: they are the caller's.
func (s *Server) Close() error {
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		for l := range s.listeners {
			l.Close()
		}
		for c := range s.conns {
			c.Close()
		}
		for _, j := range s.jobs {
			if j.status == StatusRunning {
				j.cancel()
			}
		}
	}
	s.mu.Unlock()
	s.cancel()
	s.connWG.Wait()
	s.jobWG.Wait()
	return nil
}

// refuse tells a connection over the limit why it is closed.
func (s *Server) refuse(c net.Conn) {
	defer s.connWG.Done()
	defer c.Close()
	c.SetWriteDeadline(time.Now().Add(time.Second))
	b, _ := json.Marshal(Response{Error: &Error{Class: ClassGeneric, Desc: fmt.Sprintf("too many control connections (at most %d)", s.o.MaxConns)}})
	c.Write(append(b, '\n'))
}

var errLineTooLong = errors.New("request line too long")

// readLine reads one line of at most max bytes (without its end of line).
// A last line without a newline counts.
func readLine(r *bufio.Reader, max int) ([]byte, error) {
	var line []byte
	for {
		frag, err := r.ReadSlice('\n')
		line = append(line, frag...)
		if len(line) > max+2 {
			return nil, errLineTooLong
		}
		if err == nil || (err == io.EOF && len(line) > 0) {
			break
		}
		if err != bufio.ErrBufferFull {
			return nil, err
		}
	}
	line = bytes.TrimSuffix(line, []byte("\n"))
	line = bytes.TrimSuffix(line, []byte("\r"))
	if len(line) > max {
		return nil, errLineTooLong
	}
	return line, nil
}

func (s *Server) handle(c net.Conn) {
	defer func() {
		c.Close()
		s.mu.Lock()
		delete(s.conns, c)
		s.active--
		s.mu.Unlock()
		s.connWG.Done()
	}()
	r := bufio.NewReaderSize(c, 4096)
	w := bufio.NewWriter(c)
	reply := func(resp Response) bool {
		b, err := json.Marshal(resp)
		if err != nil {
			b, _ = json.Marshal(Response{Error: &Error{Class: ClassGeneric, Desc: "internal error: " + err.Error()}, ID: resp.ID})
		}
		c.SetWriteDeadline(time.Now().Add(s.o.IdleTimeout))
		w.Write(b)
		w.WriteByte('\n')
		return w.Flush() == nil
	}
	for {
		c.SetReadDeadline(time.Now().Add(s.o.IdleTimeout))
		line, err := readLine(r, s.o.MaxLine)
		if err == errLineTooLong {
			reply(Response{Error: &Error{Class: ClassInvalidParameter, Desc: fmt.Sprintf("request line longer than %d bytes", s.o.MaxLine)}})
			return
		}
		if err != nil {
			return // end of input, idle timeout, closed
		}
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		if !reply(s.dispatch(line)) {
			return
		}
	}
}

// handlers are the commands.
var handlers = map[string]func(*Server, json.RawMessage) (any, error){
	"query-exports": (*Server).queryExports,
	"query-jobs":    (*Server).queryJobs,
	"commit":        (*Server).commit,
	"stream":        (*Server).stream,
	"snapshot":      (*Server).snapshot,
	"cancel":        (*Server).cancelJob,
	"flush":         (*Server).flush,
}

// dispatch answers one request line.
func (s *Server) dispatch(line []byte) Response {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(line, &raw); err != nil || raw == nil {
		desc := "JSON parse error: expecting an object"
		if err != nil {
			desc = "JSON parse error: " + strings.TrimPrefix(err.Error(), "json: ")
		}
		return Response{Error: &Error{Class: ClassGeneric, Desc: desc}}
	}
	id := raw["id"]
	fail := func(class, format string, args ...any) Response {
		return Response{Error: &Error{Class: class, Desc: fmt.Sprintf(format, args...)}, ID: id}
	}
	for k := range raw {
		if k != "execute" && k != "arguments" && k != "id" {
			return fail(ClassInvalidParameter, "request member '%s' is unexpected", k)
		}
	}
	var cmd string
	if err := json.Unmarshal(raw["execute"], &cmd); err != nil || cmd == "" {
		return fail(ClassInvalidParameter, "request member 'execute' must be a command name")
	}
	h := handlers[cmd]
	if h == nil {
		return fail(ClassCommandNotFound, "The command %s has not been found", cmd)
	}
	ret, err := h(s, raw["arguments"])
	if err != nil {
		var e *Error
		if !errors.As(err, &e) {
			e = &Error{Class: ClassGeneric, Desc: oneLine(err.Error())}
		}
		return Response{Error: e, ID: id}
	}
	b, err := json.Marshal(ret)
	if err != nil {
		return fail(ClassGeneric, "internal error: %v", err)
	}
	return Response{Return: b, ID: id}
}

func oneLine(s string) string {
	s = strings.TrimSpace(s)
	s = strings.ReplaceAll(s, "\r", "")
	return strings.ReplaceAll(s, "\n", "; ")
}

func invalidf(format string, args ...any) error {
	return &Error{Class: ClassInvalidParameter, Desc: fmt.Sprintf(format, args...)}
}

func genericf(format string, args ...any) error {
	return &Error{Class: ClassGeneric, Desc: fmt.Sprintf(format, args...)}
}

// decodeArgs decodes a request's arguments (absent or null: none) into v,
// refusing unknown members.
func decodeArgs(raw json.RawMessage, v any) error {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		raw = []byte("{}")
	}
	if raw[0] != '{' {
		return invalidf("'arguments' must be an object")
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		msg := strings.TrimPrefix(err.Error(), "json: ")
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) && te.Field != "" {
			msg = fmt.Sprintf("argument '%s' must be of type %s", te.Field, jsonType(te.Type.Kind().String()))
		} else if f, ok := strings.CutPrefix(msg, "unknown field "); ok {
			msg = fmt.Sprintf("argument %s is unexpected", f)
		}
		return invalidf("invalid arguments: %s", msg)
	}
	return nil
}

func jsonType(kind string) string {
	switch kind {
	case "int", "int64", "ptr":
		return "integer"
	case "bool":
		return "boolean"
	}
	return kind
}

func (s *Server) lookup(name string) (*Export, error) {
	e := s.exports[name]
	if e == nil {
		return nil, invalidf("no export named '%s'", name)
	}
	return e, nil
}

func (s *Server) queryExports(raw json.RawMessage) (any, error) {
	if err := decodeArgs(raw, &struct{}{}); err != nil {
		return nil, err
	}
	list := []ExportInfo{}
	for _, name := range s.names {
		d := s.exports[name].Disk
		layers := d.Layers()
		info := ExportInfo{Name: name, Top: layers[0].Name, Size: d.Size(), Layers: []LayerInfo{}}
		for _, l := range layers {
			info.Layers = append(info.Layers, LayerInfo{Name: l.Name, Format: l.Format.Name, ReadOnly: l.ReadOnly})
		}
		s.mu.Lock()
		if j := s.running[d]; j != nil {
			info.Job = j.typ
		}
		s.mu.Unlock()
		if info.Job == "" {
			info.Job = d.Job()
		}
		list = append(list, info)
	}
	return list, nil
}

func (s *Server) queryJobs(raw json.RawMessage) (any, error) {
	if err := decodeArgs(raw, &struct{}{}); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	list := []JobInfo{}
	for _, j := range s.jobs {
		j.progressMu.Lock()
		done, total := j.done, j.total
		j.progressMu.Unlock()
		list = append(list, JobInfo{ID: j.id, Type: j.typ, Export: j.export, Status: j.status, Done: done, Total: total, Error: j.err})
	}
	return list, nil
}

// writableExport checks that jobs may write the export.
func writableExport(e *Export) error {
	if e.ReadOnly || e.Disk.ReadOnly() {
		return genericf("export '%s' is read-only", e.Name)
	}
	return nil
}

func (s *Server) commit(raw json.RawMessage) (any, error) {
	var a CommitArgs
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	e, err := s.lookup(a.Export)
	if err != nil {
		return nil, err
	}
	base := 1
	if a.Base != nil {
		base = *a.Base
	}
	n := len(e.Disk.Layers())
	if n < 2 {
		return nil, genericf("export '%s' has no backing file to commit into", e.Name)
	}
	if base < 1 || base >= n {
		return nil, invalidf("'base' must be a layer index from 1 to %d (export '%s' has %d layers, 0 being the top)", n-1, e.Name, n)
	}
	if err := writableExport(e); err != nil {
		return nil, err
	}
	if e.BackingReadOnly {
		return nil, genericf("export '%s' serves a temporary overlay: its backing images must not be written", e.Name)
	}
	keep, speed := a.Keep, a.Speed
	if speed < 0 {
		return nil, invalidf("'speed' must not be negative")
	}
	j, ctx, err := s.reserve(e, JobCommit)
	if err != nil {
		return nil, err
	}
	go s.run(j, ctx, func(ctx context.Context) error {
		return e.Disk.Commit(ctx, &vdisk.CommitOptions{Base: base, Keep: keep, Rate: speed, Progress: s.progress(ctx, j)})
	})
	return JobStarted{JobID: j.id}, nil
}

func (s *Server) stream(raw json.RawMessage) (any, error) {
	var a StreamArgs
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	e, err := s.lookup(a.Export)
	if err != nil {
		return nil, err
	}
	n := len(e.Disk.Layers())
	if a.Base < 0 || a.Base >= n {
		if n == 1 {
			return nil, invalidf("'base' must be 0: export '%s' has no backing file", e.Name)
		}
		return nil, invalidf("'base' must be 0 or a layer index from 1 to %d (export '%s' has %d layers, 0 being the top)", n-1, e.Name, n)
	}
	if err := writableExport(e); err != nil {
		return nil, err
	}
	if a.Speed < 0 {
		return nil, invalidf("'speed' must not be negative")
	}
	j, ctx, err := s.reserve(e, JobStream)
	if err != nil {
		return nil, err
	}
	base, speed := a.Base, a.Speed
	go s.run(j, ctx, func(ctx context.Context) error {
		dropped, err := e.Disk.Stream(ctx, &vdisk.StreamOptions{Base: base, Rate: speed, Progress: s.progress(ctx, j)})
		for _, name := range dropped {
			s.log.Info("control: an image left the chain (not deleted)", "export", e.Name, "image", name)
		}
		return err
	})
	return JobStarted{JobID: j.id}, nil
}

// snapshotName checks a snapshot's file name and resolves it against the
// directory of the top.
func snapshotName(top, file string) (string, error) {
	if file == "" {
		return "", invalidf("argument 'file' is required")
	}
	if file == "." || file == ".." || filepath.IsAbs(file) || strings.ContainsAny(file, "/\\\x00") {
		return "", invalidf("'file' must be a plain file name (it is created in the directory of the current top, %s)", filepath.Dir(top))
	}
	return filepath.Join(filepath.Dir(top), file), nil
}

func (s *Server) snapshot(raw json.RawMessage) (any, error) {
	var a SnapshotArgs
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	e, err := s.lookup(a.Export)
	if err != nil {
		return nil, err
	}
	name, err := snapshotName(e.Disk.Top().Name, a.File)
	if err != nil {
		return nil, err
	}
	if err := writableExport(e); err != nil {
		return nil, err
	}
	j, ctx, err := s.reserve(e, JobSnapshot)
	if err != nil {
		return nil, err
	}
	// Synchronous: a flush and a create under the disk's exclusive lock.
	err = s.run(j, ctx, func(ctx context.Context) error {
		return e.Disk.Snapshot(ctx, name, &vdisk.SnapshotOptions{Format: a.Format})
	})
	if err != nil {
		return nil, err
	}
	return SnapshotResult{File: e.Disk.Top().Name}, nil
}

func (s *Server) cancelJob(raw json.RawMessage) (any, error) {
	var a CancelArgs
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	if a.JobID == "" {
		return nil, invalidf("argument 'job-id' is required")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, j := range s.jobs {
		if j.id == a.JobID {
			if j.status != StatusRunning {
				return nil, genericf("job '%s' is not running (it is %s)", j.id, j.status)
			}
			j.cancel()
			return struct{}{}, nil
		}
	}
	return nil, invalidf("no job with ID '%s'", a.JobID)
}

func (s *Server) flush(raw json.RawMessage) (any, error) {
	var a FlushArgs
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	var disks []*vdisk.Disk
	if a.Export != nil {
		e, err := s.lookup(*a.Export)
		if err != nil {
			return nil, err
		}
		disks = append(disks, e.Disk)
	} else {
		for _, name := range s.names {
			if d := s.exports[name].Disk; !slices.Contains(disks, d) {
				disks = append(disks, d)
			}
		}
	}
	for _, d := range disks {
		if err := d.Flush(); err != nil {
			return nil, err
		}
	}
	return struct{}{}, nil
}

// reserve registers a job of type typ on e's disk, refusing a busy disk
// or a closing server.
func (s *Server) reserve(e *Export, typ string) (*job, context.Context, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, nil, genericf("the server is shutting down")
	}
	if j := s.running[e.Disk]; j != nil {
		return nil, nil, genericf("export '%s' is busy: %s job '%s' is running on its disk", e.Name, j.typ, j.id)
	}
	if name := e.Disk.Job(); name != "" {
		return nil, nil, genericf("export '%s' is busy: a %s job is running on its disk", e.Name, name)
	}
	s.nextID++
	ctx, cancel := context.WithCancel(s.ctx)
	j := &job{id: fmt.Sprintf("job-%d", s.nextID), typ: typ, export: e.Name, disk: e.Disk, cancel: cancel, status: StatusRunning}
	s.jobs = append(s.jobs, j)
	s.running[e.Disk] = j
	s.jobWG.Add(1)
	s.log.Debug("control: job started", "job", j.id, "type", typ, "export", e.Name)
	return j, ctx, nil
}

// StartBackground runs fn as a job of type typ on export: query-jobs
// shows its progress and cancel stops it, but it does not keep other jobs
// off the disk (serve --prefetch only reads). It returns the job's ID.
func (s *Server) StartBackground(export, typ string, fn func(ctx context.Context, progress func(done, total int64)) error) (string, error) {
	e, err := s.lookup(export)
	if err != nil {
		return "", err
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return "", genericf("the server is shutting down")
	}
	s.nextID++
	ctx, cancel := context.WithCancel(s.ctx)
	j := &job{id: fmt.Sprintf("job-%d", s.nextID), typ: typ, export: e.Name, disk: e.Disk, cancel: cancel, status: StatusRunning}
	s.jobs = append(s.jobs, j)
	s.jobWG.Add(1)
	s.mu.Unlock()
	go s.run(j, ctx, func(ctx context.Context) error { return fn(ctx, s.progress(ctx, j)) })
	return j.id, nil
}

// run runs a reserved job and records how it ended.
func (s *Server) run(j *job, ctx context.Context, fn func(context.Context) error) error {
	defer s.jobWG.Done()
	err := fn(ctx)
	s.mu.Lock()
	if s.running[j.disk] == j {
		delete(s.running, j.disk)
	}
	switch {
	case err == nil:
		j.status = StatusConcluded
	case ctx.Err() != nil && errors.Is(err, context.Canceled):
		j.status = StatusCancelled
	default:
		j.status = StatusFailed
		j.err = oneLine(err.Error())
	}
	s.prune()
	s.mu.Unlock()
	j.cancel()
	if j.status == StatusFailed {
		s.log.Warn("control: job failed", "job", j.id, "type", j.typ, "export", j.export, "error", err)
	} else {
		s.log.Debug("control: job ended", "job", j.id, "type", j.typ, "export", j.export, "status", j.status)
	}
	return err
}

// prune drops the oldest ended jobs beyond MaxEndedJobs. s.mu is held.
func (s *Server) prune() {
	ended := 0
	for _, j := range s.jobs {
		if j.status != StatusRunning {
			ended++
		}
	}
	for i := 0; ended > s.o.MaxEndedJobs && i < len(s.jobs); {
		if s.jobs[i].status != StatusRunning {
			s.jobs = slices.Delete(s.jobs, i, i+1)
			ended--
			continue
		}
		i++
	}
}
