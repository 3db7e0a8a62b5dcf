package iscsi

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/vdisk/vdisk/internal/backoff"
)

// ErrConnLost is a connection that ended under a command. Session retries
// such a command once on a new connection before returning it.
var ErrConnLost = errors.New("iscsi: connection lost")

// ErrTimeout is a command the target did not finish in time (it was
// aborted with ABORT TASK or a LUN reset).
var ErrTimeout = errors.New("iscsi: command timed out")

// ErrClosed is a session used after Close.
var ErrClosed = errors.New("iscsi: session closed")

// Config describes where and how to log in.
type Config struct {
	// Portal is host:port.
	Portal string
	// Target is the target's IQN; empty for a discovery session.
	Target        string
	InitiatorName string
	Auth          *Auth
	HeaderDigest  bool
	DataDigest    bool
	// MaxRecvDataSegmentLength is declared to the target (default 256 KiB).
	MaxRecvDataSegmentLength int
	// Dial opens connections; nil uses net.Dialer.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Timeout bounds each command before it is aborted (default 30s) and
	// each login (default 15s or Timeout if smaller).
	Timeout time.Duration
	// Retry is how long a connection that cannot be made (refused,
	// reset, cut or timed out during the login: a target restarting) is
	// tried again with backoff, at the first login and at a reconnect
	// (default 10s; negative: one attempt). Refusals (CHAP, no such
	// target, protocol errors) are not retried.
	Retry time.Duration
	// KeepAlive is how long a connection may stay silent before a NOP-Out
	// ping is sent (default 10s; negative disables).
	KeepAlive time.Duration
	Logger    *slog.Logger
}

func (cfg *Config) timeout() time.Duration {
	if cfg.Timeout > 0 {
		return cfg.Timeout
	}
	return 30 * time.Second
}

func (cfg *Config) loginTimeout() time.Duration {
	return max(cfg.timeout(), 15*time.Second)
}

func (cfg *Config) log() *slog.Logger {
	if cfg.Logger != nil {
		return cfg.Logger
	}
	return slog.New(slog.DiscardHandler)
}

// Session is an iSCSI session with one connection (MaxConnections=1). It
// is safe for concurrent use: commands from many goroutines are in flight
// at once within the target's CmdSN window.
type Session struct {
	cfg       Config
	discovery bool
	isid      [6]byte

	reconnMu sync.Mutex // one reconnect at a time
	cmdMu    sync.Mutex // non-immediate PDUs go out in CmdSN order

	mu        sync.Mutex
	c         *conn
	gen       uint64
	cmdSN     uint32
	expCmdSN  uint32
	maxCmdSN  uint32
	expStatSN uint32
	window    chan struct{} // closed and replaced when MaxCmdSN moves
	tasks     map[uint32]*task
	nextITT   uint32
	closed    bool
	params    Params
	// portal is where logins go: Config.Portal, or where a permanent
	// redirection sent the session.
	portal string
	// connErr is why the last connect gave up, at connErrAt.
	connErr   error
	connErrAt time.Time
	// Reconnects counts the logins after the first (tests read it).
	reconnects int
}

// task is one command in flight.
type task struct {
	itt   uint32
	cmdSN uint32
	c     *conn
	lun   [8]byte

	mu       sync.Mutex
	finished bool
	dataIn   []byte
	dataOut  []byte
	got      int
	done     chan struct{}
	resp     *PDU // SCSI Response, or the last Data-In with status, or a TMF/Text/Logout response
	status   byte
	sense    []byte
	err      error
}

func (t *task) finish(resp *PDU, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.finished {
		return
	}
	t.finished = true
	t.resp, t.err = resp, err
	close(t.done)
}

// Dial logs in to cfg.Target (a normal session).
func Dial(ctx context.Context, cfg Config) (*Session, error) {
	if cfg.Target == "" {
		return nil, fmt.Errorf("iscsi: no target name")
	}
	return newSession(ctx, cfg, false)
}

