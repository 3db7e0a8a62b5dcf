package nbdstore

import (
	"context"
	"io"
	"sync"
	"sync/atomic"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/nbd"
)

// defaultMaxIO is the payload limit when the server advertises none (the
// specification's 32 MiB).
const defaultMaxIO = 32 << 20

// maxZeroLen bounds one WRITE_ZEROES or BLOCK_STATUS request (a 32-bit
// length field).
const maxZeroLen = 1 << 30

// File is an open NBD export. It implements driver.File,
// driver.HoleSeeker, driver.AllocationReporter and driver.ZeroRanger, and
// is safe for concurrent use.
type File struct {
	cfg *config
	t   *target
	rw  bool

	// From the first connection; reconnects must agree.
	size       int64
	flags      uint16
	minBS      int64 // 1 when the server advertised none
	maxIO      int64
	allocation bool // base:allocation was negotiated
	depth      bool // qemu:allocation-depth too (first connection)
	extended   bool // extended headers were negotiated (first connection)

	slots []*slot
	next  atomic.Uint64

	ctx    context.Context // ended by Close
	cancel context.CancelFunc
	closed atomic.Bool
	// onClose, if set, runs once at Close (the storage forgets the file).
	onClose func()

	rmw sync.Mutex // serialises read-modify-writes of partial blocks

	gen    atomic.Uint64 // counts modifications (status cache validity)
	stMu   sync.Mutex
	status statusCache

	statusRequests atomic.Int64
}

func openFile(cfg *config, t *target, rw bool) (*File, error) {
	f := &File{cfg: cfg, t: t, rw: rw}
	f.ctx, f.cancel = context.WithCancel(context.Background())
	c, err := dialFirst(f.ctx, cfg, t)
	if err != nil {
		f.cancel()
		return nil, openError(t, err)
	}
	f.size, f.flags = c.Size(), c.Flags()
	if f.size < 0 {
		c.Close()
		f.cancel()
		return nil, driver.Corruptf(t.url, -1, "the server reports an export size of %d bytes", uint64(f.size))
	}
	if rw && f.flags&nbd.TFlagReadOnly != 0 {
		c.Close()
		f.cancel()
		return nil, driver.Errorf(driver.ErrReadOnly, t.url, -1, "the NBD export is read-only: open it read-only")
	}
	minBS, _, maxBS := c.BlockSizes()
	f.minBS, f.maxIO = 1, defaultMaxIO
	// The specification bounds the minimum to a power of two up to 64 KiB.
	if minBS > 1 && minBS <= 64<<10 && minBS&(minBS-1) == 0 {
		f.minBS = int64(minBS)
	}
	if maxBS > 0 && int64(maxBS) < f.maxIO {
		f.maxIO = max(int64(maxBS)/f.minBS*f.minBS, f.minBS)
	}
	_, f.allocation = contextID(c, nbd.ContextBaseAllocation)
	_, f.depth = contextID(c, nbd.ContextAllocationDepth)
	f.depth = f.depth && f.allocation
	f.extended = c.Extended()
	n := 1
	if f.flags&nbd.TFlagCanMultiConn != 0 {
		n = cfg.multiConn
	}
	f.slots = make([]*slot, n)
	for i := range f.slots {
		f.slots[i] = &slot{}
	}
	f.slots[0].c = c
	cfg.log.Debug("nbd: connected", "url", t.url, "size", f.size, "flags", f.flags, "connections", n, "min-block", f.minBS, "max-payload", f.maxIO, "base:allocation", f.allocation, "qemu:allocation-depth", f.depth, "extended-headers", f.extended)
	return f, nil
}

func contextID(c *nbd.Client, name string) (uint32, bool) {
	for id, n := range c.Contexts() {
		if n == name {
			return id, true
		}
	}
	return 0, false
}

// Name is the export's URL.
func (f *File) Name() string { return f.t.url }

