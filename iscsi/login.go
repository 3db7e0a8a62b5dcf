package iscsi

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// ErrAuth is a CHAP failure: a wrong secret or user on either side.
var ErrAuth = errors.New("iscsi: authentication failed")

// ErrLogin is a login the target refused for another reason.
var ErrLogin = errors.New("iscsi: login failed")

// targetMissingError is a login refused because the target does not
// exist (status 0x0203 or 0x0204); it reads as the error it wraps.
type targetMissingError struct{ err error }

func (e *targetMissingError) Error() string { return e.err.Error() }
func (e *targetMissingError) Unwrap() error { return e.err }

// errTargetBusy marks a login refused with status class 3 (target error,
// service unavailable, out of resources), which may succeed later.
var errTargetBusy = errors.New("transient")

// RedirectError is a login answered with status class 1 (redirection,
// RFC 7143 §11.13.5): the target is at Address ("host[:port][,tag]"),
// for this login (temporary) or for good (permanent). Session follows
// redirections; it returns this error only when it gives up on them.
type RedirectError struct {
	Address   string
	Permanent bool
}

func (e *RedirectError) Error() string {
	kind := "temporarily"
	if e.Permanent {
		kind = "permanently"
	}
	return fmt.Sprintf("iscsi: login failed: the target moved %s to %q", kind, clipS(e.Address))
}

// Is makes a redirection that was not followed an ErrLogin.
func (e *RedirectError) Is(target error) bool { return target == ErrLogin }

// redirectPortal turns a TargetAddress value (RFC 7143 §13.9:
// domainname[:port][,portal-group-tag], IPv6 in brackets) into host:port.
func redirectPortal(v string) (string, error) {
	if i := strings.LastIndexByte(v, ','); i >= 0 {
		v = v[:i]
	}
	if v == "" || len(v) > 255 {
		return "", protoErrorf("redirection to an invalid TargetAddress %q", clipS(v))
	}
	host, port := v, "3260"
	if strings.HasPrefix(v, "[") {
		end := strings.IndexByte(v, ']')
		if end < 0 {
			return "", protoErrorf("redirection to an invalid TargetAddress %q", clipS(v))
		}
		host = v[1:end]
		if rest := v[end+1:]; rest != "" {
			if rest[0] != ':' {
				return "", protoErrorf("redirection to an invalid TargetAddress %q", clipS(v))
			}
			port = rest[1:]
		}
	} else if i := strings.LastIndexByte(v, ':'); i >= 0 {
		if strings.IndexByte(v[:i], ':') >= 0 { // a bare IPv6 address
			host = v
		} else {
			host, port = v[:i], v[i+1:]
		}
	}
	n, err := strconv.Atoi(port)
	if host == "" || err != nil || n < 1 || n > 65535 || strings.ContainsAny(host, " /[]") {
		return "", protoErrorf("redirection to an invalid TargetAddress %q", clipS(v))
	}
	return net.JoinHostPort(host, strconv.Itoa(n)), nil
}

// Auth holds CHAP credentials. TargetSecret set asks for mutual CHAP: the
// target must prove it knows it too.
type Auth struct {
	User         string
	Secret       []byte
	TargetUser   string
	TargetSecret []byte
}

// Our proposals for the operational keys (RFC 7143 §13). What the target
// answers is bounded again in negotiate.
const (
	defaultMaxRecv    = 256 << 10
	defaultMaxBurst   = 1 << 20
	defaultFirstBurst = 256 << 10
	// minDataSegment is the least MaxRecvDataSegmentLength RFC 7143 allows.
	minDataSegment = 512
	maxLoginSteps  = 16
)

// Params are the negotiated session and connection parameters.
type Params struct {
	// MaxRecvDataSegmentLength is what we declared: the largest data
	// segment the target may send us.
	MaxRecvDataSegmentLength int
	// MaxXmitDataSegmentLength is the target's declaration: the largest
	// data segment we may send.
	MaxXmitDataSegmentLength int
	MaxBurstLength           int
	FirstBurstLength         int
	ImmediateData            bool
	InitialR2T               bool
	HeaderDigest, DataDigest bool
	TSIH                     uint16
	TargetAlias              string
}

// conn is one TCP connection in full feature phase.
type conn struct {
	nc     net.Conn
	r      *bufio.Reader
	dig    Digests
	params Params
	// wmu keeps whole PDUs from interleaving; closing nc unblocks a
	// writer stuck on a dead peer.
	wmu sync.Mutex
	// loginCSG is the stage the login reached (3: full feature).
	loginCSG int

	gen      uint64
	done     chan struct{} // closed when the connection has ended
	errOnce  sync.Once
	err      error // why it ended; set before done is closed
	lastRecv atomic.Int64
	pingOut  atomic.Bool
}

