package nbd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"
)

// rawConn speaks the protocol byte by byte, for fault tests.
type rawConn struct {
	nc net.Conn
	r  *bufio.Reader
}

func rawDial(t testing.TB, sock string) *rawConn {
	t.Helper()
	nc, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	return &rawConn{nc: nc, r: bufio.NewReader(nc)}
}

func (rc *rawConn) send(b ...[]byte) error {
	_, err := rc.nc.Write(bytes.Join(b, nil))
	return err
}

func u16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }
func u32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
func u64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

func optBytes(opt uint32, data []byte) []byte {
	return bytes.Join([][]byte{u64(optMagic), u32(opt), u32(uint32(len(data))), data}, nil)
}

func goData(name string, infos ...uint16) []byte {
	b := append(u32(uint32(len(name))), name...)
	b = append(b, u16(uint16(len(infos)))...)
	for _, i := range infos {
		b = append(b, u16(i)...)
	}
	return b
}

func (rc *rawConn) greeting() ([]byte, error) {
	b := make([]byte, 18)
	_, err := io.ReadFull(rc.r, b)
	return b, err
}

// optReply reads one option reply.
func (rc *rawConn) optReply() (opt, typ uint32, data []byte, err error) {
	h := make([]byte, 20)
	if _, err = io.ReadFull(rc.r, h); err != nil {
		return
	}
	if binary.BigEndian.Uint64(h) != repMagic {
		return 0, 0, nil, fmt.Errorf("bad reply magic % x", h[:8])
	}
	opt, typ = binary.BigEndian.Uint32(h[8:]), binary.BigEndian.Uint32(h[12:])
	data = make([]byte, binary.BigEndian.Uint32(h[16:]))
	_, err = io.ReadFull(rc.r, data)
	return
}

// negotiate enters the transmission phase with NBD_OPT_GO.
func (rc *rawConn) negotiate(t testing.TB, structured bool, export string) {
	t.Helper()
	if _, err := rc.greeting(); err != nil {
		t.Fatal(err)
	}
	msgs := [][]byte{u32(clientFixedNewstyle | clientNoZeroes)}
	if structured {
		msgs = append(msgs, optBytes(optStructuredReply, nil))
	}
	msgs = append(msgs, optBytes(optGo, goData(export)))
	if err := rc.send(msgs...); err != nil {
		t.Fatal(err)
	}
	for {
		_, typ, _, err := rc.optReply()
		if err != nil {
			t.Fatal(err)
		}
		if typ == repAck {
			if !structured {
				return
			}
			structured = false // the first ACK was STRUCTURED_REPLY's
			continue
		}
		if typ&(1<<31) != 0 {
			t.Fatalf("option refused: %#x", typ)
		}
	}
}

func reqBytes(typ, flags uint16, cookie, off uint64, length uint32) []byte {
	return bytes.Join([][]byte{u32(requestMagic), u16(flags), u16(typ), u64(cookie), u64(off), u32(length)}, nil)
}

func (rc *rawConn) request(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) error {
	return rc.send(reqBytes(typ, flags, cookie, off, length), payload)
}

// simpleReply reads a simple reply (and n bytes of data when errno is 0).
func (rc *rawConn) simpleReply(n int) (errno uint32, cookie uint64, data []byte, err error) {
	h := make([]byte, 16)
	if _, err = io.ReadFull(rc.r, h); err != nil {
		return
	}
	if binary.BigEndian.Uint32(h) != simpleReplyMagic {
		return 0, 0, nil, fmt.Errorf("not a simple reply: % x", h[:4])
	}
	errno, cookie = binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
	if errno == 0 && n > 0 {
		data = make([]byte, n)
		_, err = io.ReadFull(rc.r, data)
	}
	return
}

type rawChunk struct {
	flags, typ uint16
	cookie     uint64
	payload    []byte
}

