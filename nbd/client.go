package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// maxStatusChunk bounds one block status reply chunk (a hostile server
// must not make the client allocate much): 2^20 descriptors.
const maxStatusChunk = 4 + 8<<20

// Command flags for Client requests.
const (
	FlagFUA      = cmdFlagFUA
	FlagNoHole   = cmdFlagNoHole
	FlagDF       = cmdFlagDF
	FlagReqOne   = cmdFlagReqOne
	FlagFastZero = cmdFlagFastZero
)

// Commands, for Do and DoContext.
const (
	CmdRead        = cmdRead
	CmdWrite       = cmdWrite
	CmdFlush       = cmdFlush
	CmdTrim        = cmdTrim
	CmdCache       = cmdCache
	CmdWriteZeroes = cmdWriteZeroes
)

// Option error replies a Client reports as Error.Errno.
const (
	RepErrUnsup    = repErrUnsup
	RepErrPolicy   = repErrPolicy
	RepErrTLSReqd  = repErrTLSReqd
	RepErrUnknown  = repErrUnknown
	RepErrShutdown = repErrShutdown
)

// Transmission flags a Client reports in Flags.
const (
	TFlagReadOnly     = tflagReadOnly
	TFlagSendFlush    = tflagSendFlush
	TFlagSendFUA      = tflagSendFUA
	TFlagSendTrim     = tflagSendTrim
	TFlagWriteZeroes  = tflagSendWriteZeroes
	TFlagSendDF       = tflagSendDF
	TFlagCanMultiConn = tflagCanMultiConn
	TFlagSendCache    = tflagSendCache
	TFlagFastZero     = tflagSendFastZero
)

// ErrNotNBD is a peer whose greeting is not a fixed newstyle NBD server's.
var ErrNotNBD = errors.New("nbd: not a fixed newstyle NBD server")

// Error is an error reply from an NBD server.
type Error struct {
	// Errno is the NBD error value (EINVAL, EPERM, ...); for option
	// errors it is the NBD_REP_ERR_* reply type.
	Errno   uint32
	Message string
}

func (e *Error) Error() string {
	s := ErrnoName(e.Errno)
	if e.Errno&(1<<31) != 0 {
		s = fmt.Sprintf("option refused (reply %#x)", e.Errno)
	}
	if e.Message != "" {
		s += ": " + e.Message
	}
	return "nbd: " + s
}

// ClientOptions configures a Client's negotiation.
type ClientOptions struct {
	// ExportName is the export to use ("" is the default export).
	ExportName string
	// NoStructuredReplies keeps simple replies (structured replies are
	// negotiated by default).
	NoStructuredReplies bool
	// MetaContexts are selected with NBD_OPT_SET_META_CONTEXT (needs
	// structured replies).
	MetaContexts []string
	// TLSConfig upgrades the connection with NBD_OPT_STARTTLS first. Its
	// Certificates are offered to servers that authenticate clients (see
	// ClientTLSConfig and ClientTLSCreds).
	TLSConfig *tls.Config
	// ExportNameOnly enters transmission with NBD_OPT_EXPORT_NAME instead of
	// NBD_OPT_GO.
	ExportNameOnly bool
	// ExtendedHeaders asks for NBD_OPT_EXTENDED_HEADERS (32-byte headers,
	// 64-bit lengths) before structured replies; a server without them
	// gets structured replies as before.
	ExtendedHeaders bool
}

// BlockExtent is one block status descriptor.
type BlockExtent struct {
	Length uint32
	Flags  uint32
}

// ExportInfo is an entry of NBD_OPT_LIST.
type ExportInfo struct {
	Name, Description string
}

// Client is a small NBD client. Its request methods may be called from
// many goroutines at once; requests are pipelined and replies matched by
// cookie.
type Client struct {
	nc  net.Conn
	r   *bufio.Reader
	wmu sync.Mutex

	size       int64
	flags      uint16
	structured bool
	extended   bool
	contexts   map[uint32]string
	blockSize  [3]uint32

	mu      sync.Mutex
	pending map[uint64]*call
	cookie  uint64
	err     error // set once the connection is unusable
	closed  chan struct{}
	// loopDone closes when the reply reader has ended and failed every
	// pending call; only the reader closes a call's done, so a reply
	// never lands in a buffer whose caller has given up.
	loopDone chan struct{}
}