// Size is the export's size.
func (f *File) Size() (int64, error) { return f.size, nil }

// Extended reports whether the server took extended headers.
func (f *File) Extended() bool { return f.extended }

// Connections is the number of connections the file uses (more than one
// when the server allows multi-conn).
func (f *File) Connections() int { return len(f.slots) }

// ReadAt reads from the export; past its end it returns io.EOF.
func (f *File) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, driver.Errorf(driver.ErrOutOfRange, f.t.url, off, "negative offset")
	}
	if off >= f.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := len(p)
	var eof error
	if int64(n) > f.size-off {
		n, eof = int(f.size-off), io.EOF
	}
	if err := f.read(p[:n], off); err != nil {
		return 0, err
	}
	return n, eof
}

// read reads [off, off+len(p)) inside the export, widening it to the
// minimum block size.
func (f *File) read(p []byte, off int64) error {
	lo, hi := f.align(off, off+int64(len(p)))
	if lo == off && hi == off+int64(len(p)) {
		return f.readAligned(p, off)
	}
	buf := make([]byte, hi-lo)
	if err := f.readAligned(buf, lo); err != nil {
		return err
	}
	copy(p, buf[off-lo:])
	return nil
}

// align widens [off, end) to the minimum block size, within the export.
func (f *File) align(off, end int64) (int64, int64) {
	lo := off / f.minBS * f.minBS
	hi := min((end+f.minBS-1)/f.minBS*f.minBS, f.size)
	return lo, hi
}

func (f *File) readAligned(p []byte, off int64) error {
	for len(p) > 0 {
		n := min(int64(len(p)), f.maxIO)
		chunk := p[:n]
		err := f.request("read", off, func(ctx context.Context, c *nbd.Client) error {
			return c.DoContext(ctx, nbd.CmdRead, 0, uint64(off), uint32(n), chunk)
		})
		if err != nil {
			return err
		}
		p, off = p[n:], off+n
	}
	return nil
}

func (f *File) writable(op string, off, n int64) error {
	if !f.rw {
		return driver.Errorf(driver.ErrReadOnly, f.t.url, off, "%s on an NBD export opened read-only", op)
	}
	if off < 0 || n < 0 || off > f.size || n > f.size-off {
		return driver.Errorf(driver.ErrOutOfRange, f.t.url, off, "%s of %d bytes past the end of the %d-byte export (NBD exports cannot grow)", op, n, f.size)
	}
	return nil
}