func newConn(nc net.Conn) *conn {
	return &conn{nc: nc, r: bufio.NewReaderSize(nc, 64<<10), done: make(chan struct{})}
}

// fail ends the connection with err (the first reason wins).
func (c *conn) fail(err error) {
	c.errOnce.Do(func() {
		c.err = err
		c.nc.Close()
		close(c.done)
	})
}

// write sends one PDU; writes of whole PDUs never interleave.
func (c *conn) write(p *PDU) error {
	b, err := p.Marshal(c.dig)
	if err != nil {
		return err
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	select {
	case <-c.done:
		return c.err
	default:
	}
	_, err = c.nc.Write(b)
	return err
}

// loginState carries sequence numbers through the login.
type loginState struct {
	isid      [6]byte
	tsih      uint16
	cmdSN     uint32
	expStatSN uint32
	expCmdSN  uint32
	maxCmdSN  uint32
	itt       uint32
}

// login runs the login phase on nc: security negotiation when auth is
// set (else AuthMethod=None), then operational negotiation.
func login(ctx context.Context, nc net.Conn, cfg *Config, st *loginState, discovery bool) (*conn, error) {
	c := newConn(nc)
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
		defer nc.SetDeadline(time.Time{})
	}
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	first := []KV{{"InitiatorName", cfg.InitiatorName}}
	if discovery {
		first = append(first, KV{"SessionType", "Discovery"})
	} else {
		first = append(first, KV{"SessionType", "Normal"}, KV{"TargetName", cfg.Target})
	}
	// Security stage.
	var kvs []KV
	var err error
	if cfg.Auth != nil {
		kvs, err = loginStep(c, st, 0, 1, false, append(first, KV{"AuthMethod", "CHAP,None"}))
		if err != nil {
			return nil, err
		}
		am, _ := lookup(kvs, "AuthMethod")
		if am == "CHAP" {
			kvs, err = loginStep(c, st, 0, 1, false, []KV{{"CHAP_A", chapMD5}})
			if err != nil {
				return nil, err
			}
			ans, mid, mch, err := chapAnswer(kvs, cfg.Auth)
			if err != nil {
				return nil, err
			}
			kvs, err = loginStep(c, st, 0, 1, true, ans)
			if err != nil {
				return nil, err
			}
			if cfg.Auth.TargetSecret != nil {
				if err := chapVerify(kvs, cfg.Auth, mid, mch); err != nil {
					return nil, err
				}
			}
		} else if am != "None" {
			return nil, fmt.Errorf("%w: target chose AuthMethod %q", ErrLogin, clipS(am))
		} else if cfg.Auth.TargetSecret != nil {
			return nil, fmt.Errorf("%w: mutual CHAP was asked for but the target chose no authentication", ErrAuth)
		}
		// A target that answered without transiting wants another step.
		for i := 0; c.loginCSG < 1; i++ {
			if i > maxLoginSteps {
				return nil, protoErrorf("login stuck in the security stage")
			}
			if _, err = loginStep(c, st, 0, 1, true, nil); err != nil {
				return nil, err
			}
		}
		first = nil
	} else {
		kvs, err = loginStep(c, st, 0, 1, true, append(first, KV{"AuthMethod", "None"}))
		if errors.Is(err, ErrAuth) {
			return nil, fmt.Errorf("%w: the target requires CHAP authentication (give a user and password)", ErrAuth)
		}
		if err != nil {
			return nil, err
		}
		if am, _ := lookup(kvs, "AuthMethod"); am != "None" && am != "" {
			return nil, fmt.Errorf("%w: the target requires %s authentication (give a user and password)", ErrAuth, clipS(am))
		}
		for i := 0; c.loginCSG < 1; i++ {
			if i > maxLoginSteps {
				return nil, protoErrorf("login stuck in the security stage")
			}
			if _, err = loginStep(c, st, 0, 1, true, nil); err != nil {
				return nil, err
			}
		}
		first = nil
	}

	// Operational stage.
	maxRecv := cfg.MaxRecvDataSegmentLength
	if maxRecv == 0 {
		maxRecv = defaultMaxRecv
	}
	hd, dd := "None", "None"
	if cfg.HeaderDigest {
		hd = "CRC32C,None"
	}
	if cfg.DataDigest {
		dd = "CRC32C,None"
	}
	ops := []KV{
		{"HeaderDigest", hd},
		{"DataDigest", dd},
		{"MaxRecvDataSegmentLength", strconv.Itoa(maxRecv)},
		{"DefaultTime2Wait", "0"},
		{"DefaultTime2Retain", "0"},
		{"ErrorRecoveryLevel", "0"},
	}
	if !discovery {
		ops = append(ops,
			KV{"MaxConnections", "1"},
			KV{"InitialR2T", "No"},
			KV{"ImmediateData", "Yes"},
			KV{"MaxBurstLength", strconv.Itoa(defaultMaxBurst)},
			KV{"FirstBurstLength", strconv.Itoa(defaultFirstBurst)},
			KV{"MaxOutstandingR2T", "1"},
			KV{"DataPDUInOrder", "Yes"},
			KV{"DataSequenceInOrder", "Yes"},
		)
	}
	p := Params{
		MaxRecvDataSegmentLength: maxRecv,
		MaxXmitDataSegmentLength: 8192, // RFC 7143 default when undeclared
		MaxBurstLength:           262144,
		FirstBurstLength:         65536,
		InitialR2T:               true,
		ImmediateData:            true,
	}
	all := []KV{}
	sent := map[string]bool{}
	for _, kv := range ops {
		sent[kv.Key] = true
	}
	out := append(first, ops...)
	for i := 0; ; i++ {
		if i > maxLoginSteps {
			return nil, protoErrorf("operational negotiation did not end")
		}
		kvs, err = loginStep(c, st, 1, 3, true, out)
		if err != nil {
			return nil, err
		}
		all = append(all, kvs...)
		out = nil
		// Answer what the target proposes that we did not.
		for _, kv := range kvs {
			if sent[kv.Key] || kv.Value == "NotUnderstood" || kv.Value == "Irrelevant" || kv.Value == "Reject" {
				continue
			}
			switch kv.Key {
			case "TargetPortalGroupTag", "TargetAlias", "TargetAddress", "MaxRecvDataSegmentLength":
				continue
			}
			sent[kv.Key] = true
			out = append(out, KV{kv.Key, kv.Value})
		}
		if c.loginCSG == 3 {
			break
		}
	}
	cfg.log().Debug("iscsi: operational keys answered", "portal", cfg.Portal, "keys", all)
	if err := negotiate(&p, all, maxRecv, discovery); err != nil {
		return nil, err
	}
	p.TSIH = st.tsih
	c.params = p
	c.dig = Digests{Header: p.HeaderDigest, Data: p.DataDigest}
	return c, nil
}