type call struct {
	typ     uint16
	off     uint64
	length  uint64
	buf     []byte
	covered int64
	err     error
	status  map[string][]BlockExtent
	done    chan struct{}
}

// Dial connects to addr ("unix" or "tcp" network) and negotiates.
func Dial(ctx context.Context, network, addr string, o *ClientOptions) (*Client, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	c, err := NewClient(nc, o)
	if err != nil {
		nc.Close()
		return nil, err
	}
	return c, nil
}

// NewClient negotiates on an open connection. On error the caller closes
// nc.
func NewClient(nc net.Conn, o *ClientOptions) (*Client, error) {
	if o == nil {
		o = &ClientOptions{}
	}
	c := &Client{nc: nc, r: bufio.NewReaderSize(nc, 128<<10), pending: map[uint64]*call{}, closed: make(chan struct{}), loopDone: make(chan struct{}), contexts: map[uint32]string{}}
	hs, err := c.greet()
	if err != nil {
		return nil, err
	}
	if o.TLSConfig != nil {
		if _, _, err := c.simpleOption(optStartTLS, nil); err != nil {
			return nil, err
		}
		tc := tls.Client(nc, o.TLSConfig)
		if err := tc.Handshake(); err != nil {
			return nil, err
		}
		c.nc = tc
		c.r.Reset(tc)
	}
	if o.ExtendedHeaders && !o.NoStructuredReplies && !o.ExportNameOnly {
		typ, _, err := c.simpleOption(optExtendedHeaders, nil)
		var ne *Error
		if err != nil && !errors.As(err, &ne) {
			return nil, err
		}
		// Any refusal (unsupported, invalid) leaves compact headers.
		c.extended = err == nil && typ == repAck
		c.structured = c.extended
	}
	if !o.NoStructuredReplies && !c.extended {
		typ, _, err := c.simpleOption(optStructuredReply, nil)
		var ne *Error
		if err != nil && !(errors.As(err, &ne) && ne.Errno == repErrUnsup) {
			return nil, err
		}
		c.structured = typ == repAck
	}
	if len(o.MetaContexts) > 0 && c.structured {
		if err := c.setMeta(o.ExportName, o.MetaContexts); err != nil {
			return nil, err
		}
	}
	if o.ExportNameOnly {
		err = c.exportName(o.ExportName, hs)
	} else {
		err = c.optGo(o.ExportName, hs)
	}
	if err != nil {
		return nil, err
	}
	go c.readLoop()
	return c, nil
}

// ListExports asks the server on nc for its exports, then aborts the
// negotiation and closes nc.
func ListExports(nc net.Conn, tlsConfig *tls.Config) ([]ExportInfo, error) {
	defer nc.Close()
	c := &Client{nc: nc, r: bufio.NewReader(nc)}
	if _, err := c.greet(); err != nil {
		return nil, err
	}
	if tlsConfig != nil {
		if _, _, err := c.simpleOption(optStartTLS, nil); err != nil {
			return nil, err
		}
		tc := tls.Client(nc, tlsConfig)
		if err := tc.Handshake(); err != nil {
			return nil, err
		}
		c.nc = tc
		c.r.Reset(tc)
	}
	if err := c.sendOption(optList, nil); err != nil {
		return nil, err
	}
	var out []ExportInfo
	for {
		typ, data, err := c.optionReply(optList)
		if err != nil {
			return nil, err
		}
		if typ == repAck {
			break
		}
		if typ != repServer || len(data) < 4 || int(be.Uint32(data)) > len(data)-4 {
			return nil, fmt.Errorf("nbd: bad NBD_REP_SERVER reply")
		}
		nl := be.Uint32(data)
		out = append(out, ExportInfo{Name: string(data[4 : 4+nl]), Description: string(data[4+nl:])})
	}
	c.sendOption(optAbort, nil)
	return out, nil
}

