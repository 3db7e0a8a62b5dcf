package nbd

import (
	"bufio"
	"bytes"
	"net"
	"testing"
	"time"
)

// replyChunk is a structured reply chunk.
func replyChunk(flags, typ uint16, cookie uint64, payload []byte) []byte {
	b := append(u32(structuredMagic), u16(flags)...)
	b = append(b, u16(typ)...)
	b = append(b, u64(cookie)...)
	b = append(b, u32(uint32(len(payload)))...)
	return append(b, payload...)
}

func simpleReply(errno uint32, cookie uint64, data []byte) []byte {
	b := append(u32(simpleReplyMagic), u32(errno)...)
	return append(append(b, u64(cookie)...), data...)
}

// fuzzCalls are the requests a fuzzed reply stream answers: cookies 1 to
// 4 are a read of 4 KiB at 1 MiB, a block status, a write and a read of
// 512 bytes at 0.
func fuzzCalls() map[uint64]*call {
	return map[uint64]*call{
		1: {typ: cmdRead, off: 1 << 20, length: 4096, buf: make([]byte, 4096), done: make(chan struct{})},
		2: {typ: cmdBlockStatus, off: 0, length: 1 << 20, done: make(chan struct{})},
		3: {typ: cmdWrite, off: 0, length: 512, done: make(chan struct{})},
		4: {typ: cmdRead, off: 0, length: 512, buf: make([]byte, 512), done: make(chan struct{})},
	}
}

// FuzzReply feeds a hostile server's transmission replies (simple
// replies, structured chunks, block status and error chunks) to the
// client's reply parser: it must neither panic nor allocate more than
// the bytes it is sent justify, and must end every request.
func FuzzReply(f *testing.F) {
	status := append(u32(ctxIDBaseAllocation), u32(65536)...)
	status = append(status, u32(StateHole|StateZero)...)
	status = append(status, u32(1<<20-65536)...)
	status = append(status, u32(0)...)
	f.Add(bytes.Join([][]byte{
		replyChunk(0, replyTypeOffsetData, 1, append(u64(1<<20), make([]byte, 2048)...)),
		replyChunk(replyFlagDone, replyTypeOffsetHole, 1, append(u64(1<<20+2048), u32(2048)...)),
		replyChunk(replyFlagDone, replyTypeBlockStatus, 2, status),
		simpleReply(0, 3, nil),
		simpleReply(0, 4, make([]byte, 512)),
	}, nil))
	f.Add(bytes.Join([][]byte{
		replyChunk(replyFlagDone, replyTypeError, 1, append(append(u32(EIO), u16(3)...), "bad"...)),
		replyChunk(replyFlagDone, replyTypeErrorOffset, 2, append(append(u32(EINVAL), u16(0)...), u64(5)...)),
		replyChunk(replyFlagDone, replyTypeNone, 3, nil),
		simpleReply(EPERM, 4, nil),
	}, nil))
	f.Add(replyChunk(replyFlagDone, replyTypeOffsetData, 1, append(u64(1<<64-8), make([]byte, 16)...)))
	f.Add(replyChunk(replyFlagDone, replyTypeOffsetHole, 1, append(u64(1<<64-8), u32(16)...)))
	f.Add(replyChunk(replyFlagDone, replyTypeBlockStatus, 2, append(u32(ctxIDBaseAllocation), u32(0)...)))
	f.Add(replyChunk(0, replyTypeBlockStatus, 2, u32(ctxIDBaseAllocation)))
	f.Add(append(u32(structuredMagic), 0, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 2, 0x7f, 0xff, 0xff, 0xff))
	// Extended headers (the first byte of an input picks them when odd).
	ext := func(flags, typ uint16, cookie, off uint64, payload []byte) []byte {
		b := append(u32(extendedReplyMagic), u16(flags)...)
		b = append(b, u16(typ)...)
		b = append(append(b, u64(cookie)...), u64(off)...)
		b = append(b, u64(uint64(len(payload)))...)
		return append(b, payload...)
	}
	extStatus := append(u32(ctxIDBaseAllocation), u32(2)...)
	extStatus = append(append(extStatus, u64(1<<33)...), u64(StateHole|StateZero)...)
	extStatus = append(append(extStatus, u64(4096)...), u64(0)...)
	f.Add(bytes.Join([][]byte{{1},
		ext(0, replyTypeOffsetData, 1, 1<<20, append(u64(1<<20), make([]byte, 4096)...)),
		ext(replyFlagDone, replyTypeNone, 1, 1<<20, nil),
		ext(replyFlagDone, replyTypeBlockStatusExt, 2, 0, extStatus),
		ext(replyFlagDone, replyTypeNone, 3, 0, nil),
		ext(replyFlagDone, replyTypeError, 4, 0, append(u32(EIO), u16(0)...)),
	}, nil))
	f.Add(append([]byte{1}, ext(replyFlagDone, replyTypeBlockStatusExt, 2, 0, append(u32(ctxIDBaseAllocation), u32(1000)...))...))
	f.Add(append([]byte{1}, simpleReply(0, 3, nil)...))
	f.Fuzz(func(t *testing.T, data []byte) {
		a, b := net.Pipe()
		defer b.Close()
		extended := len(data) > 0 && data[0]&1 == 1
		if extended {
			data = data[1:]
		}
		c := &Client{nc: a, r: bufio.NewReader(bytes.NewReader(data)), structured: true, extended: extended,
			contexts: map[uint32]string{ctxIDBaseAllocation: ContextBaseAllocation, ctxIDAllocationDepth: ContextAllocationDepth},
			pending:  fuzzCalls(), closed: make(chan struct{}), loopDone: make(chan struct{})}
		calls := make([]*call, 0, 4)
		for _, cl := range c.pending {
			calls = append(calls, cl)
		}
		done := make(chan struct{})
		go func() { c.readLoop(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("the reply parser hangs on %x", data)
		}
		for _, cl := range calls {
			select {
			case <-cl.done:
			default:
				t.Fatalf("a %s request was never ended", cmdName(cl.typ))
			}
			if cl.err == nil && cl.typ == cmdRead && cl.covered != int64(cl.length) && cl.covered != 0 {
				t.Fatalf("a read ended without error covering %d of %d bytes", cl.covered, cl.length)
			}
			for _, l := range cl.status {
				if len(l) > len(data)/8 {
					t.Fatalf("%d extents from %d bytes", len(l), len(data))
				}
			}
		}
	})
}