// negotiate applies the target's answers (RFC 7143 §13: MIN for lengths,
// OR for InitialR2T, AND for ImmediateData), bounding every number.
func negotiate(p *Params, kvs []KV, maxRecv int, discovery bool) error {
	num := func(key string, lo, hi int) (int, bool, error) {
		v, ok := lookup(kvs, key)
		if !ok {
			return 0, false, nil
		}
		n, err := strconv.Atoi(v)
		if err != nil || n < lo || n > hi {
			return 0, false, protoErrorf("target answered %s=%q (want %d..%d)", key, clipS(v), lo, hi)
		}
		return n, true, nil
	}
	if n, ok, err := num("MaxRecvDataSegmentLength", minDataSegment, MaxDataSegment); err != nil {
		return err
	} else if ok {
		p.MaxXmitDataSegmentLength = n
	}
	if !discovery {
		if n, ok, err := num("MaxBurstLength", minDataSegment, MaxDataSegment); err != nil {
			return err
		} else if ok {
			p.MaxBurstLength = min(n, defaultMaxBurst)
		}
		if n, ok, err := num("FirstBurstLength", minDataSegment, MaxDataSegment); err != nil {
			return err
		} else if ok {
			p.FirstBurstLength = min(n, defaultFirstBurst)
		}
		p.FirstBurstLength = min(p.FirstBurstLength, p.MaxBurstLength)
		if v, ok := lookup(kvs, "InitialR2T"); ok {
			p.InitialR2T = v != "No"
		}
		if v, ok := lookup(kvs, "ImmediateData"); ok {
			p.ImmediateData = v == "Yes"
		}
		if v, ok := lookup(kvs, "MaxConnections"); ok && v != "1" {
			return protoErrorf("target answered MaxConnections=%q", clipS(v))
		}
		if v, ok := lookup(kvs, "ErrorRecoveryLevel"); ok && v != "0" {
			return protoErrorf("target answered ErrorRecoveryLevel=%q", clipS(v))
		}
	}
	for _, d := range []struct {
		key string
		dst *bool
	}{{"HeaderDigest", &p.HeaderDigest}, {"DataDigest", &p.DataDigest}} {
		v, ok := lookup(kvs, d.key)
		switch {
		case !ok || v == "None":
		case v == "CRC32C":
			*d.dst = true
		default:
			return protoErrorf("target answered %s=%q", d.key, clipS(v))
		}
	}
	p.TargetAlias, _ = lookup(kvs, "TargetAlias")
	return nil
}