func newSession(ctx context.Context, cfg Config, discovery bool) (*Session, error) {
	if cfg.InitiatorName == "" {
		cfg.InitiatorName = DefaultInitiatorName
	}
	s := &Session{cfg: cfg, discovery: discovery, tasks: map[uint32]*task{}, window: make(chan struct{}), cmdSN: 1, portal: cfg.Portal}
	// ISID type "random" (RFC 7143 §11.12.5): 0x80, then 3 random bytes
	// and a qualifier. Reconnects keep it, which reinstates the session.
	s.isid[0] = 0x80
	if _, err := rand.Read(s.isid[1:4]); err != nil {
		return nil, err
	}
	s.isid[5] = 1
	if _, err := s.connect(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

// DefaultInitiatorName is used when Config.InitiatorName is empty.
const DefaultInitiatorName = "iqn.2008-11.org.vdisk:initiator"

// Params returns the parameters negotiated on the current connection.
func (s *Session) Params() Params {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.params
}

// Reconnects counts the logins after the first.
func (s *Session) Reconnects() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.reconnects
}

// connect dials and logs in, replacing any dead connection.
func (s *Session) connect(ctx context.Context) (*conn, error) {
	asked := time.Now()
	s.reconnMu.Lock()
	defer s.reconnMu.Unlock()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, ErrClosed
	}
	if c := s.c; c != nil {
		s.mu.Unlock()
		return c, nil
	}
	if s.connErr != nil && s.connErrAt.After(asked) {
		// A reconnect that gave up while this caller waited for it: do
		// not start another round of retries for each waiting command.
		err := s.connErr
		s.mu.Unlock()
		return nil, err
	}
	st := loginState{isid: s.isid, cmdSN: s.cmdSN, itt: s.newITTLocked()}
	first := s.gen == 0
	s.mu.Unlock()

	var c *conn
	var at string
	notify := func(n int, err error, wait time.Duration) {
		s.cfg.log().Info("iscsi: login failed, retrying", "portal", s.cfg.Portal, "target", s.cfg.Target, "attempt", n, "err", err, "backoff", wait)
	}
	// A target that is missing while its service restarts: once the
	// portal was unreachable (or busy) in this round, or when the session
	// had the target a moment ago, "target not found" is retried too.
	restarting := !first
	giveUp := func(err error) bool {
		var missing *targetMissingError
		if errors.As(err, &missing) {
			return !restarting
		}
		if !permanent(err) {
			restarting = true
			return false
		}
		return true
	}
	err := backoff.Retry(ctx, s.retryPolicy(), giveUp, notify, func(ctx context.Context, _ int) error {
		var err error
		c, at, err = s.login(ctx, &st)
		return err
	})
	if err != nil {
		if ctx.Err() == nil {
			s.mu.Lock()
			s.connErr, s.connErrAt = err, time.Now()
			s.mu.Unlock()
		}
		return nil, err
	}
	c.lastRecv.Store(time.Now().UnixNano())
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		c.nc.Close()
		return nil, ErrClosed
	}
	s.gen++
	s.connErr = nil
	c.gen = s.gen
	if !first {
		s.reconnects++
	}
	s.c = c
	s.params = c.params
	s.cmdSN = st.cmdSN
	s.expStatSN = st.expStatSN
	s.expCmdSN, s.maxCmdSN = st.expCmdSN, st.maxCmdSN
	s.kickWindowLocked()
	s.mu.Unlock()
	go s.readLoop(c)
	if ka := s.keepAlive(); ka > 0 {
		go s.keepAliveLoop(c, ka)
	}
	if !first {
		s.cfg.log().Info("iscsi: logged in again", "portal", at, "target", s.cfg.Target)
	}
	return c, nil
}

// maxRedirects bounds the redirections one login follows.
const maxRedirects = 4

// retryPolicy is the backoff of connect.
func (s *Session) retryPolicy() backoff.Policy {
	switch {
	case s.cfg.Retry < 0:
		return backoff.Policy{Attempts: 1}
	case s.cfg.Retry == 0:
		return backoff.Policy{Initial: 50 * time.Millisecond, Max: 2 * time.Second, Attempts: 1 << 20, Total: 10 * time.Second}
	}
	return backoff.Policy{Initial: 50 * time.Millisecond, Max: 2 * time.Second, Attempts: 1 << 20, Total: s.cfg.Retry}
}