func (c *Client) greet() (handshakeFlags uint16, err error) {
	var b [18]byte
	if _, err := io.ReadFull(c.r, b[:]); err != nil {
		return 0, err
	}
	if be.Uint64(b[0:]) != nbdMagic || be.Uint64(b[8:]) != optMagic {
		return 0, ErrNotNBD
	}
	hs := be.Uint16(b[16:])
	cf := uint32(clientFixedNewstyle)
	if hs&flagNoZeroes != 0 {
		cf |= clientNoZeroes
	}
	var f [4]byte
	be.PutUint32(f[:], cf)
	_, err = c.nc.Write(f[:])
	return hs, err
}

func (c *Client) sendOption(opt uint32, data []byte) error {
	b := make([]byte, 16, 16+len(data))
	be.PutUint64(b[0:], optMagic)
	be.PutUint32(b[8:], opt)
	be.PutUint32(b[12:], uint32(len(data)))
	_, err := c.nc.Write(append(b, data...))
	return err
}

// optionReply reads one option reply; error replies become *Error.
func (c *Client) optionReply(opt uint32) (uint32, []byte, error) {
	var h [20]byte
	if _, err := io.ReadFull(c.r, h[:]); err != nil {
		return 0, nil, err
	}
	if be.Uint64(h[0:]) != repMagic || be.Uint32(h[8:]) != opt {
		return 0, nil, errors.New("nbd: bad option reply")
	}
	typ, n := be.Uint32(h[12:]), be.Uint32(h[16:])
	if n > maxOptionLen {
		return 0, nil, errors.New("nbd: option reply too long")
	}
	data := make([]byte, n)
	if _, err := io.ReadFull(c.r, data); err != nil {
		return 0, nil, err
	}
	if typ&(1<<31) != 0 {
		return typ, data, &Error{Errno: typ, Message: string(data)}
	}
	return typ, data, nil
}

func (c *Client) simpleOption(opt uint32, data []byte) (uint32, []byte, error) {
	if err := c.sendOption(opt, data); err != nil {
		return 0, nil, err
	}
	return c.optionReply(opt)
}

func (c *Client) setMeta(export string, names []string) error {
	b := be.AppendUint32(nil, uint32(len(export)))
	b = append(b, export...)
	b = be.AppendUint32(b, uint32(len(names)))
	for _, n := range names {
		b = be.AppendUint32(b, uint32(len(n)))
		b = append(b, n...)
	}
	if err := c.sendOption(optSetMetaContext, b); err != nil {
		return err
	}
	for {
		typ, data, err := c.optionReply(optSetMetaContext)
		if err != nil {
			return err
		}
		if typ == repAck {
			return nil
		}
		if typ == repMetaContext && len(data) >= 4 {
			c.contexts[be.Uint32(data)] = string(data[4:])
		}
	}
}

func (c *Client) optGo(export string, hs uint16) error {
	b := be.AppendUint32(nil, uint32(len(export)))
	b = append(b, export...)
	b = be.AppendUint16(b, 1)
	b = be.AppendUint16(b, infoBlockSize)
	if err := c.sendOption(optGo, b); err != nil {
		return err
	}
	gotExport := false
	for {
		typ, data, err := c.optionReply(optGo)
		var ne *Error
		if errors.As(err, &ne) && ne.Errno == repErrUnsup && !c.extended {
			return c.exportName(export, hs)
		}
		if err != nil {
			return err
		}
		switch typ {
		case repAck:
			if !gotExport {
				return errors.New("nbd: server sent no NBD_INFO_EXPORT")
			}
			return nil
		case repInfo:
			if len(data) < 2 {
				return errors.New("nbd: short NBD_REP_INFO")
			}
			switch be.Uint16(data) {
			case infoExport:
				if len(data) != 12 {
					return errors.New("nbd: bad NBD_INFO_EXPORT")
				}
				c.size = int64(be.Uint64(data[2:]))
				c.flags = be.Uint16(data[10:])
				gotExport = true
			case infoBlockSize:
				if len(data) != 14 {
					return errors.New("nbd: bad NBD_INFO_BLOCK_SIZE")
				}
				c.blockSize = [3]uint32{be.Uint32(data[2:]), be.Uint32(data[6:]), be.Uint32(data[10:])}
			}
		}
	}
}