func (rc *rawConn) chunk() (rawChunk, error) {
	h := make([]byte, 20)
	if _, err := io.ReadFull(rc.r, h); err != nil {
		return rawChunk{}, err
	}
	if binary.BigEndian.Uint32(h) != structuredMagic {
		return rawChunk{}, fmt.Errorf("not a structured chunk: % x", h[:4])
	}
	c := rawChunk{flags: binary.BigEndian.Uint16(h[4:]), typ: binary.BigEndian.Uint16(h[6:]), cookie: binary.BigEndian.Uint64(h[8:])}
	c.payload = make([]byte, binary.BigEndian.Uint32(h[16:]))
	_, err := io.ReadFull(rc.r, c.payload)
	return c, err
}

// expectClosed checks that the server ends the connection.
func (rc *rawConn) expectClosed(t *testing.T, what string) {
	t.Helper()
	rc.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := io.Copy(io.Discard, rc.r)
	if err != nil {
		t.Errorf("%s: connection not closed cleanly by the server: %v", what, err)
	}
}

// alive checks that the server still serves a normal client correctly.
func alive(t *testing.T, ts *testServer, wantAt int64, want []byte) {
	t.Helper()
	c := ts.dial(t, nil)
	got := make([]byte, len(want))
	if _, err := c.ReadAt(got, wantAt); err != nil {
		t.Fatalf("server unusable: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("data at %d changed", wantAt)
	}
	c.Close()
}

func TestTruncatedHandshakes(t *testing.T) {
	marker := []byte("marker data")
	p := newRaw(t, t.TempDir(), 1<<20, map[int64][]byte{0: marker})
	d := openDisk(t, p, false)
	defer d.Close()
	ts := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: d}}})
	full := bytes.Join([][]byte{
		u32(clientFixedNewstyle | clientNoZeroes),
		optBytes(optStructuredReply, nil),
		optBytes(optSetMetaContext, append(append(append(u32(0), u32(1)...), u32(uint32(len(ContextBaseAllocation)))...), ContextBaseAllocation...)),
		optBytes(optGo, goData("", infoBlockSize)),
		reqBytes(cmdRead, 0, 1, 0, 512),
	}, nil)
	for cut := 0; cut < len(full); cut++ {
		rc := rawDial(t, ts.sock)
		if _, err := rc.greeting(); err != nil {
			t.Fatal(err)
		}
		if err := rc.send(full[:cut]); err != nil {
			t.Fatal(err)
		}
		rc.nc.Close()
	}
	alive(t, ts, 0, marker)
}