// permanent reports whether a failed login would fail the same way
// again: refused credentials, a login refused by the target for a reason
// other than a target error (class 3), a protocol violation, a host name
// that does not exist, a closed session.
func permanent(err error) bool {
	if errors.Is(err, errTargetBusy) {
		return false
	}
	var dns *net.DNSError
	if errors.As(err, &dns) {
		return dns.IsNotFound
	}
	return errors.Is(err, ErrAuth) || errors.Is(err, ErrLogin) || errors.Is(err, ErrProtocol) ||
		errors.Is(err, ErrClosed) || errors.Is(err, context.Canceled)
}

// login dials the session's portal and logs in, following up to
// maxRedirects redirections (each dialled through Config.Dial, never one
// back to an address already tried). A permanent redirection moves the
// session's portal for later logins; a temporary one serves this login
// only. It returns the portal the connection is on.
func (s *Session) login(ctx context.Context, st *loginState) (*conn, string, error) {
	dial := s.cfg.Dial
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	s.mu.Lock()
	addr := s.portal
	s.mu.Unlock()
	seen := map[string]bool{addr: true}
	allPermanent := true
	for hops := 0; ; hops++ {
		lctx, cancel := context.WithTimeout(ctx, s.cfg.loginTimeout())
		nc, err := dial(lctx, "tcp", addr)
		if err != nil {
			cancel()
			return nil, addr, fmt.Errorf("%w: connect to %s: %w", ErrConnLost, addr, err)
		}
		lst := *st
		c, err := login(lctx, nc, &s.cfg, &lst, s.discovery)
		cancel()
		if err == nil {
			*st = lst
			if hops > 0 && allPermanent {
				s.mu.Lock()
				s.portal = addr
				s.mu.Unlock()
			}
			return c, addr, nil
		}
		nc.Close()
		var re *RedirectError
		if !errors.As(err, &re) {
			if permanent(err) {
				return nil, addr, err
			}
			return nil, addr, fmt.Errorf("%w: login to %s: %w", ErrConnLost, addr, err)
		}
		next, perr := redirectPortal(re.Address)
		switch {
		case perr != nil:
			return nil, addr, fmt.Errorf("%s: %w", addr, perr)
		case hops >= maxRedirects:
			return nil, addr, fmt.Errorf("%w: more than %d redirections (the last from %s to %s)", ErrLogin, maxRedirects, addr, next)
		case seen[next]:
			return nil, addr, fmt.Errorf("%w: a redirection loop: %s sends the login back to %s", ErrLogin, addr, next)
		}
		s.cfg.log().Info("iscsi: login redirected", "from", addr, "to", next, "permanent", re.Permanent, "target", s.cfg.Target)
		seen[next] = true
		allPermanent = allPermanent && re.Permanent
		addr = next
	}
}

func (s *Session) keepAlive() time.Duration {
	switch {
	case s.cfg.KeepAlive < 0:
		return 0
	case s.cfg.KeepAlive == 0:
		return 10 * time.Second
	}
	return s.cfg.KeepAlive
}

func (s *Session) newITTLocked() uint32 {
	for {
		s.nextITT++
		if s.nextITT == reservedTag {
			continue
		}
		if _, busy := s.tasks[s.nextITT]; !busy {
			return s.nextITT
		}
	}
}

func (s *Session) kickWindowLocked() {
	close(s.window)
	s.window = make(chan struct{})
}

// current returns a live connection, logging in again if it is gone.
func (s *Session) current(ctx context.Context) (*conn, error) {
	s.mu.Lock()
	c, closed := s.c, s.closed
	s.mu.Unlock()
	if closed {
		return nil, ErrClosed
	}
	if c != nil {
		return c, nil
	}
	return s.connect(ctx)
}

// connFailed retires c and fails the tasks that were on it.
func (s *Session) connFailed(c *conn, err error) {
	c.fail(err)
	s.mu.Lock()
	if s.c == c {
		s.c = nil
	}
	var dead []*task
	for itt, t := range s.tasks {
		if t.c == c {
			dead = append(dead, t)
			delete(s.tasks, itt)
		}
	}
	s.kickWindowLocked()
	s.mu.Unlock()
	for _, t := range dead {
		t.finish(nil, fmt.Errorf("%w: %v", ErrConnLost, err))
	}
}