// WriteAt writes into the export, which never grows.
func (f *File) WriteAt(p []byte, off int64) (int, error) {
	if err := f.writable("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	defer f.gen.Add(1)
	end := off + int64(len(p))
	lo, hi := f.align(off, end)
	if lo == off && hi == end {
		if err := f.writeAligned(p, off); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	// Partial blocks: read the blocks at the edges, merge, write whole
	// blocks. Concurrent writers to distinct ranges may share an edge
	// block, hence the lock.
	f.rmw.Lock()
	defer f.rmw.Unlock()
	buf := make([]byte, hi-lo)
	if off != lo {
		if err := f.readAligned(buf[:f.minBS], lo); err != nil {
			return 0, err
		}
	}
	if end != hi && (hi-f.minBS >= lo+f.minBS || off == lo) {
		if err := f.readAligned(buf[hi-lo-f.minBS:], hi-f.minBS); err != nil {
			return 0, err
		}
	}
	copy(buf[off-lo:], p)
	if err := f.writeAligned(buf, lo); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (f *File) writeAligned(p []byte, off int64) error {
	for len(p) > 0 {
		n := min(int64(len(p)), f.maxIO)
		chunk := p[:n]
		err := f.request("write", off, func(ctx context.Context, c *nbd.Client) error {
			return c.DoContext(ctx, nbd.CmdWrite, 0, uint64(off), uint32(n), chunk)
		})
		if err != nil {
			return err
		}
		p, off = p[n:], off+n
	}
	return nil
}

// Truncate fails unless size is the export's: NBD exports have a fixed
// size here (NBD_CMD_RESIZE is an experimental extension).
func (f *File) Truncate(size int64) error {
	if size == f.size {
		return nil
	}
	return driver.Unsupportedf(f.t.url, "an NBD export cannot be resized (from %d to %d bytes)", f.size, size)
}

// Sync sends NBD_CMD_FLUSH (when the server takes it: otherwise writes
// are durable once answered).
func (f *File) Sync() error {
	if !f.rw || f.flags&nbd.TFlagSendFlush == 0 {
		return nil
	}
	return f.request("flush", -1, func(ctx context.Context, c *nbd.Client) error {
		return c.DoContext(ctx, nbd.CmdFlush, 0, 0, 0, nil)
	})
}

// PunchHole makes [off, off+n) read as zeros, deallocating it where the
// server can: WRITE_ZEROES without NO_HOLE, because TRIM need not read
// back as zeros. Without WRITE_ZEROES it writes zeros.
func (f *File) PunchHole(off, n int64) error {
	return f.zero("punch-hole", off, n, 0)
}

// ZeroRange zeroes [off, off+n) keeping it allocated (WRITE_ZEROES with
// NBD_CMD_FLAG_NO_HOLE).
func (f *File) ZeroRange(off, n int64) error {
	return f.zero("zero-range", off, n, nbd.FlagNoHole)
}

func (f *File) zero(op string, off, n int64, flags uint16) error {
	if off >= f.size && off >= 0 && n >= 0 {
		return nil
	}
	n = min(n, f.size-off)
	if err := f.writable(op, off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	defer f.gen.Add(1)
	end := off + n
	if f.flags&nbd.TFlagWriteZeroes == 0 {
		return f.writeZeroBytes(off, end)
	}
	// Edges that are not whole blocks are written as bytes.
	lo := (off + f.minBS - 1) / f.minBS * f.minBS
	hi := end / f.minBS * f.minBS
	if hi < f.size && end == f.size {
		hi = end // the export's tail may be a partial block
	}
	if lo >= hi {
		return f.writeZeroBytes(off, end)
	}
	if err := f.writeZeroBytes(off, lo); err != nil {
		return err
	}
	if err := f.writeZeroBytes(hi, end); err != nil {
		return err
	}
	step := maxZeroLen / f.minBS * f.minBS
	for o := lo; o < hi; o += step {
		l := min(step, hi-o)
		err := f.request(op, o, func(ctx context.Context, c *nbd.Client) error {
			return c.DoContext(ctx, nbd.CmdWriteZeroes, flags, uint64(o), uint32(l), nil)
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// writeZeroBytes writes zeros over [off, end) with WRITE.
func (f *File) writeZeroBytes(off, end int64) error {
	if off >= end {
		return nil
	}
	z := make([]byte, min(end-off, 1<<20))
	for off < end {
		n := min(int64(len(z)), end-off)
		if _, err := f.WriteAt(z[:n], off); err != nil {
			return err
		}
		off += n
	}
	return nil
}

// Close disconnects every connection; requests in flight fail.
func (f *File) Close() error {
	if f.closed.Swap(true) {
		return nil
	}
	f.cancel()
	for _, s := range f.slots {
		s.mu.Lock()
		if s.c != nil {
			s.c.Close()
			s.c = nil
		}
		s.mu.Unlock()
	}
	if f.onClose != nil {
		f.onClose()
	}
	return nil
}

var (
	_ driver.File               = (*File)(nil)
	_ driver.HoleSeeker         = (*File)(nil)
	_ driver.AllocationReporter = (*File)(nil)
	_ driver.ZeroRanger         = (*File)(nil)
	_ driver.Storage            = (*Storage)(nil)
	_ driver.Lister             = (*Storage)(nil)
)
