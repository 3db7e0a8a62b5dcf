// Package raw is the raw image format: the file is the disk, byte for byte.
// Holes in the file (SEEK_HOLE) are reported as zero runs, so copies stay
// sparse. Raw is never chosen by probing except as the fallback for a
// top-level image.
//
// Size: like qemu, the virtual size is the file size rounded up to a whole
// 512-byte sector; the missing tail reads as zeros, and writing into it
// extends the file.
//
// A file that knows which of its zero ranges it does not hold at all
// (driver.AllocationReporter: an NBD export with qemu:allocation-depth)
// has those reported Unallocated rather than Zero; they read zeros alike.
//
// Status asks the file (SEEK_DATA/SEEK_HOLE) once per run and caches the
// runs per open image (internal/holecache), so the reads that follow a status walk
// cost no extra syscall; the image's own writes, discards, zeroes and
// resizes keep the cache coherent. A raw image maps its content to its
// file one to one (FileExtent) and takes data straight from another file
// (CopyFrom: reflink or copy_file_range), which convert uses for copy
// offload.
package raw

import (
	"context"
	"errors"
	"io"
	"sync"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/holecache"
	"github.com/vdisk/vdisk/internal/prealloc"
)

func init() { driver.Register(Format) }

// Format is the raw format descriptor.
var Format = &driver.Format{
	Name:        "raw",
	Extensions:  []string{"raw", "img", "bin", "iso"},
	Description: "raw disk image",
	Caps: driver.CapCreateFixed | driver.CapCreateDynamic | driver.CapDiscard |
		driver.CapZero | driver.CapResize | driver.CapWrite,
	CreateOptions: []driver.Option{
		{Name: "preallocation", Type: driver.TypeEnum, Default: "off", Values: []string{"off", "falloc", "full"},
			Doc: "preallocation mode: off (sparse), falloc (reserve blocks), full (write zeros)"},
	},
	Create: create,
	Open:   open,
	// A raw image needs its whole virtual size, as qemu-img measure says.
	Measure: func(p *driver.MeasureParams) (driver.MeasureResult, error) {
		s := roundUp(p.Size)
		return driver.MeasureResult{Required: s, FullyAllocated: s}, nil
	},
}

type image struct {
	f        driver.File
	name     string
	readOnly bool
	mu       sync.RWMutex // guards size
	size     int64        // virtual size (multiple of 512)
	fileSize int64
	cache    holecache.Cache // the file's data and hole runs, as lseek said
}

func roundUp(n int64) int64 { return (n + 511) &^ 511 }

func open(ctx context.Context, p *driver.OpenParams) (driver.Image, error) {
	flag := driver.ReadOnly
	if !p.ReadOnly {
		flag = driver.ReadWrite
	}
	if p.Direct {
		flag |= driver.Direct
	}
	f, err := p.Storage.Open(p.Name, flag)
	if err != nil {
		return nil, err
	}
	sz, err := f.Size()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &image{f: f, name: p.Name, readOnly: p.ReadOnly, size: roundUp(sz), fileSize: sz}, nil
}

func create(ctx context.Context, p *driver.CreateParams) (driver.Image, error) {
	if p.ParentRef != nil {
		return nil, driver.Unsupportedf(p.Name, "raw images cannot have a backing file")
	}
	// No O_TRUNC: on ext4, closing a file truncated to zero forces its
	// writeback (auto_da_alloc), which would make every convert sync. An
	// existing file's blocks are punched out instead.
	flag := driver.ReadWrite | driver.Create
	if !p.Overwrite {
		flag |= driver.Excl
	}
	f, err := p.Storage.Open(p.Name, flag)
	if err != nil {
		return nil, err
	}
	if old, err := f.Size(); err != nil || old > 0 {
		// Size first: a file that cannot take the new size (an NBD
		// export or an iSCSI LUN of another size) must fail before any
		// of its data is punched.
		if err == nil && old != p.Size {
			err = f.Truncate(p.Size)
		}
		if err == nil {
			err = f.PunchHole(0, min(old, p.Size))
		}
		if err != nil {
			f.Close()
			return nil, err
		}
	}
	img := &image{f: f, name: p.Name}
	if err := img.setSize(ctx, 0, p.Size, p.Options.String("preallocation")); err != nil {
		f.Close()
		return nil, err
	}
	return img, nil
}

