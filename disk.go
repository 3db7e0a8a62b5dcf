package vdisk

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/rangelock"
)

// Layer is one image of a chain.
type Layer struct {
	// Name is the image's file name as resolved (relative names joined with
	// the child's directory).
	Name   string
	Format *driver.Format
	Image  driver.Image
	// ReadOnly is true for every layer but a writable top.
	ReadOnly bool

	view *chainView
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
}

var (
	_ io.ReaderAt = (*Disk)(nil)
	_ io.WriterAt = (*Disk)(nil)
)

// newDisk assembles a Disk from opened layers (top first) and binds every
// layer's parent view.
func newDisk(layers []*Layer, readOnly bool, st driver.Storage, log *slog.Logger) *Disk {
	d := &Disk{layers: layers, readOnly: readOnly, log: log, storage: st}
	d.size = layers[0].Image.Size()
	d.gran = layers[0].Image.Info().ClusterSize
	if d.gran <= 0 || d.gran&(d.gran-1) != 0 {
		d.gran = 512
	}
	for i, l := range layers {
		if l.view == nil {
			l.view = &chainView{}
		}
		l.view.d = d
		l.view.depth = i + 1
	}
	return d
}

// Size is the virtual size of the disk (the top image's).
func (d *Disk) Size() int64 {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.size
}

// Layers returns the chain, top first. The slice is a copy; the layers are
// owned by the Disk.
func (d *Disk) Layers() []*Layer {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return append([]*Layer(nil), d.layers...)
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
	g := d.gran
	start := off &^ (g - 1)
	end := (off + n + g - 1) &^ (g - 1)
	return d.locks.Lock(start, end-start, write)
}

func (d *Disk) name() string { return d.layers[0].Name }

func (d *Disk) check(off, n int64) error {
	if d.closed {
		return &Error{Op: "access", File: d.name(), Offset: -1, Err: errors.New("disk is closed")}
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
		size := l.Image.Size()
		if off >= size {
			clear(p)
			return nil
		}
		n := int64(len(p))
		if n > size-off {
			n = size - off
		}
		ext, err := l.Image.Status(off, n)
		if err != nil {
			return driver.WithFile(err, "read", l.Name)
		}
		if ext.Length <= 0 || ext.Length > n {
			return driver.Corruptf(l.Name, off, "driver %s reported a status run of %d bytes for a %d-byte request", l.Format.Name, ext.Length, n)
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
		default:
			return driver.Corruptf(l.Name, off, "driver %s reported invalid state %d", l.Format.Name, ext.State)
		}
		p = p[ext.Length:]
		off += ext.Length
	}
	return nil
}

func readFull(l *Layer, p []byte, off int64) error {
	m, err := l.Image.ReadAt(p, off)
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
	r := d.lockRange(off, int64(len(p)), true)
	defer d.locks.Unlock(r)
	top := d.layers[0]
	n, err := top.Image.WriteAt(p, off)
	if err == nil && n != len(p) {
		err = io.ErrShortWrite
	}
	if err != nil {
		return n, driver.WithFile(err, "write", top.Name)
	}
	return n, nil
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
	r := d.lockRange(off, n, true)
	defer d.locks.Unlock(r)
	top := d.layers[0]
	if z, ok := top.Image.(driver.Zeroer); ok {
		err := z.WriteZeroes(off, n, unmap)
		if err == nil {
			return nil
		}
		if !errors.Is(err, ErrUnsupported) {
			return driver.WithFile(err, "write zeroes", top.Name)
		}
	}
	// Fallback: write zero buffers.
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		c := min(n, int64(len(buf)))
		if _, err := top.Image.WriteAt(buf[:c], off); err != nil {
			return driver.WithFile(err, "write zeroes", top.Name)
		}
		off += c
		n -= c
	}
	return nil
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
	dc, ok := top.Image.(driver.Discarder)
	if !ok {
		return nil
	}
	r := d.lockRange(off, n, true)
	defer d.locks.Unlock(r)
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
	return driver.WithFile(top.Image.Flush(), "flush", top.Name)
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
			if err := l.Image.Flush(); err != nil && first == nil {
				first = driver.WithFile(err, "flush", l.Name)
			}
		}
		if err := l.Image.Close(); err != nil && first == nil {
			first = driver.WithFile(err, "close", l.Name)
		}
	}
	return first
}

