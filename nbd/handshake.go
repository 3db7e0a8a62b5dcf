package nbd

import (
	"crypto/tls"
	"time"
)

// handshake runs fixed newstyle negotiation. It returns nil when the
// transmission phase starts (c.exp set), errDisconnect after NBD_OPT_ABORT,
// and an error when the client breaks the protocol or the connection fails.
func (c *conn) handshake() error {
	if t := c.s.HandshakeTimeout; t > 0 {
		c.dmu.Lock()
		if !c.closing {
			c.raw.SetDeadline(time.Now().Add(t))
		}
		c.dmu.Unlock()
	}
	var hdr [18]byte
	be.PutUint64(hdr[0:], nbdMagic)
	be.PutUint64(hdr[8:], optMagic)
	be.PutUint16(hdr[16:], flagFixedNewstyle|flagNoZeroes)
	c.w.lock()
	c.w.buf = append(c.w.buf, hdr[:]...)
	if err := c.w.unlock(); err != nil {
		return err
	}
	var cf [4]byte
	if err := c.readFull(cf[:]); err != nil {
		return err
	}
	flags := be.Uint32(cf[:])
	if flags&^(clientFixedNewstyle|clientNoZeroes) != 0 {
		return protoErrorf("unknown client flags %#x", flags)
	}
	c.noZeroes = flags&clientNoZeroes != 0
	c.fixed = flags&clientFixedNewstyle != 0
	if c.s.TLSRequired && !c.fixed {
		// TLS needs fixed newstyle negotiation; nothing else is allowed.
		return protoErrorf("a client without fixed newstyle negotiation cannot start TLS, which the server requires")
	}

	var oh [16]byte
	data := make([]byte, 0, 512)
	for {
		if err := c.readFull(oh[:]); err != nil {
			return err
		}
		if m := be.Uint64(oh[0:]); m != optMagic {
			return protoErrorf("bad option magic %#x", m)
		}
		opt, n := be.Uint32(oh[8:]), be.Uint32(oh[12:])
		if n > maxOptionLen {
			return protoErrorf("option %d carries %d bytes (limit %d)", opt, n, maxOptionLen)
		}
		if cap(data) < int(n) {
			data = make([]byte, n)
		}
		data = data[:n]
		if err := c.readFull(data); err != nil {
			return err
		}
		if c.s.TLSRequired && !c.tls && opt != optStartTLS && opt != optAbort {
			if opt == optExportName {
				return protoErrorf("NBD_OPT_EXPORT_NAME without TLS, which the server requires")
			}
			if err := c.optError(opt, repErrTLSReqd, "TLS is required: use NBD_OPT_STARTTLS first"); err != nil {
				return err
			}
			continue
		}
		done, err := c.option(opt, data)
		if err != nil || done {
			return err
		}
	}
}

