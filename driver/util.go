package driver

import (
	"context"
	"encoding/binary"
	"io"
)

// IsZero reports whether b is all zero bytes.
func IsZero(b []byte) bool {
	for len(b) >= 8 && len(b)%8 != 0 {
		if b[len(b)-1] != 0 {
			return false
		}
		b = b[:len(b)-1]
	}
	for len(b) >= 32 {
		if binary.LittleEndian.Uint64(b)|binary.LittleEndian.Uint64(b[8:])|
			binary.LittleEndian.Uint64(b[16:])|binary.LittleEndian.Uint64(b[24:]) != 0 {
			return false
		}
		b = b[32:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// ReadFullAt reads len(p) bytes at off from r, treating a short read at EOF
// as io.ErrUnexpectedEOF.
func ReadFullAt(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// CheckRange validates an access of n bytes at off against size.
func CheckRange(name string, off, n, size int64) error {
	if off < 0 || n < 0 || off > size || n > size-off {
		return Errorf(ErrOutOfRange, name, off, "access of %d bytes past the end of the %d-byte disk", n, size)
	}
	return nil
}

// ZeroChunk is the size of the shared zero buffer: WriteZeros writes in
// pieces of at most this many bytes, and Zeros shares the buffer up to it.
const ZeroChunk = 1 << 20

// zeroBuf is shared by every caller of Zeros and WriteZeros; it is never
// written.
var zeroBuf = make([]byte, ZeroChunk)

// Zeros returns n zero bytes that the caller must not write to: a slice of
// a shared buffer for n up to ZeroChunk, a new buffer beyond.
func Zeros(n int64) []byte {
	if n <= ZeroChunk {
		return zeroBuf[:n]
	}
	return make([]byte, n)
}

// WriteZeros writes n zero bytes at off to w, in pieces of at most
// ZeroChunk bytes: the fallback of a storage or image that cannot zero a
// range otherwise.
func WriteZeros(w io.WriterAt, off, n int64) error {
	return WriteZerosContext(context.Background(), w, off, n)
}

// WriteZerosContext is WriteZeros checking ctx before each piece.
func WriteZerosContext(ctx context.Context, w io.WriterAt, off, n int64) error {
	for end := off + n; off < end; {
		if err := ctx.Err(); err != nil {
			return err
		}
		c := min(end-off, ZeroChunk)
		if _, err := w.WriteAt(zeroBuf[:c], off); err != nil {
			return err
		}
		off += c
	}
	return nil
}

// CheckExtent validates a driver's answer e to Status(off, n): a run of 1
// to n bytes in a known state. format names the driver, name the image.
func CheckExtent(format, name string, off, n int64, e Extent) error {
	if e.Length <= 0 || e.Length > n {
		return Corruptf(name, off, "driver %s reported a status run of %d bytes for a %d-byte request", format, e.Length, n)
	}
	if e.State > Zero {
		return Corruptf(name, off, "driver %s reported invalid state %d", format, e.State)
	}
	return nil
}

// ClearForCreate cuts an existing file down for a creator that writes its
// header from offset 0 and extends the file with Truncate, so that
// everything else reads zeros: a non-empty file keeps only its first byte
// (which the header overwrites). It never truncates to zero: ext4 writes a
// file truncated to zero back in full when it is closed (auto_da_alloc),
// which would make every convert to an existing or a new file sync its
// whole output.
func ClearForCreate(f File) error {
	size, err := f.Size()
	if err != nil || size <= 1 {
		return err
	}
	return f.Truncate(1)
}

// ClonedBytes is the number of bytes f's CopyFrom (RangeCopier) shared
// into it by reflink rather than copied, where its storage counts them
// (osfs does), else 0. Drivers whose CopyFrom copies into one file report
// it for convert's statistics.
func ClonedBytes(f File) int64 {
	if c, ok := f.(interface{ ClonedBytes() int64 }); ok {
		return c.ClonedBytes()
	}
	return 0
}

// CopierOf returns f as a RangeCopier for a driver's CopyFrom into the
// image name at off, or an error wrapping ErrUnsupported (the caller then
// reads and writes) when its storage cannot copy between files.
func CopierOf(f File, name string, off int64) (RangeCopier, error) {
	cp, ok := f.(RangeCopier)
	if !ok {
		return nil, Errorf(ErrUnsupported, name, off, "the storage cannot copy between files")
	}
	return cp, nil
}