func (c *Client) exportName(export string, hs uint16) error {
	if err := c.sendOption(optExportName, []byte(export)); err != nil {
		return err
	}
	n := 10 + 124
	if hs&flagNoZeroes != 0 {
		n = 10
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(c.r, b); err != nil {
		return err
	}
	c.size = int64(be.Uint64(b))
	c.flags = be.Uint16(b[8:])
	return nil
}

// Size is the export's size.
func (c *Client) Size() int64 { return c.size }

// Flags are the transmission flags.
func (c *Client) Flags() uint16 { return c.flags }

// Structured reports whether structured replies were negotiated.
func (c *Client) Structured() bool { return c.structured }

// Extended reports whether extended headers were negotiated.
func (c *Client) Extended() bool { return c.extended }

// Contexts maps the selected metadata context IDs to their names.
func (c *Client) Contexts() map[uint32]string { return c.contexts }

// BlockSizes returns the minimum, preferred and maximum sizes the server
// advertised (zeros when it did not).
func (c *Client) BlockSizes() (minimum, preferred, maximum uint32) {
	return c.blockSize[0], c.blockSize[1], c.blockSize[2]
}

// Do sends one request and waits for its reply. For NBD_CMD_READ, buf
// receives the data (len(buf) must equal length); for NBD_CMD_WRITE, buf is
// the payload. Exposed for tests that need unusual requests.
func (c *Client) Do(typ, flags uint16, off uint64, length uint32, buf []byte) error {
	_, err := c.do(context.Background(), typ, flags, off, uint64(length), buf)
	return err
}

// DoContext is Do ended by ctx: when ctx ends before the reply, the
// connection is closed (the reply could still arrive into buf otherwise)
// and every request in flight on it fails.
func (c *Client) DoContext(ctx context.Context, typ, flags uint16, off uint64, length uint32, buf []byte) error {
	_, err := c.do(ctx, typ, flags, off, uint64(length), buf)
	return err
}

func (c *Client) do(ctx context.Context, typ, flags uint16, off uint64, length uint64, buf []byte) (*call, error) {
	if length > 1<<32-1 && !c.extended {
		return nil, fmt.Errorf("nbd: a length of %d bytes needs extended headers", length)
	}
	if typ == cmdRead && len(buf) != int(length) {
		return nil, fmt.Errorf("nbd: read buffer of %d bytes for %d", len(buf), length)
	}
	if typ == cmdWrite && len(buf) != int(length) {
		return nil, fmt.Errorf("nbd: write payload of %d bytes for %d", len(buf), length)
	}
	if err := context.Cause(ctx); err != nil {
		return nil, err
	}
	cl := &call{typ: typ, off: off, length: length, done: make(chan struct{})}
	if typ == cmdRead {
		cl.buf = buf
	}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, err
	}
	c.cookie++
	cookie := c.cookie
	c.pending[cookie] = cl
	c.mu.Unlock()

	var hb [extendedHeaderSize]byte
	h := hb[:requestHeaderSize]
	if c.extended {
		h = hb[:]
		if typ == cmdWrite {
			flags |= cmdFlagPayloadLen
		}
		be.PutUint32(h[0:], extendedRequestMagic)
		be.PutUint16(h[4:], flags)
		be.PutUint16(h[6:], typ)
		be.PutUint64(h[8:], cookie)
		be.PutUint64(h[16:], off)
		be.PutUint64(h[24:], length)
	} else {
		be.PutUint32(h[0:], requestMagic)
		be.PutUint16(h[4:], flags)
		be.PutUint16(h[6:], typ)
		be.PutUint64(h[8:], cookie)
		be.PutUint64(h[16:], off)
		be.PutUint32(h[24:], uint32(length))
	}
	// A blocked write or a late reply ends with the connection.
	stop := context.AfterFunc(ctx, func() { c.fatal(context.Cause(ctx)) })
	defer stop()
	c.wmu.Lock()
	var err error
	if typ == cmdWrite {
		bufs := net.Buffers{h, buf}
		_, err = bufs.WriteTo(c.nc)
	} else {
		_, err = c.nc.Write(h)
	}
	c.wmu.Unlock()
	if err != nil {
		c.fatal(err)
	}
	if typ == cmdDisc {
		return cl, nil
	}
	<-cl.done
	return cl, cl.err
}

