package vdisk

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/rangelock"
)

// Layer is one image of a chain.
type Layer struct {
	// Name is the image's file name as resolved (relative names joined with
	// the child's directory).
	Name   string
	Format *driver.Format
	// ReadOnly is true for every layer but a writable top.
	ReadOnly bool
	// Storage holds the layer's files (each layer may have its own; see
	// OpenOptions.Resolver), under the name path.
	Storage driver.Storage
	path    string

	img driver.Image
	// kvs and fl are how the layer was opened, for reopening it with
	// another access mode during live jobs.
	kvs []driver.KV
	fl  layerFlags
	// refs are the file names the image records that its driver met.
	refs *driver.ReferenceLog
	// owned is the storage the open built for this layer alone (the
	// scheme storage of a URL name); closing the layer closes it
	// (driver.StorageCloser). Nil when the storage is the caller's.
	owned driver.Storage
}

// closeImage closes the layer's image and then the storage built for it.
func (l *Layer) closeImage() error {
	err := l.img.Close()
	if l.owned != nil {
		if serr := driver.CloseStorage(l.owned); err == nil && serr != nil {
			err = serr
		}
	}
	return err
}

// Info describes the layer's image (as `info` shows it).
func (l *Layer) Info() driver.Info { return l.img.Info() }

// Size is the layer's virtual size.
func (l *Layer) Size() int64 { return l.img.Size() }

// ParentRef is the parent reference the layer's image records, or nil.
func (l *Layer) ParentRef() *driver.ParentRef { return l.img.Parent() }

// As returns the layer's image as T (one of the driver SDK's optional
// interfaces, or a driver's own type in its tests) when it is one. It is
// for inspection: changing an image through it bypasses the Disk's locks
// and its size bookkeeping, so make changes with the Disk's methods
// (Resize, CreateSnapshot, Amend, SetUUID, SetParent, ...).
func As[T any](l *Layer) (T, bool) {
	v, ok := l.img.(T)
	return v, ok
}

// Disk is an open chain of images: Layers()[0] is the top (the only layer
// written to), the last is the base. A Disk is safe for concurrent use by
// many goroutines: reads run in parallel, writes exclude overlapping reads
// and writes at the granularity of the top image's cluster.
type Disk struct {
	mu       sync.RWMutex // guards layers against structural change (resize, close)
	layers   []*Layer
	size     int64
	readOnly bool
	gran     int64
	locks    rangelock.Locker
	log      *slog.Logger
	storage  driver.Storage
	closed   bool
	// caches is the block cache of the open (OpenOptions.Cache), if any.
	caches *cacheState

	// job is the name of the live job running on the disk ("" for none);
	// guarded by jobMu. trackers are the dirty maps of running jobs,
	// marked by every write to the top.
	jobMu    sync.Mutex
	job      string
	trackers atomic.Pointer[[]*dirtyMap]
}

var (
	_ io.ReaderAt = (*Disk)(nil)
	_ io.WriterAt = (*Disk)(nil)
)

// newDisk assembles a Disk from opened layers (top first).
func newDisk(layers []*Layer, readOnly bool, st driver.Storage, log *slog.Logger) *Disk {
	d := &Disk{layers: layers, readOnly: readOnly, log: log, storage: st}
	d.reshape()
	return d
}

// reshape recomputes what the Disk derives from its layers (size, lock
// granularity) after a structural change. Callers hold d.mu exclusively
// (or own d alone).
func (d *Disk) reshape() {
	d.size = d.layers[0].img.Size()
	g := int64(512)
	for _, l := range d.layers {
		// The lock granularity must cover the fill unit of every layer that
		// may be written (the top, and lower layers live jobs write).
		if l.ReadOnly {
			continue
		}
		if c := l.img.Info().ClusterSize; c > g && c&(c-1) == 0 {
			g = c
		}
	}
	if c := d.layers[0].img.Info().ClusterSize; c > g && c&(c-1) == 0 {
		g = c
	}
	d.gran = g
}

// Size is the virtual size of the disk (the top image's).
func (d *Disk) Size() int64 {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.size
}

