package nbd

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"runtime"
	"testing"
)

// rawClient speaks the transmission phase by hand, one request at a time,
// with buffers allocated once: the allocation count of a run of requests
// is then the server's.
type rawClient struct {
	nc     net.Conn
	r      *bufio.Reader
	ext    bool
	cookie uint64
	hdr    [extendedHeaderSize]byte
	out    []byte // request header and payload
	in     []byte // reply payloads
	last   int    // length of the last chunk's payload (in in)
}

// dialRaw negotiates with the package's client code (structured replies
// or extended headers, both metadata contexts) and returns the connection
// for rawClient.do.
func dialRaw(t testing.TB, sock string, ext bool) *rawClient {
	t.Helper()
	nc, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	c := &Client{nc: nc, r: bufio.NewReaderSize(nc, 1<<20), contexts: map[uint32]string{}}
	hs, err := c.greet()
	if err != nil {
		t.Fatal(err)
	}
	opt := uint32(optStructuredReply)
	if ext {
		opt = optExtendedHeaders
	}
	if _, _, err := c.simpleOption(opt, nil); err != nil {
		t.Fatal(err)
	}
	c.structured, c.extended = true, ext
	if err := c.setMeta("", []string{ContextBaseAllocation, ContextAllocationDepth}); err != nil {
		t.Fatal(err)
	}
	if len(c.contexts) != 2 {
		t.Fatalf("contexts %v", c.contexts)
	}
	if err := c.optGo("", hs); err != nil {
		t.Fatal(err)
	}
	return &rawClient{nc: nc, r: c.r, ext: ext, out: make([]byte, 0, extendedHeaderSize+MaxPayload), in: make([]byte, 4<<20)}
}

// do sends one request (with payload for WRITE) and reads its reply
// chunks up to the last; an error reply or a malformed one is an error.
func (rc *rawClient) do(typ, flags uint16, off, length uint64, payload []byte) error {
	rc.cookie++
	h := rc.hdr[:]
	if rc.ext {
		if typ == cmdWrite {
			flags |= cmdFlagPayloadLen
		}
		be.PutUint32(h[0:], extendedRequestMagic)
		be.PutUint64(h[24:], length)
	} else {
		h = h[:requestHeaderSize]
		be.PutUint32(h[0:], requestMagic)
		be.PutUint32(h[24:], uint32(length))
	}
	be.PutUint16(h[4:], flags)
	be.PutUint16(h[6:], typ)
	be.PutUint64(h[8:], rc.cookie)
	be.PutUint64(h[16:], off)
	rc.out = append(append(rc.out[:0], h...), payload...)
	if _, err := rc.nc.Write(rc.out); err != nil {
		return err
	}
	for {
		var rflags, rtyp uint16
		var n uint64
		if rc.ext {
			if _, err := io.ReadFull(rc.r, h[:extendedHeaderSize]); err != nil {
				return err
			}
			if m := be.Uint32(h); m != extendedReplyMagic {
				return errBadReply
			}
			n = be.Uint64(h[24:])
		} else {
			// A simple reply (16 bytes) or a structured chunk (20).
			if _, err := io.ReadFull(rc.r, h[:simpleReplySize]); err != nil {
				return err
			}
			switch be.Uint32(h) {
			case simpleReplyMagic:
				if be.Uint64(h[8:]) != rc.cookie {
					return errBadReply
				}
				if be.Uint32(h[4:]) != 0 {
					return errReplyError
				}
				return nil
			case structuredMagic:
			default:
				return errBadReply
			}
			if _, err := io.ReadFull(rc.r, h[simpleReplySize:chunkHeaderSize]); err != nil {
				return err
			}
			n = uint64(be.Uint32(h[16:]))
		}
		rflags, rtyp = be.Uint16(h[4:]), be.Uint16(h[6:])
		if be.Uint64(h[8:]) != rc.cookie || n > uint64(len(rc.in)) {
			return errBadReply
		}
		if _, err := io.ReadFull(rc.r, rc.in[:n]); err != nil {
			return err
		}
		rc.last = int(n)
		if rtyp&(1<<15) != 0 {
			return errReplyError
		}
		if rflags&replyFlagDone != 0 {
			return nil
		}
	}
}

var (
	errBadReply   = fmt.Errorf("malformed reply")
	errReplyError = fmt.Errorf("error reply")
)