// fatal makes the connection unusable and closes it; the reply reader
// then ends and fails the pending calls.
func (c *Client) fatal(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = err
		c.nc.Close()
		close(c.closed)
	}
}

// Err is the error that made the connection unusable, nil while it works.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

func (c *Client) take(cookie uint64, remove bool) *call {
	c.mu.Lock()
	defer c.mu.Unlock()
	cl := c.pending[cookie]
	if remove {
		delete(c.pending, cookie)
	}
	return cl
}

func (c *Client) readLoop() {
	defer close(c.loopDone)
	var err error
	for err == nil {
		err = c.readReply()
	}
	c.fatal(err)
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, cl := range c.pending {
		delete(c.pending, k)
		if cl.err == nil {
			cl.err = c.err
		}
		close(cl.done)
	}
}

func (c *Client) readReply() error {
	var m [4]byte
	if _, err := io.ReadFull(c.r, m[:]); err != nil {
		return err
	}
	switch be.Uint32(m[:]) {
	case simpleReplyMagic:
		if c.extended {
			return errors.New("nbd: simple reply with extended headers")
		}
		var h [12]byte
		if _, err := io.ReadFull(c.r, h[:]); err != nil {
			return err
		}
		errno, cookie := be.Uint32(h[0:]), be.Uint64(h[4:])
		cl := c.take(cookie, true)
		if cl == nil {
			return fmt.Errorf("nbd: reply for unknown cookie %d", cookie)
		}
		if errno != 0 {
			cl.err = &Error{Errno: errno}
		} else if cl.typ == cmdRead {
			if _, err := io.ReadFull(c.r, cl.buf); err != nil {
				cl.err = err
				close(cl.done)
				return err
			}
		}
		close(cl.done)
		return nil
	case structuredMagic, extendedReplyMagic:
		var flags, typ uint16
		var cookie uint64
		var n uint32
		if be.Uint32(m[:]) == extendedReplyMagic {
			if !c.extended {
				return errors.New("nbd: extended reply without extended headers")
			}
			var h [28]byte
			if _, err := io.ReadFull(c.r, h[:]); err != nil {
				return err
			}
			// h[12:20] echoes the request's offset; nothing depends on it.
			n64 := be.Uint64(h[20:])
			if n64 > MaxPayload+8 {
				return fmt.Errorf("nbd: reply chunk of %d bytes", n64)
			}
			flags, typ, cookie, n = be.Uint16(h[0:]), be.Uint16(h[2:]), be.Uint64(h[4:]), uint32(n64)
		} else {
			if c.extended {
				return errors.New("nbd: structured reply with extended headers")
			}
			var h [16]byte
			if _, err := io.ReadFull(c.r, h[:]); err != nil {
				return err
			}
			flags, typ, cookie, n = be.Uint16(h[0:]), be.Uint16(h[2:]), be.Uint64(h[4:]), be.Uint32(h[12:])
			if n > MaxPayload+8 {
				return fmt.Errorf("nbd: reply chunk of %d bytes", n)
			}
		}
		cl := c.take(cookie, flags&replyFlagDone != 0)
		if cl == nil {
			return fmt.Errorf("nbd: reply for unknown cookie %d", cookie)
		}
		err := c.chunk(cl, typ, n)
		if err != nil && cl.err == nil {
			cl.err = err
		}
		if flags&replyFlagDone != 0 {
			if cl.err == nil && cl.typ == cmdRead && cl.covered != int64(cl.length) {
				cl.err = fmt.Errorf("nbd: read reply covers %d of %d bytes", cl.covered, cl.length)
			}
			close(cl.done)
		}
		return err
	}
	return fmt.Errorf("nbd: bad reply magic %#x", be.Uint32(m[:]))
}