// Layers returns the chain, top first.
//
// Each is a snapshot of the layer as it is now: live jobs reopen layers
// (read-write, then read-only again) and change the chain under the disk's
// lock, and a snapshot is not changed by that, so reading its fields needs
// no lock. Take new snapshots after a job.
func (d *Disk) Layers() []*Layer {
	d.mu.RLock()
	defer d.mu.RUnlock()
	out := make([]*Layer, len(d.layers))
	for i, l := range d.layers {
		c := *l
		out[i] = &c
	}
	return out
}

// Top is the top layer.
func (d *Disk) Top() *Layer { return d.Layers()[0] }

// ReadOnly reports whether the disk was opened without write access.
func (d *Disk) ReadOnly() bool { return d.readOnly }

// Logger is the logger notices go to.
func (d *Disk) Logger() *slog.Logger { return d.log }

// Storage is the storage the disk's images live in.
func (d *Disk) Storage() driver.Storage { return d.storage }

func (d *Disk) lockRange(off, n int64, write bool) *rangelock.Range {
	start, end := d.alignLock(off, n)
	return d.locks.Lock(start, end-start, write)
}

// alignLock rounds [off, off+n) out to the lock granularity.
func (d *Disk) alignLock(off, n int64) (int64, int64) {
	g := d.gran
	return off &^ (g - 1), (off + n + g - 1) &^ (g - 1)
}

func (d *Disk) name() string { return d.layers[0].Name }

func (d *Disk) check(off, n int64) error {
	if d.closed {
		return &Error{Op: "access", File: d.name(), Offset: -1, Err: ErrClosed, Reason: "the disk is closed"}
	}
	return driver.CheckRange(d.name(), off, n, d.size)
}

// ReadAt reads len(p) bytes at off through the chain. Reading past the end
// returns the bytes up to it and io.EOF, as io.ReaderAt requires.
func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if off < 0 {
		return 0, driver.CheckRange(d.name(), off, 0, d.size)
	}
	if d.closed {
		return 0, d.check(0, 0)
	}
	if off >= d.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := len(p)
	var eof error
	if int64(n) > d.size-off {
		n = int(d.size - off)
		eof = io.EOF
	}
	if n == 0 {
		return 0, eof
	}
	r := d.lockRange(off, int64(n), false)
	defer d.locks.Unlock(r)
	if err := d.readFrom(0, p[:n], off); err != nil {
		return 0, err
	}
	return n, eof
}

// readFrom reads p at off from the chain starting at layer depth. Callers
// hold d.mu (read) and a range lock covering the range.
func (d *Disk) readFrom(depth int, p []byte, off int64) error {
	for len(p) > 0 {
		if depth >= len(d.layers) {
			clear(p)
			return nil
		}
		l := d.layers[depth]
		size := l.img.Size()
		if off >= size {
			clear(p)
			return nil
		}
		n := int64(len(p))
		if n > size-off {
			n = size - off
		}
		ext, err := d.checkedStatus(depth, off, n)
		if err != nil {
			return err
		}
		chunk := p[:ext.Length]
		switch ext.State {
		case driver.Data:
			if err := readFull(l, chunk, off); err != nil {
				return err
			}
		case driver.Zero:
			clear(chunk)
		case driver.Unallocated:
			if err := d.readFrom(depth+1, chunk, off); err != nil {
				return err
			}
		}
		p = p[ext.Length:]
		off += ext.Length
	}
	return nil
}

func readFull(l *Layer, p []byte, off int64) error {
	m, err := l.img.ReadAt(p, off)
	if m == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return driver.WithFile(err, "read", l.Name)
}

func (d *Disk) writable() error {
	if d.closed {
		return d.check(0, 0)
	}
	if d.readOnly {
		return &Error{Op: "write", File: d.name(), Offset: -1, Err: ErrReadOnly, Reason: "the disk is opened read-only"}
	}
	return nil
}

