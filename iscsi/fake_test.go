package iscsi

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeTarget is a minimal in-process target for the behaviours a real
// tgtd cannot be made to show: sense data on demand, silence, a tiny
// CmdSN window, target-initiated NOP-In.
type fakeTarget struct {
	t      *testing.T
	l      net.Listener
	blocks int
	disk   []byte
	window uint32 // commands the target accepts at once

	mu sync.Mutex
	// answer may override a command: return handled=true after writing
	// the reply itself (or to stay silent).
	answer     func(fc *fakeConn, p *PDU) bool
	tmfs       []byte
	tmfResp    map[byte]byte // task management function -> response
	nopReplies []uint32
	inFlight   int32
	maxFlight  int32
}

type fakeConn struct {
	ft        *fakeTarget
	nc        net.Conn
	wmu       sync.Mutex
	statSN    uint32
	expCmdSN  uint32
	base      uint32 // the CmdSN of the login
	completed atomic.Uint32
}

func newFakeTarget(t *testing.T, blocks int) *fakeTarget {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ft := &fakeTarget{t: t, l: l, blocks: blocks, disk: make([]byte, blocks*512), window: 16}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			nc, err := l.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { nc.Close() })
			go ft.serve(nc)
		}
	}()
	return ft
}

func (ft *fakeTarget) config() Config {
	return Config{Portal: ft.l.Addr().String(), Target: "iqn.fake:t", Timeout: time.Second, KeepAlive: -1}
}

func (fc *fakeConn) send(p *PDU, status bool) {
	fc.wmu.Lock()
	defer fc.wmu.Unlock()
	p.put32(24, fc.statSN)
	if status {
		fc.statSN++
	}
	p.put32(28, fc.expCmdSN)
	// The window opens as commands complete, not as they arrive.
	p.put32(32, fc.base+fc.completed.Load()+fc.ft.window-1)
	b, _ := p.Marshal(Digests{})
	fc.nc.Write(b)
}

func (ft *fakeTarget) serve(nc net.Conn) {
	fc := &fakeConn{ft: ft, nc: nc}
	for {
		p, err := ReadPDU(nc, Digests{}, 1<<20)
		if err != nil {
			return
		}
		switch p.Opcode() {
		case OpLoginReq:
			fc.expCmdSN = p.u32(24)
			fc.base = fc.expCmdSN
			r := &PDU{}
			r.BHS[0] = OpLoginResp
			csg := p.BHS[1] >> 2 & 3
			r.BHS[1] = 0x80 | csg<<2 | p.BHS[1]&3
			copy(r.BHS[8:14], p.BHS[8:14])
			r.BHS[14] = 1
			r.put32(16, p.ITT())
			if csg == 0 {
				r.Data = EncodeText([]KV{{"AuthMethod", "None"}})
			} else {
				r.Data = EncodeText([]KV{{"HeaderDigest", "None"}, {"DataDigest", "None"}, {"MaxRecvDataSegmentLength", "4096"},
					{"InitialR2T", "Yes"}, {"ImmediateData", "No"}, {"MaxBurstLength", "16384"}, {"FirstBurstLength", "8192"}})
			}
			fc.send(r, true)
		case OpSCSICmd:
			if !p.Immediate() {
				fc.wmu.Lock()
				fc.expCmdSN++
				fc.wmu.Unlock()
			}
			n := atomic.AddInt32(&ft.inFlight, 1)
			ft.mu.Lock()
			ft.maxFlight = max(ft.maxFlight, n)
			ans := ft.answer
			ft.mu.Unlock()
			if ans != nil && ans(fc, p) {
				continue
			}
			go fc.execute(p)
		case OpDataOut:
			fc.dataOut(p)
		case OpTaskMgmt:
			ft.mu.Lock()
			ft.tmfs = append(ft.tmfs, p.BHS[1]&0x7f)
			resp := ft.tmfResp[p.BHS[1]&0x7f]
			ft.mu.Unlock()
			r := &PDU{}
			r.BHS[0] = OpTaskResp
			r.BHS[1] = 0x80
			r.BHS[2] = resp
			r.put32(16, p.ITT())
			fc.send(r, true)
		case OpNOPOut:
			if p.ITT() == reservedTag {
				ft.mu.Lock()
				ft.nopReplies = append(ft.nopReplies, p.u32(20))
				ft.mu.Unlock()
			}
		case OpLogoutReq:
			r := &PDU{}
			r.BHS[0] = OpLogoutResp
			r.BHS[1] = 0x80
			r.put32(16, p.ITT())
			fc.send(r, true)
			return
		}
	}
}

var writes sync.Map // ITT -> *pendingWrite (one fake target per test)