// option handles one option; done reports the start of the transmission
// phase.
func (c *conn) option(opt uint32, data []byte) (done bool, err error) {
	switch opt {
	case optExportName:
		if c.extended {
			return false, protoErrorf("NBD_OPT_EXPORT_NAME after extended headers were negotiated")
		}
		e := c.s.lookup(string(data))
		if e == nil {
			return false, protoErrorf("NBD_OPT_EXPORT_NAME for unknown export %q", data)
		}
		var b [10 + 124]byte
		be.PutUint64(b[0:], uint64(e.Disk.Size()))
		be.PutUint16(b[8:], c.transmissionFlags(e))
		n := len(b)
		if c.noZeroes {
			n = 10
		}
		c.w.lock()
		c.w.buf = append(c.w.buf, b[:n]...)
		if err := c.w.unlock(); err != nil {
			return false, err
		}
		c.startTransmission(e)
		return true, nil

	case optAbort:
		c.optReply(opt, repAck, nil)
		return false, errDisconnect

	case optList:
		if len(data) != 0 {
			return false, c.optError(opt, repErrInvalid, "NBD_OPT_LIST takes no data")
		}
		c.w.lock()
		for _, e := range c.s.order {
			b := make([]byte, 4, 4+len(e.Name)+len(e.Description))
			be.PutUint32(b, uint32(len(e.Name)))
			b = append(append(b, e.Name...), e.Description...)
			c.optReplyLocked(opt, repServer, b)
		}
		c.optReplyLocked(opt, repAck, nil)
		return false, c.w.unlock()

	case optStartTLS:
		switch {
		case len(data) != 0:
			return false, c.optError(opt, repErrInvalid, "NBD_OPT_STARTTLS takes no data")
		case c.s.TLSConfig == nil:
			return false, c.optError(opt, repErrPolicy, "TLS is not enabled on this server")
		case !c.fixed:
			return false, c.optError(opt, repErrPolicy, "TLS needs fixed newstyle negotiation")
		case c.tls:
			return false, c.optError(opt, repErrInvalid, "TLS is already active")
		}
		if err := c.optReply(opt, repAck, nil); err != nil {
			return false, err
		}
		if c.r.Buffered() != 0 {
			return false, protoErrorf("data sent before the STARTTLS reply")
		}
		tc := tls.Server(c.raw, c.s.TLSConfig)
		if err := tc.Handshake(); err != nil {
			return false, err
		}
		c.nc, c.tls = tc, true
		c.r.Reset(tc)
		c.w.setConn(tc)
		// No state survives the upgrade.
		c.structured, c.metaSet, c.ctxBase, c.ctxDepth, c.metaExport = false, false, false, false, ""
		c.extended = false
		return false, nil

	case optInfo, optGo:
		return c.infoGo(opt, data)

	case optStructuredReply:
		if len(data) != 0 {
			return false, c.optError(opt, repErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		}
		if c.extended {
			return false, c.optError(opt, repErrExtHdrsReqd, "extended headers are negotiated: structured replies would be a downgrade")
		}
		c.structured = true
		return false, c.optReply(opt, repAck, nil)

	case optExtendedHeaders:
		if len(data) != 0 {
			return false, c.optError(opt, repErrInvalid, "NBD_OPT_EXTENDED_HEADERS takes no data")
		}
		// Extended replies are structured replies with longer headers.
		c.extended, c.structured = true, true
		return false, c.optReply(opt, repAck, nil)

	case optListMetaContext, optSetMetaContext:
		return false, c.metaContext(opt, data)
	}
	return false, c.optError(opt, repErrUnsup, "unsupported option")
}

func (c *conn) infoGo(opt uint32, data []byte) (bool, error) {
	if len(data) < 6 {
		return false, c.optError(opt, repErrInvalid, "option data too short")
	}
	nl := be.Uint32(data)
	if uint64(nl) > uint64(len(data)-6) {
		return false, c.optError(opt, repErrInvalid, "export name length exceeds the option")
	}
	name := string(data[4 : 4+nl])
	rest := data[4+nl:]
	nreq := int(be.Uint16(rest))
	if len(rest) != 2+2*nreq {
		return false, c.optError(opt, repErrInvalid, "information request count does not match the option length")
	}
	var wantName, wantDesc bool
	for i := 0; i < nreq; i++ {
		switch be.Uint16(rest[2+2*i:]) {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		}
	}
	e := c.s.lookup(name)
	if e == nil {
		return false, c.optError(opt, repErrUnknown, "unknown export")
	}
	c.w.lock()
	var b [14]byte
	be.PutUint16(b[0:], infoExport)
	be.PutUint64(b[2:], uint64(e.Disk.Size()))
	be.PutUint16(b[10:], c.transmissionFlags(e))
	c.optReplyLocked(opt, repInfo, b[:12])
	if wantName {
		c.optReplyLocked(opt, repInfo, append([]byte{0, infoName}, e.Name...))
	}
	if wantDesc && e.Description != "" {
		c.optReplyLocked(opt, repInfo, append([]byte{0, infoDescription}, e.Description...))
	}
	// Block sizes go out even when not asked for (they are the defaults
	// the spec recommends, so clients that ignore them are fine).
	be.PutUint16(b[0:], infoBlockSize)
	be.PutUint32(b[2:], 1)
	be.PutUint32(b[6:], PreferredBlockSize)
	be.PutUint32(b[10:], c.s.maxPayload)
	c.optReplyLocked(opt, repInfo, b[:14])
	c.optReplyLocked(opt, repAck, nil)
	if err := c.w.unlock(); err != nil {
		return false, err
	}
	if opt == optGo {
		c.startTransmission(e)
		return true, nil
	}
	return false, nil
}

// parseMeta decodes the data of LIST/SET_META_CONTEXT.
func parseMeta(data []byte) (export string, queries []string, ok bool) {
	if len(data) < 4 {
		return "", nil, false
	}
	nl := be.Uint32(data)
	data = data[4:]
	if uint64(nl) > uint64(len(data)) || nl > maxStringLen {
		return "", nil, false
	}
	export, data = string(data[:nl]), data[nl:]
	if len(data) < 4 {
		return "", nil, false
	}
	nq := be.Uint32(data)
	data = data[4:]
	if uint64(nq)*4 > uint64(len(data)) {
		return "", nil, false
	}
	for i := uint32(0); i < nq; i++ {
		if len(data) < 4 {
			return "", nil, false
		}
		ql := be.Uint32(data)
		data = data[4:]
		if uint64(ql) > uint64(len(data)) || ql > maxStringLen {
			return "", nil, false
		}
		queries = append(queries, string(data[:ql]))
		data = data[ql:]
	}
	if len(data) != 0 {
		return "", nil, false
	}
	return export, queries, true
}

func (c *conn) metaContext(opt uint32, data []byte) error {
	set := opt == optSetMetaContext
	if set {
		// SET replaces the selection, also when it fails.
		c.metaSet, c.ctxBase, c.ctxDepth, c.metaExport = false, false, false, ""
	}
	if !c.structured {
		return c.optError(opt, repErrInvalid, "negotiate structured replies first")
	}
	name, queries, ok := parseMeta(data)
	if !ok {
		return c.optError(opt, repErrInvalid, "malformed metadata context request")
	}
	if c.s.lookup(name) == nil {
		return c.optError(opt, repErrUnknown, "unknown export")
	}
	var base, depth bool
	if !set && len(queries) == 0 {
		base, depth = true, true
	}
	for _, q := range queries {
		switch q {
		case ContextBaseAllocation:
			base = true
		case ContextAllocationDepth:
			depth = true
		case "base:":
			base = base || !set
		case "qemu:":
			depth = depth || !set
		}
	}
	c.w.lock()
	id := func(n uint32) uint32 {
		if set {
			return n
		}
		return 0
	}
	if base {
		c.optReplyLocked(opt, repMetaContext, be.AppendUint32(nil, id(ctxIDBaseAllocation)), ContextBaseAllocation)
	}
	if depth {
		c.optReplyLocked(opt, repMetaContext, be.AppendUint32(nil, id(ctxIDAllocationDepth)), ContextAllocationDepth)
	}
	c.optReplyLocked(opt, repAck, nil)
	if set {
		c.metaSet, c.ctxBase, c.ctxDepth, c.metaExport = true, base, depth, name
	}
	return c.w.unlock()
}

// optReplyLocked queues an option reply; the caller holds the writer.
func (c *conn) optReplyLocked(opt, typ uint32, data []byte, more ...string) {
	n := len(data)
	for _, m := range more {
		n += len(m)
	}
	var h [20]byte
	be.PutUint64(h[0:], repMagic)
	be.PutUint32(h[8:], opt)
	be.PutUint32(h[12:], typ)
	be.PutUint32(h[16:], uint32(n))
	c.w.buf = append(c.w.buf, h[:]...)
	c.w.buf = append(c.w.buf, data...)
	for _, m := range more {
		c.w.buf = append(c.w.buf, m...)
	}
}

func (c *conn) optReply(opt, typ uint32, data []byte) error {
	c.w.lock()
	c.optReplyLocked(opt, typ, data)
	return c.w.unlock()
}

// optError sends an error reply with a message; only a failure to send is
// returned.
func (c *conn) optError(opt, typ uint32, msg string) error {
	c.log.Debug("option refused", "option", opt, "reply", typ&^(1<<31), "msg", msg)
	return c.optReply(opt, typ, []byte(msg))
}