// WriteAt writes p at off to the top image. Writes past the end fail with
// ErrOutOfRange (a disk does not grow by writing; use Resize).
func (d *Disk) WriteAt(p []byte, off int64) (int, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if err := d.writable(); err != nil {
		return 0, err
	}
	if err := d.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	h := &held{r: d.lockRange(off, int64(len(p)), true), widen: true}
	defer func() { d.locks.Unlock(h.r) }()
	d.markDirty(off, int64(len(p)))
	if err := d.writeLayer(0, p, off, h); err != nil {
		return 0, err
	}
	return len(p), nil
}

// held is the range lock a write holds. nil stands for the disk's
// exclusive lock (nothing else runs). widen allows the fill path to trade
// the lock for a wider one when a unit reaches past it: a client's write
// may, since it re-reads everything after; a job may not, since it read
// the data it writes under the lock it holds.
type held struct {
	r     *rangelock.Range
	widen bool
}

// maxFill bounds the range a driver may ask the Disk to fill for one write
// (a unit's bounds): no format has units this large.
const maxFill = 256 << 20

// writeLayer writes p at off into layer depth, doing the copy-on-write fill
// a driver asks for (driver.FillError): the bytes around p up to the unit
// bounds are read from the chain (the disk's own content there, which the
// layer does not hold) and the extended buffer is written instead. r is
// the caller's range lock; it is widened when the fill reaches past it.
// Callers hold d.mu (read or write).
func (d *Disk) writeLayer(depth int, p []byte, off int64, h *held) error {
	l := d.layers[depth]
	for attempt := 0; ; attempt++ {
		n, err := l.img.WriteAt(p, off)
		fe, fill := driver.AsFill(err)
		if !fill {
			if err == nil && n != len(p) {
				err = io.ErrShortWrite
			}
			return driver.WithFile(err, "write", l.Name)
		}
		if attempt > 0 {
			return driver.Corruptf(l.Name, off, "driver %s asked for a second fill of [%d, %d) after a filled write", l.Format.Name, fe.Off, fe.Off+fe.Len)
		}
		var err2 error
		p, off, err2 = d.fill(depth, fe, p, off, h)
		if err2 != nil {
			return err2
		}
	}
}

// fill builds the buffer for [fe.Off, fe.Off+fe.Len): p at off, the rest
// read from the chain as the disk shows it below layer depth's own data.
func (d *Disk) fill(depth int, fe *driver.FillError, p []byte, off int64, h *held) ([]byte, int64, error) {
	l := d.layers[depth]
	end := off + int64(len(p))
	if fe.Off > off || fe.Len > maxFill || fe.Off < 0 || fe.Off+fe.Len < end || fe.Off+fe.Len > l.img.Size() {
		return nil, 0, driver.Corruptf(l.Name, off, "driver %s asked to fill [%d, %d) for a write of [%d, %d)", l.Format.Name, fe.Off, fe.Off+fe.Len, off, end)
	}
	if h != nil && !h.r.Covers(fe.Off, fe.Len) {
		// The unit reaches past the lock held (a unit larger than the
		// lock granularity, which no format here has).
		if !h.widen {
			return nil, 0, driver.Errorf(ErrUnsupported, l.Name, off, "format %s asked to fill [%d, %d), past the %d-byte lock granularity", l.Format.Name, fe.Off, fe.Off+fe.Len, d.gran)
		}
		// Widen lets go of the lock while it waits, so the unit is read
		// only once the wider lock is held (and a write that landed in
		// between is read back, not overwritten).
		start, end := d.alignLock(fe.Off, fe.Len)
		h.r = d.locks.Widen(h.r, start, end-start)
	}
	buf := make([]byte, fe.Len)
	if err := d.readLayerView(depth, buf[:off-fe.Off], fe.Off); err != nil {
		return nil, 0, err
	}
	copy(buf[off-fe.Off:], p)
	if err := d.readLayerView(depth, buf[end-fe.Off:], end); err != nil {
		return nil, 0, err
	}
	return buf, fe.Off, nil
}