// loginStep sends one Login Request and reads its response.
func loginStep(c *conn, st *loginState, csg, nsg byte, transit bool, kvs []KV) ([]KV, error) {
	data := EncodeText(kvs)
	var resp []KV
	var err error
	// A long answer comes in pieces (C bit); each piece is asked for with
	// an empty request.
	for piece := 0; ; piece++ {
		if piece > maxLoginSteps {
			return nil, protoErrorf("login response continued too long")
		}
		req := &PDU{Data: data}
		req.BHS[0] = 0x40 | OpLoginReq
		req.BHS[1] = csg<<2 | nsg
		if transit {
			req.BHS[1] |= 0x80
		}
		copy(req.BHS[8:14], st.isid[:])
		binary.BigEndian.PutUint16(req.BHS[14:], st.tsih)
		req.put32(16, st.itt)
		req.put32(24, st.cmdSN)
		req.put32(28, st.expStatSN)
		if err = c.write(req); err != nil {
			return nil, err
		}
		p, err := ReadPDU(c.r, Digests{}, defaultMaxRecv)
		if err != nil {
			return nil, err
		}
		if p.Opcode() != OpLoginResp {
			if p.Opcode() == OpReject {
				return nil, fmt.Errorf("%w: the target rejected the login request (reason %#x)", ErrLogin, p.BHS[2])
			}
			return nil, protoErrorf("opcode %#x during login", p.Opcode())
		}
		st.expStatSN = p.u32(24) + 1
		st.expCmdSN, st.maxCmdSN = p.u32(28), p.u32(32)
		if class, detail := p.BHS[36], p.BHS[37]; class != 0 {
			return nil, loginStatusError(class, detail, p.Data)
		}
		st.tsih = binary.BigEndian.Uint16(p.BHS[14:])
		got, err := ParseText(p.Data)
		if err != nil {
			return nil, err
		}
		resp = append(resp, got...)
		if len(resp) > maxTextPairs {
			return nil, protoErrorf("more than %d text pairs in login", maxTextPairs)
		}
		if p.BHS[1]&0x40 != 0 { // C: more text follows
			data = nil
			continue
		}
		if p.BHS[1]&0x80 != 0 {
			c.loginCSG = int(p.BHS[1] & 3)
		} else {
			c.loginCSG = int(p.BHS[1] >> 2 & 3)
		}
		return resp, nil
	}
}

func loginStatusError(class, detail byte, data []byte) error {
	code := uint16(class)<<8 | uint16(detail)
	var msg string
	switch code {
	case 0x0101, 0x0102:
		kvs, _ := ParseText(data)
		addr, _ := lookup(kvs, "TargetAddress")
		return &RedirectError{Address: addr, Permanent: detail == 2}
	case 0x0201:
		return fmt.Errorf("%w: the target refused the credentials (wrong user or secret)", ErrAuth)
	case 0x0202:
		return fmt.Errorf("%w: this initiator is not allowed to access the target", ErrAuth)
	case 0x0203, 0x0204:
		// Permanent in itself, but a target service that is restarting
		// answers this until it has re-created its targets: connect
		// retries it when the portal was down earlier in the same round.
		msg = map[uint16]string{0x0203: "target not found", 0x0204: "target removed"}[code]
		return &targetMissingError{fmt.Errorf("%w: %s (status class %d detail %d)", ErrLogin, msg, class, detail)}
	case 0x0205:
		msg = "unsupported iSCSI version"
	case 0x0206:
		msg = "too many connections"
	case 0x0207:
		msg = "missing parameter"
	case 0x0208:
		msg = "cannot include the connection in the session"
	case 0x0209:
		msg = "session type not supported"
	case 0x020a:
		msg = "session does not exist"
	case 0x020b:
		msg = "invalid request during login"
	case 0x0300, 0x0301, 0x0302:
		// Target errors are transient (RFC 7143 §11.13.5): the login
		// may be retried.
		msg = map[uint16]string{0x0300: "target error", 0x0301: "service unavailable", 0x0302: "out of resources"}[code]
		return fmt.Errorf("%w: %w: %s (status class %d detail %d)", ErrLogin, errTargetBusy, msg, class, detail)
	default:
		msg = "status " + strings.ToUpper(strconv.FormatUint(uint64(code), 16))
	}
	return fmt.Errorf("%w: %s (status class %d detail %d)", ErrLogin, msg, class, detail)
}