func TestMalformed(t *testing.T) {
	marker := []byte("marker data")
	p := newRaw(t, t.TempDir(), 1<<20, map[int64][]byte{0: marker})
	d := openDisk(t, p, false)
	defer d.Close()
	ts := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: d}}})

	t.Run("unknown client flags", func(t *testing.T) {
		rc := rawDial(t, ts.sock)
		rc.greeting()
		rc.send(u32(1 << 7))
		rc.expectClosed(t, "unknown client flags")
	})
	t.Run("bad option magic", func(t *testing.T) {
		rc := rawDial(t, ts.sock)
		rc.greeting()
		rc.send(u32(clientFixedNewstyle), u64(0x1234), u32(optGo), u32(0))
		rc.expectClosed(t, "bad option magic")
	})
	t.Run("huge option", func(t *testing.T) {
		rc := rawDial(t, ts.sock)
		rc.greeting()
		rc.send(u32(clientFixedNewstyle), u64(optMagic), u32(optGo), u32(0xffffffff))
		rc.expectClosed(t, "huge option")
	})
	t.Run("unknown option", func(t *testing.T) {
		rc := rawDial(t, ts.sock)
		rc.greeting()
		rc.send(u32(clientFixedNewstyle), optBytes(99, []byte("whatever")), optBytes(0x100, nil), optBytes(optPeekExport, nil))
		for _, o := range []uint32{99, 0x100, optPeekExport} {
			opt, typ, _, err := rc.optReply()
			if err != nil || opt != o || typ != repErrUnsup {
				t.Errorf("option %d: reply %d %#x %v", o, opt, typ, err)
			}
		}
		// Bad GO payloads are refused, not fatal.
		rc.send(optBytes(optGo, []byte{0, 0, 0, 9, 'a'}), optBytes(optGo, append(goData("x"), 0)), optBytes(optList, []byte{1}),
			optBytes(optSetMetaContext, []byte{0, 0, 0, 0, 0, 0, 0, 1}), optBytes(optStructuredReply, []byte{1}))
		for i, want := range []uint32{repErrInvalid, repErrInvalid, repErrInvalid, repErrInvalid, repErrInvalid} {
			_, typ, _, err := rc.optReply()
			if err != nil || typ != want {
				t.Errorf("bad option %d: reply %#x %v", i, typ, err)
			}
		}
		rc.send(optBytes(optAbort, nil))
		if _, typ, _, err := rc.optReply(); err != nil || typ != repAck {
			t.Errorf("abort: %#x %v", typ, err)
		}
		rc.expectClosed(t, "abort")
	})
	t.Run("export name unknown", func(t *testing.T) {
		rc := rawDial(t, ts.sock)
		rc.greeting()
		rc.send(u32(clientFixedNewstyle), optBytes(optExportName, []byte("nope")))
		rc.expectClosed(t, "unknown export")
	})
	t.Run("export name zeroes", func(t *testing.T) {
		rc := rawDial(t, ts.sock)
		rc.greeting()
		rc.send(u32(clientFixedNewstyle), optBytes(optExportName, nil))
		b := make([]byte, 10+124)
		if _, err := io.ReadFull(rc.r, b); err != nil {
			t.Fatal(err)
		}
		if binary.BigEndian.Uint64(b) != 1<<20 || !bytes.Equal(b[10:], make([]byte, 124)) {
			t.Errorf("export reply % x", b)
		}
		rc.request(cmdRead, 0, 5, 0, uint32(len(marker)), nil)
		errno, cookie, data, err := rc.simpleReply(len(marker))
		if err != nil || errno != 0 || cookie != 5 || !bytes.Equal(data, marker) {
			t.Errorf("read after EXPORT_NAME: %d %d %q %v", errno, cookie, data, err)
		}
	})
	t.Run("bad request magic", func(t *testing.T) {
		rc := rawDial(t, ts.sock)
		rc.negotiate(t, false, "")
		rc.send(bytes.Repeat([]byte{0xee}, 28))
		rc.expectClosed(t, "bad request magic")
	})
	t.Run("oversized write", func(t *testing.T) {
		rc := rawDial(t, ts.sock)
		rc.negotiate(t, false, "")
		rc.request(cmdWrite, 0, 7, 0, 0xffffffff, nil)
		errno, cookie, _, err := rc.simpleReply(0)
		if err != nil || errno != EINVAL || cookie != 7 {
			t.Errorf("oversized write: errno %d cookie %d %v", errno, cookie, err)
		}
		rc.expectClosed(t, "oversized write")
	})
	t.Run("oversized read keeps the connection", func(t *testing.T) {
		rc := rawDial(t, ts.sock)
		rc.negotiate(t, true, "")
		rc.request(cmdRead, 0, 8, 0, 0xffffffff, nil)
		c, err := rc.chunk()
		if err != nil || c.typ != replyTypeError || c.cookie != 8 || c.flags&replyFlagDone == 0 || binary.BigEndian.Uint32(c.payload) != EOVERFLOW {
			t.Errorf("oversized read: %+v %v", c, err)
		}
		rc.request(cmdRead, 0, 9, 0, 11, nil)
		c, err = rc.chunk()
		if err != nil || c.typ != replyTypeOffsetData || c.cookie != 9 || !bytes.Equal(c.payload[8:], marker) {
			t.Errorf("read after oversized read: %+v %v", c, err)
		}
	})
	t.Run("disconnect mid-write", func(t *testing.T) {
		rc := rawDial(t, ts.sock)
		rc.negotiate(t, false, "")
		rc.request(cmdWrite, 0, 1, 0, 1<<20, bytes.Repeat([]byte{0xff}, 1000))
		rc.nc.Close()
	})
	t.Run("structured sparse read", func(t *testing.T) {
		rc := rawDial(t, ts.sock)
		rc.negotiate(t, true, "")
		rc.request(cmdRead, 0, 10, 0, 1<<20, nil)
		var data, hole int
		for {
			c, err := rc.chunk()
			if err != nil {
				t.Fatal(err)
			}
			switch c.typ {
			case replyTypeOffsetData:
				data += len(c.payload) - 8
			case replyTypeOffsetHole:
				hole += int(binary.BigEndian.Uint32(c.payload[8:]))
			default:
				t.Fatalf("chunk type %d", c.typ)
			}
			if c.flags&replyFlagDone != 0 {
				break
			}
		}
		if data+hole != 1<<20 || hole < 1<<19 {
			t.Errorf("sparse read: %d data bytes, %d hole bytes", data, hole)
		}
	})
	alive(t, ts, 0, marker)
}