// readLayerView reads p at off as layer depth and the layers below show
// it (zeros past the layer's end).
func (d *Disk) readLayerView(depth int, p []byte, off int64) error {
	if len(p) == 0 {
		return nil
	}
	if depth >= len(d.layers) {
		clear(p)
		return nil
	}
	size := d.layers[depth].img.Size()
	if off >= size {
		clear(p)
		return nil
	}
	n := min(int64(len(p)), size-off)
	clear(p[n:])
	return d.readFrom(depth, p[:n], off)
}

// WriteZeroes makes [off, off+n) read as zeros. With unmap the top image may
// deallocate the range (it still reads zeros, also over a parent).
func (d *Disk) WriteZeroes(off, n int64, unmap bool) error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if err := d.writable(); err != nil {
		return err
	}
	if err := d.check(off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	h := &held{r: d.lockRange(off, n, true), widen: true}
	defer func() { d.locks.Unlock(h.r) }()
	d.markDirty(off, n)
	return d.zeroLayer(0, off, n, unmap, h)
}

// zeroLayer makes [off, off+n) of layer depth read as zeros: through the
// driver's Zeroer where it has one, else (or for the partial units a
// driver needs filled) by writing zero buffers through the fill path.
// Callers hold d.mu and a write lock over the range.
func (d *Disk) zeroLayer(depth int, off, n int64, unmap bool, h *held) error {
	l := d.layers[depth]
	if z, ok := l.img.(driver.Zeroer); ok {
		err := z.WriteZeroes(off, n, unmap)
		if err == nil {
			return nil
		}
		if _, fill := driver.AsFill(err); fill {
			return d.zeroSplit(depth, off, n, unmap, h)
		}
		if !errors.Is(err, ErrUnsupported) {
			return driver.WithFile(err, "write zeroes", l.Name)
		}
	}
	return d.writeZeroBuffers(depth, off, n, h)
}

// zeroSplit zeroes the partial units at both ends of the range by writing
// (with the fill path) and the aligned middle through the Zeroer.
func (d *Disk) zeroSplit(depth int, off, n int64, unmap bool, h *held) error {
	g := max(d.layers[depth].img.Info().ClusterSize, 512)
	end := off + n
	head := min(end, (off+g-1)/g*g)
	tail := max(head, end/g*g)
	if head > off {
		if err := d.writeZeroBuffers(depth, off, head-off, h); err != nil {
			return err
		}
	}
	if tail > head {
		z := d.layers[depth].img.(driver.Zeroer)
		if err := z.WriteZeroes(head, tail-head, unmap); err != nil {
			if _, fill := driver.AsFill(err); !fill {
				return driver.WithFile(err, "write zeroes", d.layers[depth].Name)
			}
			if err := d.writeZeroBuffers(depth, head, tail-head, h); err != nil {
				return err
			}
		}
	}
	if end > tail {
		return d.writeZeroBuffers(depth, tail, end-tail, h)
	}
	return nil
}

// writeZeroBuffers writes zeros over [off, off+n) of layer depth, 1 MiB at
// a time: the fallback for formats without an efficient Zeroer.
func (d *Disk) writeZeroBuffers(depth int, off, n int64, h *held) error {
	for n > 0 {
		c := min(n, driver.ZeroChunk)
		if err := d.writeLayer(depth, driver.Zeros(c), off, h); err != nil {
			return driver.WithFile(err, "write zeroes", d.layers[depth].Name)
		}
		off += c
		n -= c
	}
	return nil
}

// FastZero reports whether the top's format zeroes ranges without writing
// them (NBD_CMD_FLAG_FAST_ZERO succeeds only then). A live snapshot may
// change the answer.
func (d *Disk) FastZero() bool {
	d.mu.RLock()
	defer d.mu.RUnlock()
	top := d.layers[0]
	_, ok := top.img.(driver.Zeroer)
	return ok && top.Format.Caps&driver.CapZero != 0
}

// Discard tells the top image that [off, off+n) is no longer needed. The
// range then reads as zeros, as its old content, or as the parent's content,
// as the format decides. Formats that cannot discard ignore it.
func (d *Disk) Discard(off, n int64) error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if err := d.writable(); err != nil {
		return err
	}
	if err := d.check(off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	top := d.layers[0]
	dc, ok := top.img.(driver.Discarder)
	if !ok {
		return nil
	}
	r := d.lockRange(off, n, true)
	defer d.locks.Unlock(r)
	d.markDirty(off, n)
	if err := dc.Discard(off, n); err != nil && !errors.Is(err, ErrUnsupported) {
		return driver.WithFile(err, "discard", top.Name)
	}
	return nil
}