type pendingWrite struct {
	lba  uint64
	buf  []byte
	got  int
	cmd  *PDU
	done chan struct{}
}

func (fc *fakeConn) dataOut(p *PDU) {
	v, ok := writes.Load(p.ITT())
	if !ok {
		return
	}
	w := v.(*pendingWrite)
	copy(w.buf[p.u32(40):], p.Data)
	w.got += len(p.Data)
	if w.got == len(w.buf) {
		close(w.done)
	}
}

func (fc *fakeConn) respond(cmd *PDU, status byte, sense []byte) {
	r := &PDU{}
	r.BHS[0] = OpSCSIResp
	r.BHS[1] = 0x80
	r.BHS[3] = status
	r.put32(16, cmd.ITT())
	if sense != nil {
		r.Data = binary.BigEndian.AppendUint16(nil, uint16(len(sense)))
		r.Data = append(r.Data, sense...)
	}
	atomic.AddInt32(&fc.ft.inFlight, -1)
	fc.completed.Add(1)
	fc.send(r, true)
}

func (fc *fakeConn) execute(p *PDU) {
	ft := fc.ft
	cdb := p.BHS[32:48]
	switch cdb[0] {
	case 0x12: // INQUIRY
		if cdb[1]&1 != 0 {
			fc.respond(p, StatusCheckCondition, fixedSense(SenseIllegalRequest, 0x24))
			return
		}
		d := make([]byte, 36)
		copy(d[8:], "FAKE    DISK            0001")
		fc.dataIn(p, d, true)
	case 0x9e: // READ CAPACITY(16)
		d := make([]byte, 32)
		binary.BigEndian.PutUint64(d, uint64(ft.blocks-1))
		binary.BigEndian.PutUint32(d[8:], 512)
		fc.dataIn(p, d, true)
	case 0x88: // READ(16)
		lba := binary.BigEndian.Uint64(cdb[2:])
		n := binary.BigEndian.Uint32(cdb[10:])
		ft.mu.Lock()
		d := append([]byte(nil), ft.disk[lba*512:(lba+uint64(n))*512]...)
		ft.mu.Unlock()
		fc.dataIn(p, d, true)
	case 0x8a: // WRITE(16): R2T for everything (ImmediateData=No)
		lba := binary.BigEndian.Uint64(cdb[2:])
		n := binary.BigEndian.Uint32(cdb[10:])
		w := &pendingWrite{lba: lba, buf: make([]byte, n*512), done: make(chan struct{})}
		writes.Store(p.ITT(), w)
		for off, sn := 0, uint32(0); off < len(w.buf); off, sn = off+16384, sn+1 {
			r := &PDU{}
			r.BHS[0] = OpR2T
			r.BHS[1] = 0x80
			r.put32(16, p.ITT())
			r.put32(20, 0x1000+sn)
			r.put32(36, sn)
			r.put32(40, uint32(off))
			r.put32(44, uint32(min(16384, len(w.buf)-off)))
			fc.send(r, false)
		}
		<-w.done
		writes.Delete(p.ITT())
		ft.mu.Lock()
		copy(ft.disk[lba*512:], w.buf)
		ft.mu.Unlock()
		fc.respond(p, StatusGood, nil)
	default:
		fc.respond(p, StatusCheckCondition, fixedSense(SenseIllegalRequest, 0x20))
	}
}

// dataIn sends d in Data-In PDUs of 4 KiB, the last with status.
func (fc *fakeConn) dataIn(cmd *PDU, d []byte, withStatus bool) {
	want := int(cmd.u32(20))
	d = d[:min(len(d), want)]
	for off, sn := 0, uint32(0); ; sn++ {
		k := min(4096, len(d)-off)
		r := &PDU{Data: d[off : off+k]}
		r.BHS[0] = OpDataIn
		r.put32(16, cmd.ITT())
		r.put32(20, reservedTag)
		r.put32(36, sn)
		r.put32(40, uint32(off))
		off += k
		last := off == len(d)
		if last && withStatus {
			r.BHS[1] = 0x81
			if len(d) < want {
				r.BHS[1] |= 0x02
				r.put32(44, uint32(want-len(d)))
			}
			atomic.AddInt32(&fc.ft.inFlight, -1)
			fc.completed.Add(1)
		}
		fc.send(r, last && withStatus)
		if last {
			return
		}
	}
}

func fixedSense(key, asc byte) []byte {
	s := make([]byte, 18)
	s[0] = 0x70
	s[2] = key
	s[7] = 10
	s[12] = asc
	return s
}

func descSense(key, asc, ascq byte, lba uint64) []byte {
	s := []byte{0x72, key, asc, ascq, 0, 0, 0, 12, 0, 10, 0x80, 0}
	return binary.BigEndian.AppendUint64(s, lba)
}