// updateSN takes StatSN, ExpCmdSN and MaxCmdSN from a target PDU.
func (s *Session) updateSN(p *PDU) {
	statSN, exp, max := p.u32(24), p.u32(28), p.u32(32)
	s.mu.Lock()
	defer s.mu.Unlock()
	switch p.Opcode() {
	case OpSCSIResp, OpTaskResp, OpTextResp, OpLogoutResp, OpReject, OpAsync:
		s.advanceStatLocked(statSN)
	case OpDataIn:
		if p.BHS[1]&0x01 != 0 {
			s.advanceStatLocked(statSN)
		}
	case OpNOPIn:
		if p.ITT() != reservedTag {
			s.advanceStatLocked(statSN)
		}
	}
	// RFC 7143 §4.2.2.1: ignore a MaxCmdSN below ExpCmdSN-1, and numbers
	// older than what we have.
	if serialLess(max, exp-1) {
		return
	}
	if serialLess(s.expCmdSN, exp) {
		s.expCmdSN = exp
	}
	if serialLess(s.maxCmdSN, max) {
		s.maxCmdSN = max
		s.kickWindowLocked()
	}
}

func (s *Session) advanceStatLocked(statSN uint32) {
	if !serialLess(statSN+1, s.expStatSN) {
		s.expStatSN = statSN + 1
	}
}

func (s *Session) lookupTask(c *conn, itt uint32) *task {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.tasks[itt]
	if t == nil || t.c != c {
		return nil
	}
	return t
}

func (s *Session) dropTask(t *task) {
	s.mu.Lock()
	if s.tasks[t.itt] == t {
		delete(s.tasks, t.itt)
	}
	s.mu.Unlock()
}

// readLoop is the connection's only reader: it routes every PDU to its
// task by ITT.
func (s *Session) readLoop(c *conn) {
	for {
		p, err := ReadPDU(c.r, c.dig, c.params.MaxRecvDataSegmentLength)
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			s.connFailed(c, err)
			return
		}
		c.lastRecv.Store(time.Now().UnixNano())
		c.pingOut.Store(false)
		s.updateSN(p)
		if err := s.dispatch(c, p); err != nil {
			s.cfg.log().Warn("iscsi: dropping connection", "portal", s.cfg.Portal, "err", err)
			s.connFailed(c, err)
			return
		}
	}
}

func (s *Session) dispatch(c *conn, p *PDU) error {
	switch p.Opcode() {
	case OpDataIn:
		t := s.lookupTask(c, p.ITT())
		if t == nil {
			return nil // a late PDU of an aborted task
		}
		off := int64(p.u32(40))
		t.mu.Lock()
		if !t.finished {
			// DataPDUInOrder=Yes and DataSequenceInOrder=Yes: each
			// Data-In continues where the last ended, so a target cannot
			// leave holes of stale bytes in the buffer.
			if off != int64(t.got) || off+int64(len(p.Data)) > int64(len(t.dataIn)) {
				t.mu.Unlock()
				s.dropTask(t)
				t.finish(nil, protoErrorf("Data-In at offset %d (+%d) of a %d-byte buffer, after %d bytes", off, len(p.Data), len(t.dataIn), t.got))
				return nil
			}
			copy(t.dataIn[off:], p.Data)
			t.got += len(p.Data)
		}
		t.mu.Unlock()
		if p.BHS[1]&0x01 != 0 {
			s.dropTask(t)
			t.finish(p, nil)
		}
	case OpSCSIResp, OpTaskResp, OpTextResp, OpLogoutResp:
		if t := s.lookupTask(c, p.ITT()); t != nil {
			s.dropTask(t)
			t.finish(p, nil)
		}
	case OpR2T:
		t := s.lookupTask(c, p.ITT())
		if t == nil {
			return nil
		}
		off, n := int64(p.u32(40)), int64(p.u32(44))
		if n == 0 || off+n > int64(len(t.dataOut)) {
			s.dropTask(t)
			t.finish(nil, protoErrorf("R2T for %d bytes at offset %d of a %d-byte write", n, off, len(t.dataOut)))
			return nil
		}
		go s.sendData(c, t, p.u32(20), int(off), int(n))
	case OpNOPIn:
		if ttt := p.u32(20); ttt != reservedTag {
			// The target pings: answer with its TTT and LUN.
			r := &PDU{}
			r.BHS[0] = 0x40 | OpNOPOut
			r.BHS[1] = 0x80
			copy(r.BHS[8:16], p.BHS[8:16])
			r.put32(16, reservedTag)
			r.put32(20, ttt)
			s.mu.Lock()
			r.put32(24, s.cmdSN)
			r.put32(28, s.expStatSN)
			s.mu.Unlock()
			go func() {
				if err := c.write(r); err != nil {
					s.connFailed(c, err)
				}
			}()
		}
	case OpReject:
		if len(p.Data) >= bhsLen {
			itt := binary.BigEndian.Uint32(p.Data[16:])
			if t := s.lookupTask(c, itt); t != nil {
				s.dropTask(t)
				t.finish(nil, protoErrorf("the target rejected the PDU (reason %#x)", p.BHS[2]))
			}
		}
	case OpAsync:
		switch p.BHS[36] {
		case 1, 2, 3:
			// The target asks for a logout or is dropping us: the
			// commands in flight will be retried on a new login.
			return fmt.Errorf("target sent asynchronous event %d", p.BHS[36])
		}
	case OpLoginResp:
		return protoErrorf("login response in full feature phase")
	default:
		return protoErrorf("opcode %#x from the target", p.Opcode())
	}
	return nil
}