// Extent is a run of the whole chain's content, as `map` shows it.
type Extent struct {
	Start  int64 `json:"start"`
	Length int64 `json:"length"`
	// Depth is the index of the layer holding the run (0 = top); for runs no
	// layer holds it is the chain length.
	Depth int `json:"depth"`
	// Present: some layer holds the run (data or zeros).
	Present bool `json:"present"`
	// Zero: the run reads as zeros.
	Zero bool `json:"zero"`
	// Data: the run is stored data.
	Data bool `json:"data"`
	// Compressed data.
	Compressed bool `json:"compressed,omitempty"`
	// Offset in the holding layer's file, or -1.
	Offset int64 `json:"offset"`
	// File is the name of the layer holding the run ("" when none).
	File string `json:"-"`
}

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
		return Extent{Start: off, Length: n, Depth: depth, Zero: true, Offset: -1}, nil
	}
	l := d.layers[depth]
	size := l.Image.Size()
	if off >= size {
		// Past the end of a smaller parent: reads as zeros.
		return Extent{Start: off, Length: n, Depth: depth, Zero: true, Offset: -1}, nil
	}
	if n > size-off {
		n = size - off
	}
	ext, err := l.Image.Status(off, n)
	if err != nil {
		return Extent{}, driver.WithFile(err, "status", l.Name)
	}
	if ext.Length <= 0 || ext.Length > n {
		return Extent{}, driver.Corruptf(l.Name, off, "driver %s reported a status run of %d bytes for a %d-byte request", l.Format.Name, ext.Length, n)
	}
	switch ext.State {
	case driver.Data:
		return Extent{Start: off, Length: ext.Length, Depth: depth, Present: true, Data: true, Compressed: ext.Compressed, Offset: ext.Offset, File: l.Name}, nil
	case driver.Zero:
		return Extent{Start: off, Length: ext.Length, Depth: depth, Present: true, Zero: true, Offset: ext.Offset, File: l.Name}, nil
	case driver.Unallocated:
		return d.statusFrom(depth+1, off, ext.Length)
	}
	return Extent{}, driver.Corruptf(l.Name, off, "driver %s reported invalid state %d", l.Format.Name, ext.State)
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
	if a.Depth != b.Depth || a.Present != b.Present || a.Zero != b.Zero || a.Data != b.Data || a.Compressed != b.Compressed || a.File != b.File {
		return false
	}
	if (a.Offset < 0) != (b.Offset < 0) {
		return false
	}
	return a.Offset < 0 || a.Offset+a.Length == b.Offset
}

// chainView is the ParentView handed to the layer above depth-1: the content
// of layers depth.. of the disk. Drivers call it while the container holds
// the range lock for their request, so it does not lock ranges itself.
type chainView struct {
	d     *Disk
	depth int
}

func (v *chainView) ReadAt(p []byte, off int64) (int, error) {
	if v.d == nil {
		return 0, errors.New("parent view used before the chain was assembled")
	}
	size := v.Size()
	if off < 0 {
		return 0, fmt.Errorf("negative offset %d", off)
	}
	if off >= size {
		clear(p)
		return len(p), nil
	}
	n := min(int64(len(p)), size-off)
	if err := v.d.readFrom(v.depth, p[:n], off); err != nil {
		return 0, err
	}
	clear(p[n:])
	return len(p), nil
}

func (v *chainView) Status(off, n int64) (driver.Extent, error) {
	if v.d == nil {
		return driver.Extent{}, errors.New("parent view used before the chain was assembled")
	}
	e, err := v.d.statusFrom(v.depth, off, n)
	if err != nil {
		return driver.Extent{}, err
	}
	st := driver.Unallocated
	switch {
	case e.Data:
		st = driver.Data
	case e.Present:
		st = driver.Zero
	}
	return driver.Extent{State: st, Length: e.Length, Offset: -1}, nil
}

func (v *chainView) Size() int64 {
	if v.d == nil || v.depth >= len(v.d.layers) {
		return 0
	}
	return v.d.layers[v.depth].Image.Size()
}

func (v *chainView) Present() bool { return v.d != nil && v.depth < len(v.d.layers) }