func TestFakeReadWriteR2T(t *testing.T) {
	ft := newFakeTarget(t, 2048)
	ctx := context.Background()
	s, err := Dial(ctx, ft.config())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	d, err := OpenDisk(ctx, s, 0)
	if err != nil {
		t.Fatal(err)
	}
	if d.Blocks != 2048 || d.Inquiry.Vendor != "FAKE" {
		t.Fatalf("%+v", d)
	}
	// Many writers at once through a window of 16 commands: each write
	// goes out as R2T-driven Data-Out of at most 4 KiB PDUs.
	var wg sync.WaitGroup
	for i := 0; i < 32; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := bytes.Repeat([]byte{byte(i + 1)}, 32<<10)
			if err := d.Write(ctx, uint64(i*64), buf); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	got := make([]byte, 1<<20)
	if err := d.Read(ctx, 0, got); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 32; i++ {
		if got[i*32<<10] != byte(i+1) || got[(i+1)*32<<10-1] != byte(i+1) {
			t.Fatalf("block run %d wrong", i)
		}
	}
	if ft.maxFlight < 2 || ft.maxFlight > int32(ft.window) {
		t.Fatalf("%d commands in flight at most (window %d)", ft.maxFlight, ft.window)
	}
	p := s.Params()
	if p.MaxXmitDataSegmentLength != 4096 || p.ImmediateData || !p.InitialR2T {
		t.Fatalf("params %+v", p)
	}
}

func TestFakeWindowOfOne(t *testing.T) {
	ft := newFakeTarget(t, 256)
	ft.window = 1
	ctx := context.Background()
	s, err := Dial(ctx, ft.config())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	d, err := OpenDisk(ctx, s, 0)
	if err != nil {
		t.Fatal(err)
	}
	// The fake target never opens the window past ExpCmdSN, so the
	// initiator must wait for each answer before the next command.
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := d.Read(ctx, uint64(i), make([]byte, 512)); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if ft.maxFlight != 1 {
		t.Fatalf("%d in flight with a window of one", ft.maxFlight)
	}
}

func TestFakeSense(t *testing.T) {
	ft := newFakeTarget(t, 256)
	ctx := context.Background()
	s, err := Dial(ctx, ft.config())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	d, err := OpenDisk(ctx, s, 0)
	if err != nil {
		t.Fatal(err)
	}
	var uas atomic.Int32
	ft.mu.Lock()
	ft.answer = func(fc *fakeConn, p *PDU) bool {
		cdb := p.BHS[32:48]
		lba := binary.BigEndian.Uint64(cdb[2:])
		switch {
		case cdb[0] == 0x88 && lba == 1 && uas.Add(1) <= 2:
			fc.respond(p, StatusCheckCondition, fixedSense(SenseUnitAttention, 0x29))
		case cdb[0] == 0x88 && lba == 2:
			fc.respond(p, StatusCheckCondition, descSense(SenseMediumError, 0x11, 0, 2))
		case cdb[0] == 0x8a && lba == 3:
			fc.respond(p, StatusCheckCondition, fixedSense(SenseDataProtect, 0x27))
		case cdb[0] == 0x88 && lba == 4:
			fc.respond(p, StatusBusy, nil)
		case cdb[0] == 0x88 && lba == 5:
			// Data-In with status that stops short, without a residual.
			fc.dataIn(p, make([]byte, 256), false)
			r := &PDU{}
			r.BHS[0] = OpSCSIResp
			r.BHS[1] = 0x80
			r.put32(16, p.ITT())
			atomic.AddInt32(&fc.ft.inFlight, -1)
			fc.completed.Add(1)
			fc.send(r, true)
		default:
			return false
		}
		return true
	}
	ft.mu.Unlock()
	buf := make([]byte, 512)
	if err := d.Read(ctx, 1, buf); err != nil {
		t.Fatalf("UNIT ATTENTION was not retried: %v", err)
	}
	err = d.Read(ctx, 2, buf)
	var se *StatusError
	if !errors.Is(err, ErrMediumError) || !errors.As(err, &se) || !se.Sense.InfoValid || se.Sense.Info != 2 {
		t.Fatalf("medium error: %v", err)
	}
	t.Logf("medium error reads: %v", err)
	if err := d.Write(ctx, 3, buf); !errors.Is(err, ErrWriteProtected) {
		t.Fatalf("write protected: %v", err)
	}
	if err := d.Read(ctx, 4, buf); err == nil || err.Error() != "iscsi: target busy" {
		t.Fatalf("busy: %v", err)
	}
	if err := d.Read(ctx, 5, buf); !errors.Is(err, ErrProtocol) {
		t.Fatalf("short Data-In: %v", err)
	}
}