// Flush makes every completed write durable.
func (d *Disk) Flush() error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.closed {
		return d.check(0, 0)
	}
	if d.readOnly {
		return nil
	}
	top := d.layers[0]
	return driver.WithFile(top.img.Flush(), "flush", top.Name)
}

// Close flushes the top image (durably) and closes every layer. It returns
// the first error met but closes everything.
func (d *Disk) Close() error { return d.close(true) }

// CloseUnsynced closes every layer without making the top durable first:
// drivers still write out their metadata, so the image is complete on the
// storage, but a machine crash soon after may lose it. This is qemu-img
// convert's default cache mode ("unsafe"), which lets the kernel write the
// data back at its pace.
func (d *Disk) CloseUnsynced() error { return d.close(false) }

func (d *Disk) close(sync bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	var first error
	for i, l := range d.layers {
		if i == 0 && !d.readOnly && sync {
			if err := l.img.Flush(); err != nil && first == nil {
				first = driver.WithFile(err, "flush", l.Name)
			}
		}
		if err := l.closeImage(); err != nil && first == nil {
			first = driver.WithFile(err, "close", l.Name)
		}
	}
	d.logCacheStats()
	return first
}

// Extent is a run of the whole chain's content, as `map` shows it: the
// driver SDK's run with Start, Depth and File filled (see driver.Extent).
type Extent = driver.Extent

// Status reports the run of the chain's content starting at off, at most n
// bytes long.
func (d *Disk) Status(off, n int64) (Extent, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if err := d.check(off, n); err != nil {
		return Extent{}, err
	}
	if n == 0 {
		return Extent{Start: off, Offset: -1}, nil
	}
	r := d.lockRange(off, n, false)
	defer d.locks.Unlock(r)
	return d.statusFrom(0, off, n)
}

func (d *Disk) statusFrom(depth int, off, n int64) (Extent, error) {
	if depth >= len(d.layers) {
		return Extent{Start: off, Length: n, Depth: depth, Offset: -1}, nil
	}
	l := d.layers[depth]
	size := l.img.Size()
	if off >= size {
		// Past the end of a smaller parent: reads as zeros.
		return Extent{Start: off, Length: n, Depth: depth, Offset: -1}, nil
	}
	if n > size-off {
		n = size - off
	}
	ext, err := d.checkedStatus(depth, off, n)
	if err != nil {
		return Extent{}, err
	}
	if ext.State == driver.Unallocated {
		return d.statusFrom(depth+1, off, ext.Length)
	}
	ext.Start, ext.Depth, ext.File = off, depth, l.Name
	if ext.State == driver.Zero {
		ext.Compressed = false
	}
	return ext, nil
}

// Map calls fn for every run of [off, off+n), merging adjacent runs that
// differ only in offset continuity as qemu-img map does. It stops at the
// first error fn returns.
func (d *Disk) Map(ctx context.Context, off, n int64, fn func(Extent) error) error {
	var pending *Extent
	end := off + n
	for off < end {
		if err := ctx.Err(); err != nil {
			return err
		}
		e, err := d.Status(off, end-off)
		if err != nil {
			return err
		}
		if pending != nil && mergeable(pending, &e) {
			pending.Length += e.Length
		} else {
			if pending != nil {
				if err := fn(*pending); err != nil {
					return err
				}
			}
			c := e
			pending = &c
		}
		off += e.Length
	}
	if pending != nil {
		return fn(*pending)
	}
	return nil
}

func mergeable(a, b *Extent) bool {
	if a.Depth != b.Depth || a.State != b.State || a.Compressed != b.Compressed || a.File != b.File {
		return false
	}
	if (a.Offset < 0) != (b.Offset < 0) {
		return false
	}
	return a.Offset < 0 || a.Offset+a.Length == b.Offset
}