func (c *Client) chunk(cl *call, typ uint16, n uint32) error {
	switch typ {
	case replyTypeNone:
		if n != 0 {
			return errors.New("nbd: NBD_REPLY_TYPE_NONE with payload")
		}
		return nil
	case replyTypeOffsetData:
		if n < 9 || cl.typ != cmdRead {
			return errors.New("nbd: bad OFFSET_DATA chunk")
		}
		var o [8]byte
		if _, err := io.ReadFull(c.r, o[:]); err != nil {
			return err
		}
		off, dn := be.Uint64(o[:]), uint64(n-8)
		if !inside(off, dn, cl) {
			return errors.New("nbd: OFFSET_DATA outside the request")
		}
		if _, err := io.ReadFull(c.r, cl.buf[off-cl.off:off-cl.off+dn]); err != nil {
			return err
		}
		cl.covered += int64(dn)
		return nil
	case replyTypeOffsetHole:
		if n != 12 || cl.typ != cmdRead {
			return errors.New("nbd: bad OFFSET_HOLE chunk")
		}
		var o [12]byte
		if _, err := io.ReadFull(c.r, o[:]); err != nil {
			return err
		}
		off, hn := be.Uint64(o[:]), uint64(be.Uint32(o[8:]))
		if hn == 0 || !inside(off, hn, cl) {
			return errors.New("nbd: OFFSET_HOLE outside the request")
		}
		clear(cl.buf[off-cl.off : off-cl.off+hn])
		cl.covered += int64(hn)
		return nil
	case replyTypeBlockStatus:
		if n < 12 || (n-4)%8 != 0 || n > maxStatusChunk || cl.typ != cmdBlockStatus {
			return errors.New("nbd: bad BLOCK_STATUS chunk")
		}
		var b [8]byte
		if _, err := io.ReadFull(c.r, b[:4]); err != nil {
			return err
		}
		name, ok := c.contexts[be.Uint32(b[:])]
		if !ok {
			return errors.New("nbd: BLOCK_STATUS for an unknown context")
		}
		// Descriptors are read one by one: memory grows with what the
		// server really sends, not with what its length field claims.
		var list []BlockExtent
		for left := (n - 4) / 8; left > 0; left-- {
			if _, err := io.ReadFull(c.r, b[:]); err != nil {
				return err
			}
			list = append(list, BlockExtent{be.Uint32(b[:]), be.Uint32(b[4:])})
		}
		if cl.status == nil {
			cl.status = map[string][]BlockExtent{}
		}
		cl.status[name] = list
		return nil
	case replyTypeBlockStatusExt:
		if !c.extended || n < 24 || (n-8)%16 != 0 || n > maxStatusChunk || cl.typ != cmdBlockStatus {
			return errors.New("nbd: bad BLOCK_STATUS_EXT chunk")
		}
		var b [16]byte
		if _, err := io.ReadFull(c.r, b[:8]); err != nil {
			return err
		}
		name, ok := c.contexts[be.Uint32(b[:])]
		if !ok {
			return errors.New("nbd: BLOCK_STATUS_EXT for an unknown context")
		}
		if be.Uint32(b[4:]) != (n-8)/16 {
			return errors.New("nbd: BLOCK_STATUS_EXT descriptor count does not match its length")
		}
		var list []BlockExtent
		cut := false
		for left := (n - 8) / 16; left > 0; left-- {
			if _, err := io.ReadFull(c.r, b[:]); err != nil {
				return err
			}
			if cut {
				continue
			}
			l, f := be.Uint64(b[:]), be.Uint64(b[8:])
			if l > 1<<31 {
				// BlockExtent lengths are 32-bit: an extent this long
				// ends the list (the caller asks again from its end).
				l, cut = 1<<31, true
			}
			list = append(list, BlockExtent{uint32(l), uint32(f)})
		}
		if cl.status == nil {
			cl.status = map[string][]BlockExtent{}
		}
		cl.status[name] = list
		return nil
	}
	if typ&(1<<15) != 0 {
		if n > maxOptionLen {
			return fmt.Errorf("nbd: error chunk of %d bytes", n)
		}
		b := make([]byte, n)
		if _, err := io.ReadFull(c.r, b); err != nil {
			return err
		}
		if n < 6 {
			return errors.New("nbd: short error chunk")
		}
		ml := int(be.Uint16(b[4:]))
		if ml > int(n)-6 {
			return errors.New("nbd: error message longer than its chunk")
		}
		if cl.err == nil {
			cl.err = &Error{Errno: be.Uint32(b), Message: string(b[6 : 6+ml])}
		}
		return nil
	}
	return fmt.Errorf("nbd: unknown reply chunk type %d", typ)
}