// sendData answers an R2T (or sends unsolicited data when ttt is the
// reserved tag): Data-Out PDUs of at most MaxXmitDataSegmentLength.
func (s *Session) sendData(c *conn, t *task, ttt uint32, off, n int) {
	max := c.params.MaxXmitDataSegmentLength
	var sn uint32
	for n > 0 {
		k := min(n, max)
		t.mu.Lock()
		if t.finished {
			t.mu.Unlock()
			return
		}
		p := &PDU{Data: t.dataOut[off : off+k]}
		p.BHS[0] = OpDataOut
		if k == n {
			p.BHS[1] = 0x80
		}
		copy(p.BHS[8:16], t.lun[:])
		p.put32(16, t.itt)
		p.put32(20, ttt)
		s.mu.Lock()
		p.put32(28, s.expStatSN)
		s.mu.Unlock()
		p.put32(36, sn)
		p.put32(40, uint32(off))
		b, err := p.Marshal(c.dig)
		t.mu.Unlock()
		if err == nil {
			err = c.writeRaw(b)
		}
		if err != nil {
			s.connFailed(c, err)
			return
		}
		sn++
		off += k
		n -= k
	}
}

func (c *conn) writeRaw(b []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	select {
	case <-c.done:
		return c.err
	default:
	}
	_, err := c.nc.Write(b)
	return err
}

// keepAliveLoop pings a silent connection and drops it when the ping goes
// unanswered.
func (s *Session) keepAliveLoop(c *conn, every time.Duration) {
	tick := time.NewTicker(every / 2)
	defer tick.Stop()
	for {
		select {
		case <-c.done:
			return
		case <-tick.C:
		}
		idle := time.Since(time.Unix(0, c.lastRecv.Load()))
		if c.pingOut.Load() && idle > every+s.cfg.timeout() {
			s.connFailed(c, fmt.Errorf("no answer to a NOP-Out for %v", idle.Round(time.Second)))
			return
		}
		if idle >= every && !c.pingOut.Load() {
			p := &PDU{}
			p.BHS[0] = 0x40 | OpNOPOut
			p.BHS[1] = 0x80
			s.mu.Lock()
			p.put32(16, s.newITTLocked())
			p.put32(20, reservedTag)
			p.put32(24, s.cmdSN)
			p.put32(28, s.expStatSN)
			s.mu.Unlock()
			c.pingOut.Store(true)
			if err := c.write(p); err != nil {
				s.connFailed(c, err)
				return
			}
		}
	}
}