// TestRequestAllocs checks that the server's request path allocates
// nothing in steady state: READ (inline, through a worker with FUA, and
// sparse with holes), WRITE (small inline, larger with FUA),
// WRITE_ZEROES, TRIM, FLUSH, BLOCK_STATUS and CACHE, with compact and with
// extended headers. The client here allocates nothing per request, so the
// process's allocation count is the server's.
func TestRequestAllocs(t *testing.T) {
	const size = 64 << 20
	// One P from the start: changing GOMAXPROCS empties sync.Pool's
	// per-P caches (the buffer pool), which the warm-up is to fill.
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	rng := rand.New(rand.NewPCG(22, 22))
	// Data in [0, 32 MiB), a hole behind it.
	p := newRaw(t, t.TempDir(), size, map[int64][]byte{0: randBytes(rng, 32<<20)})
	d := openDisk(t, p, false)
	defer d.Close()
	ts := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: d}}})
	w4k := randBytes(rng, 4096)
	w128k := randBytes(rng, 128<<10)
	type op struct {
		name   string
		typ    uint16
		flags  uint16
		region int64 // requests cycle through [region, region+4 MiB)
		length uint64
		data   []byte
		runs   int
	}
	ops := []op{
		{"read 4K", cmdRead, 0, 8 << 20, 4096, nil, 400},
		{"read 4K DF", cmdRead, cmdFlagDF, 8 << 20, 4096, nil, 400},
		{"read 4K FUA", cmdRead, cmdFlagFUA, 8 << 20, 4096, nil, 200},
		{"read 1M sparse", cmdRead, 0, 30 << 20, 1 << 20, nil, 100},
		{"write 4K", cmdWrite, 0, 0, 4096, w4k, 400},
		{"write 128K FUA", cmdWrite, cmdFlagFUA, 0, 128 << 10, w128k, 50},
		{"write zeroes 64K", cmdWriteZeroes, 0, 16 << 20, 64 << 10, nil, 200},
		{"write zeroes 64K no hole", cmdWriteZeroes, cmdFlagNoHole, 20 << 20, 64 << 10, nil, 100},
		{"trim 64K", cmdTrim, 0, 24 << 20, 64 << 10, nil, 200},
		{"flush", cmdFlush, 0, 0, 0, nil, 50},
		{"block status 8M", cmdBlockStatus, 0, 28 << 20, 8 << 20, nil, 200},
		{"block status 4K req one", cmdBlockStatus, cmdFlagReqOne, 8 << 20, 4096, nil, 200},
		{"cache 64K", cmdCache, 0, 8 << 20, 64 << 10, nil, 200},
	}
	for _, ext := range []bool{false, true} {
		rc := dialRaw(t, ts.sock, ext)
		for _, o := range ops {
			name := fmt.Sprintf("%s extended=%v", o.name, ext)
			i := 0
			run := func() {
				off := o.region + int64(i)*int64(max(o.length, 4096))%(4<<20)
				if o.typ == cmdFlush {
					off = 0
				}
				i++
				if err := rc.do(o.typ, o.flags, uint64(off), o.length, o.data); err != nil {
					t.Fatalf("%s at %d: %v", name, off, err)
				}
			}
			// Warm up: pools, scratch lists, worker goroutines, the
			// raw driver's extent cache, the region's holes.
			for range 2 * o.runs {
				run()
			}
			got := mallocsPer(o.runs*allocRunsScale, run)
			if got > allocTolerance {
				t.Errorf("%s: %.2f allocations per request, want 0", name, got)
			} else {
				t.Logf("%s: %.3f allocations per request", name, got)
			}
		}
	}
	// The content is still right after all that.
	want := fileBytes(t, p)
	buf := make([]byte, 1<<20)
	c := ts.dial(t, nil)
	for off := int64(0); off < size; off += int64(len(buf)) {
		if _, err := c.ReadAt(buf, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf, want[off:off+int64(len(buf))]) {
			t.Fatalf("content differs from the file at %d", off)
		}
	}
}

// mallocsPer returns the heap allocations of the whole process per call
// of f over runs calls (as testing.AllocsPerRun, but not rounded down:
// an allocation every other request shows as 0.5).
func mallocsPer(runs int, f func()) float64 {
	var a, b runtime.MemStats
	runtime.ReadMemStats(&a)
	for range runs {
		f()
	}
	runtime.ReadMemStats(&b)
	return float64(b.Mallocs-a.Mallocs) / float64(runs)
}

// TestExtendedStatus64 checks 64-bit block status with extended headers:
// a 6 GiB request on an 8 GiB sparse export is answered whole, with one
// descriptor of 6 GiB per context (BLOCK_STATUS_EXT).
func TestExtendedStatus64(t *testing.T) {
	d := openDisk(t, newRaw(t, t.TempDir(), 8<<30, nil), false)
	defer d.Close()
	ts := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: d}}})
	rc := dialRaw(t, ts.sock, true)
	if err := rc.do(cmdBlockStatus, 0, 1<<30, 6<<30, nil); err != nil {
		t.Fatal(err)
	}
	// The last chunk is qemu:allocation-depth's: id, count, one
	// descriptor (64-bit length, 64-bit flags: depth 1, the raw image).
	if rc.last != 24 {
		t.Fatalf("last block status chunk of %d bytes, want 24 (one descriptor)", rc.last)
	}
	if id, n, l, f := be.Uint32(rc.in), be.Uint32(rc.in[4:]), be.Uint64(rc.in[8:]), be.Uint64(rc.in[16:]); id != ctxIDAllocationDepth || n != 1 || l != 6<<30 || f != 1 {
		t.Fatalf("block status: context %d, %d descriptors, first %d bytes flags %#x; want %d, 1, %d, 1 (a raw hole is the top layer's)", id, n, l, f, ctxIDAllocationDepth, uint64(6<<30))
	}
}