// inside reports whether [off, off+n) lies within cl's request, without
// overflowing on hostile offsets.
func inside(off, n uint64, cl *call) bool {
	return off >= cl.off && n <= cl.length && off-cl.off <= cl.length-n
}

// maxRequest is the largest READ/WRITE payload to send: MaxPayload, or
// less when the server advertised less.
func (c *Client) maxRequest() int {
	if m := c.blockSize[2]; m > 0 && m < MaxPayload {
		return int(m)
	}
	return MaxPayload
}

// ReadAt reads len(p) bytes at off, in requests of at most MaxPayload (or
// the server's advertised maximum when smaller).
func (c *Client) ReadAt(p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		n := min(len(p)-done, c.maxRequest())
		if err := c.Do(cmdRead, 0, uint64(off)+uint64(done), uint32(n), p[done:done+n]); err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// WriteAt writes p at off, in requests of at most MaxPayload (or the
// server's advertised maximum when smaller).
func (c *Client) WriteAt(p []byte, off int64) (int, error) {
	return c.Write(p, off, 0)
}

// Write writes p at off with command flags (FlagFUA).
func (c *Client) Write(p []byte, off int64, flags uint16) (int, error) {
	done := 0
	for done < len(p) {
		n := min(len(p)-done, c.maxRequest())
		if err := c.Do(cmdWrite, flags, uint64(off)+uint64(done), uint32(n), p[done:done+n]); err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// Flush asks the server to make completed writes durable.
func (c *Client) Flush() error { return c.Do(cmdFlush, 0, 0, 0, nil) }

// Trim discards [off, off+n).
func (c *Client) Trim(off int64, n uint32, flags uint16) error {
	return c.Do(cmdTrim, flags, uint64(off), n, nil)
}

// WriteZeroes zeroes [off, off+n) (FlagNoHole, FlagFastZero, FlagFUA).
func (c *Client) WriteZeroes(off int64, n uint32, flags uint16) error {
	return c.Do(cmdWriteZeroes, flags, uint64(off), n, nil)
}

// Cache asks the server to prefetch [off, off+n).
func (c *Client) Cache(off int64, n uint32) error {
	return c.Do(cmdCache, 0, uint64(off), n, nil)
}

// BlockStatus queries the selected metadata contexts for [off, off+n).
func (c *Client) BlockStatus(off int64, n uint32, flags uint16) (map[string][]BlockExtent, error) {
	return c.BlockStatusContext(context.Background(), off, n, flags)
}

// BlockStatusContext is BlockStatus ended by ctx (see DoContext).
func (c *Client) BlockStatusContext(ctx context.Context, off int64, n uint32, flags uint16) (map[string][]BlockExtent, error) {
	cl, err := c.do(ctx, cmdBlockStatus, flags, uint64(off), uint64(n), nil)
	if err != nil {
		return nil, err
	}
	return cl.status, nil
}

// Close sends NBD_CMD_DISC and closes the connection. It does not wait
// for a server that stopped reading: the disconnect request gets a second.
func (c *Client) Close() error {
	c.mu.Lock()
	broken := c.err != nil
	c.mu.Unlock()
	if !broken {
		c.nc.SetWriteDeadline(time.Now().Add(time.Second))
		c.do(context.Background(), cmdDisc, 0, 0, 0, nil)
	}
	c.fatal(net.ErrClosed)
	if c.loopDone != nil {
		<-c.loopDone
	}
	return nil
}