// A command the target never answers is aborted with ABORT TASK and
// fails with ErrTimeout; the session stays usable.
func TestFakeTimeoutAborts(t *testing.T) {
	ft := newFakeTarget(t, 256)
	cfg := ft.config()
	cfg.Timeout = 200 * time.Millisecond
	ctx := context.Background()
	s, err := Dial(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	d, err := OpenDisk(ctx, s, 0)
	if err != nil {
		t.Fatal(err)
	}
	ft.mu.Lock()
	ft.answer = func(fc *fakeConn, p *PDU) bool {
		return p.BHS[32] == 0x88 && binary.BigEndian.Uint64(p.BHS[34:]) == 7
	}
	ft.mu.Unlock()
	if err := d.Read(ctx, 7, make([]byte, 512)); !errors.Is(err, ErrTimeout) {
		t.Fatalf("silent target: %v", err)
	}
	ft.mu.Lock()
	tmfs := append([]byte(nil), ft.tmfs...)
	ft.mu.Unlock()
	if len(tmfs) != 1 || tmfs[0] != tmfAbortTask {
		t.Fatalf("task management sent: %v", tmfs)
	}
	if err := d.Read(ctx, 8, make([]byte, 512)); err != nil {
		t.Fatalf("after the abort: %v", err)
	}
	// A target that rejects ABORT TASK gets a LUN reset; one that
	// rejects both loses the connection, and the next command logs in
	// again.
	for _, c := range []struct {
		resp map[byte]byte
		tmfs []byte
		reco int
	}{
		{map[byte]byte{tmfAbortTask: 5}, []byte{tmfAbortTask, tmfLUNReset}, 0},
		{map[byte]byte{tmfAbortTask: 5, tmfLUNReset: 5}, []byte{tmfAbortTask, tmfLUNReset}, 1},
	} {
		ft.mu.Lock()
		ft.tmfs, ft.tmfResp = nil, c.resp
		ft.mu.Unlock()
		if err := d.Read(ctx, 7, make([]byte, 512)); !errors.Is(err, ErrTimeout) {
			t.Fatalf("silent target: %v", err)
		}
		ft.mu.Lock()
		tmfs := append([]byte(nil), ft.tmfs...)
		ft.mu.Unlock()
		if !bytes.Equal(tmfs, c.tmfs) {
			t.Fatalf("task management sent: %v, want %v", tmfs, c.tmfs)
		}
		if err := d.Read(ctx, 8, make([]byte, 512)); err != nil {
			t.Fatalf("after the reset: %v", err)
		}
		if s.Reconnects() != c.reco {
			t.Fatalf("%d reconnects, want %d", s.Reconnects(), c.reco)
		}
	}
}

// A NOP-In carrying a Target Transfer Tag is answered with a NOP-Out
// echoing it.
func TestFakeNOPIn(t *testing.T) {
	ft := newFakeTarget(t, 16)
	ctx := context.Background()
	var conn *fakeConn
	ft.mu.Lock()
	ft.answer = func(fc *fakeConn, p *PDU) bool {
		ft.mu.Lock()
		conn = fc
		ft.mu.Unlock()
		return false
	}
	ft.mu.Unlock()
	s, err := Dial(ctx, ft.config())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := OpenDisk(ctx, s, 0); err != nil {
		t.Fatal(err)
	}
	n := &PDU{}
	n.BHS[0] = OpNOPIn
	n.BHS[1] = 0x80
	n.put32(16, reservedTag)
	n.put32(20, 0xabcd)
	ft.mu.Lock()
	fc := conn
	ft.mu.Unlock()
	fc.send(n, false)
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		ft.mu.Lock()
		got := append([]uint32(nil), ft.nopReplies...)
		ft.mu.Unlock()
		if len(got) == 1 && got[0] == 0xabcd {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatal("no NOP-Out answered the NOP-In")
}

// A silent connection is pinged with NOP-Out; with no answer it is
// dropped and the next command logs in again.
func TestFakeKeepAlive(t *testing.T) {
	ft := newFakeTarget(t, 16)
	cfg := ft.config()
	cfg.KeepAlive = 100 * time.Millisecond
	cfg.Timeout = 100 * time.Millisecond
	ctx := context.Background()
	s, err := Dial(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// The fake target never answers pings (ITT set), so after
	// KeepAlive+Timeout the connection is dropped.
	time.Sleep(500 * time.Millisecond)
	if _, err := OpenDisk(ctx, s, 0); err != nil {
		t.Fatal(err)
	}
	if s.Reconnects() != 1 {
		t.Fatalf("%d reconnects", s.Reconnects())
	}
}
