package luks

import (
	"context"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/prealloc"
)

// zeroChunk is the piece in which zeros are encrypted and written.
const zeroChunk = 1 << 20

func (im *image) locked() error {
	if im.c == nil {
		return driver.Errorf(driver.ErrInvalidOption, im.name, -1, "the volume was opened without its key (key-secret) and cannot be read or written")
	}
	return nil
}

// Status: a LUKS volume has no allocation map, every sector is data. The
// file offset is not given: the bytes there are ciphertext.
func (im *image) Status(off, n int64) (driver.Extent, error) {
	size := im.Size()
	if off < 0 || off >= size {
		return driver.Extent{}, driver.Errorf(driver.ErrOutOfRange, im.name, off, "status past the end of the %d-byte disk", size)
	}
	return driver.Extent{State: driver.Data, Length: min(n, size-off), Offset: -1}, nil
}

// sector is the IV number of the payload sector at virtual offset off.
func (im *image) sector(off int64) uint64 { return uint64(off/im.ss) + im.hdr.IVTweak }

func (im *image) ReadAt(p []byte, off int64) (int, error) {
	if err := im.locked(); err != nil {
		return 0, err
	}
	if err := driver.CheckRange(im.name, off, int64(len(p)), im.Size()); err != nil || len(p) == 0 {
		return 0, err
	}
	s0 := off &^ (im.ss - 1)
	e := (off + int64(len(p)) + im.ss - 1) &^ (im.ss - 1)
	buf := p
	if s0 != off || e != off+int64(len(p)) {
		buf = make([]byte, e-s0)
	}
	if err := driver.ReadFullAt(im.f, buf, im.payload+s0); err != nil {
		return 0, driver.WithFile(err, "read", im.name)
	}
	im.c.Decrypt(buf, im.sector(s0))
	if &buf[0] != &p[0] {
		copy(p, buf[off-s0:])
		clear(buf)
	}
	return len(p), nil
}

func (im *image) WriteAt(p []byte, off int64) (int, error) {
	if im.readOnly {
		return 0, driver.Errorf(driver.ErrReadOnly, im.name, off, "image opened read-only")
	}
	if err := im.locked(); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	if err := driver.CheckRange(im.name, off, int64(len(p)), im.Size()); err != nil {
		return 0, err
	}
	s0 := off &^ (im.ss - 1)
	e := (off + int64(len(p)) + im.ss - 1) &^ (im.ss - 1)
	buf := make([]byte, e-s0)
	// Partial sectors at the edges: read, decrypt, overlay (the container
	// range-locks whole sectors, Info's ClusterSize, so nobody else writes
	// them meanwhile).
	if s0 != off {
		if err := im.readPlain(buf[:im.ss], s0); err != nil {
			return 0, err
		}
	}
	if end := off + int64(len(p)); end != e && (e-im.ss != s0 || s0 == off) {
		if err := im.readPlain(buf[len(buf)-int(im.ss):], e-im.ss); err != nil {
			return 0, err
		}
	}
	copy(buf[off-s0:], p)
	im.c.Encrypt(buf, im.sector(s0))
	if _, err := im.f.WriteAt(buf, im.payload+s0); err != nil {
		return 0, driver.WithFile(err, "write", im.name)
	}
	return len(p), nil
}

// readPlain reads and decrypts whole sectors at off into b.
func (im *image) readPlain(b []byte, off int64) error {
	if err := driver.ReadFullAt(im.f, b, im.payload+off); err != nil {
		return driver.WithFile(err, "read", im.name)
	}
	im.c.Decrypt(b, im.sector(off))
	return nil
}

// WriteZeroes encrypts zeros over the range: a hole in the file would
// decrypt to noise, so unmap cannot deallocate anything.
func (im *image) WriteZeroes(off, n int64, unmap bool) error {
	if err := driver.CheckRange(im.name, off, n, im.Size()); err != nil {
		return err
	}
	for end := off + n; off < end; {
		c := min(end-off, zeroChunk-(off&(im.ss-1)))
		if _, err := im.WriteAt(driver.Zeros(c), off); err != nil {
			return err
		}
		off += c
	}
	return nil
}

// grow extends the payload from from to to bytes: the file is extended
// (preallocated as asked) and the new sectors get encrypted zeros.
func (im *image) grow(ctx context.Context, from, to int64, mode string) error {
	if err := prealloc.Check("luks", mode, prealloc.Metadata, prealloc.Falloc, prealloc.Full); err != nil {
		return err
	}
	if err := im.f.Truncate(im.payload + to); err != nil {
		return err
	}
	if mode == prealloc.Falloc {
		if err := prealloc.File(ctx, im.f, im.name, mode, im.payload+from, to-from); err != nil {
			return err
		}
	}
	im.mu.Lock()
	im.size = to
	im.mu.Unlock()
	for off := from; off < to; off += zeroChunk {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := im.WriteZeroes(off, min(zeroChunk, to-off), false); err != nil {
			return err
		}
	}
	return nil
}

// Resize changes the payload's size (whole sectors); grown sectors read
// zeros.
func (im *image) Resize(ctx context.Context, size int64, mode string) error {
	if im.readOnly {
		return driver.Errorf(driver.ErrReadOnly, im.name, -1, "image opened read-only")
	}
	if err := im.locked(); err != nil {
		return err
	}
	if im.hdr.DataSize >= 0 {
		return driver.Unsupportedf(im.name, "resizing a LUKS2 volume whose segment has a fixed size")
	}
	if size < 0 || size%im.ss != 0 {
		return driver.OptionErrorf("luks: size %d is not a multiple of the %d-byte sector", size, im.ss)
	}
	old := im.Size()
	if size <= old {
		im.mu.Lock()
		defer im.mu.Unlock()
		if err := im.f.Truncate(im.payload + size); err != nil {
			return err
		}
		im.size = size
		return nil
	}
	return im.grow(ctx, old, size, mode)
}