// setSize truncates to size and preallocates [from, size) as asked.
func (im *image) setSize(ctx context.Context, from, size int64, mode string) error {
	if err := prealloc.Check("raw", mode, prealloc.Falloc, prealloc.Full); err != nil {
		return err
	}
	if size > from {
		if err := prealloc.Usable(im.f, im.name, mode); err != nil {
			return err
		}
	}
	if err := im.f.Truncate(size); err != nil {
		return err
	}
	im.size, im.fileSize = roundUp(size), size
	if size <= from {
		return nil
	}
	return prealloc.File(ctx, im.f, im.name, mode, from, size-from)
}

func (im *image) Size() int64 {
	im.mu.RLock()
	defer im.mu.RUnlock()
	return im.size
}

func (im *image) Status(off, n int64) (driver.Extent, error) {
	im.mu.RLock()
	fsize := im.fileSize
	im.mu.RUnlock()
	if off >= fsize {
		return driver.Extent{State: driver.Zero, Length: n, Offset: off}, nil
	}
	n = min(n, fsize-off)
	hs, ok := im.f.(driver.HoleSeeker)
	if !ok {
		return driver.Extent{State: driver.Data, Length: n, Offset: off}, nil
	}
	r, err := im.cache.Find(hs, off, fsize)
	if err != nil {
		return driver.Extent{}, err
	}
	if r.Data {
		return driver.Extent{State: driver.Data, Length: min(n, r.End-off), Offset: off}, nil
	}
	n = min(n, r.End-off)
	if ar, ok := im.f.(driver.AllocationReporter); ok {
		// A zero run the storage does not hold at all (an NBD export
		// with qemu:allocation-depth) is unallocated; data stays data.
		held, end, err := ar.Allocation(off)
		if err != nil {
			return driver.Extent{}, err
		}
		if end > off {
			n = min(n, end-off)
		}
		if !held {
			return driver.Extent{State: driver.Unallocated, Length: n, Offset: -1}, nil
		}
	}
	return driver.Extent{State: driver.Zero, Length: n, Offset: off}, nil
}

func (im *image) ReadAt(p []byte, off int64) (int, error) {
	n, err := im.f.ReadAt(p, off)
	if n < len(p) && (err == nil || errors.Is(err, io.EOF)) {
		// The tail past the file's end (sector rounding) reads as zeros.
		clear(p[n:])
		return len(p), nil
	}
	return n, err
}

func (im *image) WriteAt(p []byte, off int64) (int, error) {
	if im.readOnly {
		return 0, driver.Errorf(driver.ErrReadOnly, im.name, off, "image opened read-only")
	}
	n, err := im.f.WriteAt(p, off)
	if n > 0 {
		im.cache.Changed(off, int64(n), true)
	}
	if end := off + int64(n); err == nil {
		im.mu.Lock()
		if end > im.fileSize {
			im.fileSize = end
		}
		im.mu.Unlock()
	}
	return n, err
}

func (im *image) Flush() error {
	if im.readOnly {
		return nil
	}
	return im.f.Sync()
}

func (im *image) Close() error { return im.f.Close() }

func (im *image) Info() driver.Info {
	return driver.Info{Format: "raw", VirtualSize: im.Size()}
}

func (im *image) Parent() *driver.ParentRef { return nil }

// WriteZeroes punches a hole (unmap) or zeroes the range in place.
func (im *image) WriteZeroes(off, n int64, unmap bool) error {
	if im.readOnly {
		return driver.Errorf(driver.ErrReadOnly, im.name, off, "image opened read-only")
	}
	im.mu.RLock()
	fsize := im.fileSize
	im.mu.RUnlock()
	if off >= fsize {
		return nil // the tail past the file reads zeros already
	}
	n = min(n, fsize-off)
	if r, ok := im.cache.Lookup(off); unmap && ok && !r.Data && r.End >= off+n {
		// Known to be a hole already (a convert zeroing an existing target
		// where it was never written): nothing to punch.
		return nil
	}
	// Forget the range even when the call fails: it may have got halfway.
	defer im.cache.Changed(off, n, false)
	if unmap {
		return im.f.PunchHole(off, n)
	}
	if z, ok := im.f.(driver.ZeroRanger); ok {
		return z.ZeroRange(off, n)
	}
	return driver.ErrUnsupported
}

// Discard punches a hole: a raw image has no parent, so it reads zeros.
func (im *image) Discard(off, n int64) error { return im.WriteZeroes(off, n, true) }

// Resize truncates or extends the file; growing preallocates as asked.
func (im *image) Resize(ctx context.Context, size int64, prealloc string) error {
	if im.readOnly {
		return driver.Errorf(driver.ErrReadOnly, im.name, -1, "image opened read-only")
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	defer im.cache.Invalidate(0, -1)
	return im.setSize(ctx, im.fileSize, size, prealloc)
}