// TestManyConnections: 64 clients at once, each with pipelined mixed
// requests on its own region; the server stays up and the image ends up
// exactly as the model says.
func TestManyConnections(t *testing.T) {
	const (
		conns  = 64
		region = 256 << 10
		size   = conns * region
	)
	p := newRaw(t, t.TempDir(), size, nil)
	d := openDisk(t, p, false)
	defer d.Close()
	ts := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: d}}})
	want := make([]byte, size)
	var wg sync.WaitGroup
	errs := make(chan error, conns)
	for i := 0; i < conns; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			c, err := Dial(ctx, "unix", ts.sock, &ClientOptions{NoStructuredReplies: i%2 == 0, MetaContexts: []string{ContextBaseAllocation}})
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			r := mrand.New(mrand.NewPCG(uint64(i), 3))
			base := int64(i) * region
			mine := want[base : base+region]
			var pw sync.WaitGroup
			var mu sync.Mutex
			// 4 pipelined streams per connection over quarters of the region.
			for s := 0; s < 4; s++ {
				pw.Add(1)
				q := region / 4
				rr := mrand.New(mrand.NewPCG(r.Uint64(), uint64(s)))
				go func(s int) {
					defer pw.Done()
					lo := int64(s * q)
					for k := 0; k < 16; k++ {
						off := lo + rr.Int64N(int64(q-1))
						n := 1 + rr.Int64N(int64(q)-(off-lo))
						var err error
						switch rr.IntN(6) {
						case 0, 1:
							b := randBytes(rr, int(n))
							_, err = c.WriteAt(b, base+off)
							mu.Lock()
							copy(mine[off:], b)
							mu.Unlock()
						case 2:
							err = c.WriteZeroes(base+off, uint32(n), 0)
							mu.Lock()
							clear(mine[off : off+n])
							mu.Unlock()
						case 3:
							got := make([]byte, n)
							_, err = c.ReadAt(got, base+off)
							mu.Lock()
							if err == nil && !bytes.Equal(got, mine[off:off+n]) {
								err = errors.New("read differs")
							}
							mu.Unlock()
						case 4:
							err = c.Flush()
						case 5:
							if c.Structured() {
								_, err = c.BlockStatus(base+off, uint32(n), 0)
							}
						}
						if err != nil {
							errs <- fmt.Errorf("conn %d: %w", i, err)
							return
						}
					}
				}(s)
			}
			pw.Wait()
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(fileBytes(t, p), want) {
		t.Fatal("image differs from the model")
	}
	alive(t, ts, 0, want[:100])
}