// send registers a task and sends its PDU: in CmdSN order within the
// window, or as an immediate PDU. build fills the BHS given the numbers.
func (s *Session) send(ctx context.Context, c *conn, t *task, immediate bool, p *PDU) error {
	if !immediate {
		s.cmdMu.Lock()
		defer s.cmdMu.Unlock()
	}
	for {
		s.mu.Lock()
		if s.c != c {
			s.mu.Unlock()
			return fmt.Errorf("%w: %v", ErrConnLost, connErr(c))
		}
		if immediate || !serialLess(s.maxCmdSN, s.cmdSN) {
			t.itt = s.newITTLocked()
			t.cmdSN = s.cmdSN
			t.c = c
			if !immediate {
				s.cmdSN++
			}
			s.tasks[t.itt] = t
			p.put32(16, t.itt)
			p.put32(24, t.cmdSN)
			p.put32(28, s.expStatSN)
			s.mu.Unlock()
			break
		}
		w := s.window
		s.mu.Unlock()
		select {
		case <-w:
		case <-c.done:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if immediate {
		p.BHS[0] |= 0x40
	}
	if err := c.write(p); err != nil {
		s.dropTask(t)
		s.connFailed(c, err)
		return fmt.Errorf("%w: %v", ErrConnLost, err)
	}
	return nil
}

func connErr(c *conn) error {
	select {
	case <-c.done:
		return c.err
	default:
		return errors.New("connection replaced")
	}
}

// wait waits for t; on timeout or cancellation it aborts the task.
func (s *Session) wait(ctx context.Context, t *task) error {
	timer := time.NewTimer(s.cfg.timeout())
	defer timer.Stop()
	var why error
	select {
	case <-t.done:
		return t.err
	case <-timer.C:
		why = fmt.Errorf("%w after %v", ErrTimeout, s.cfg.timeout())
	case <-ctx.Done():
		why = ctx.Err()
	}
	s.abort(t)
	select {
	case <-t.done:
		// It finished while we aborted: take its answer.
		if t.err == nil && t.resp != nil {
			return nil
		}
	default:
		s.dropTask(t)
		t.finish(nil, why)
	}
	return why
}

// abort runs ABORT TASK, then LOGICAL UNIT RESET, then drops the
// connection, stopping at the first that works.
func (s *Session) abort(t *task) {
	c := t.c
	if c == nil {
		return
	}
	for _, fn := range []byte{tmfAbortTask, tmfLUNReset} {
		resp, err := s.taskMgmt(c, fn, t)
		if err == nil && (resp == 0 || resp == 1) {
			return
		}
		s.cfg.log().Warn("iscsi: task management failed", "function", fn, "response", resp, "err", err)
	}
	s.connFailed(c, fmt.Errorf("%w: the target ignored ABORT TASK and LUN RESET", ErrTimeout))
}

const (
	tmfAbortTask = 1
	tmfLUNReset  = 5
)

func (s *Session) taskMgmt(c *conn, fn byte, ref *task) (byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), min(s.cfg.timeout(), 10*time.Second))
	defer cancel()
	p := &PDU{}
	p.BHS[0] = OpTaskMgmt
	p.BHS[1] = 0x80 | fn
	copy(p.BHS[8:16], ref.lun[:])
	if fn == tmfAbortTask {
		p.put32(20, ref.itt)
		p.put32(32, ref.cmdSN)
	} else {
		p.put32(20, reservedTag)
	}
	m := &task{done: make(chan struct{}), lun: ref.lun}
	if err := s.send(ctx, c, m, true, p); err != nil {
		return 0, err
	}
	select {
	case <-m.done:
		if m.err != nil {
			return 0, m.err
		}
		return m.resp.BHS[2], nil
	case <-ctx.Done():
		s.dropTask(m)
		return 0, ctx.Err()
	}
}

// Close logs out and closes the connection.
func (s *Session) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	c := s.c
	s.mu.Unlock()
	var err error
	if c != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		p := &PDU{}
		p.BHS[0] = OpLogoutReq
		p.BHS[1] = 0x80 // reason 0: close the session
		t := &task{done: make(chan struct{})}
		if err = s.send(ctx, c, t, true, p); err == nil {
			select {
			case <-t.done:
				err = t.err
				if err == nil && t.resp.BHS[2] != 0 {
					err = fmt.Errorf("iscsi: logout response %d", t.resp.BHS[2])
				}
			case <-ctx.Done():
				err = fmt.Errorf("iscsi: no logout response: %w", ctx.Err())
			}
		}
		cancel()
	}
	s.mu.Lock()
	s.closed = true
	c = s.c
	s.mu.Unlock()
	if c != nil {
		s.connFailed(c, ErrClosed)
	}
	return err
}
