package driver

import (
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

// NoParent is the ParentView of an image without a parent: everything reads
// as zeros and is unallocated.
type NoParent struct{}

func (NoParent) ReadAt(p []byte, off int64) (int, error) { clear(p); return len(p), nil }
func (NoParent) Status(off, n int64) (Extent, error) {
	return Extent{State: Unallocated, Length: n, Offset: -1}, nil
}
func (NoParent) Size() int64   { return 0 }
func (NoParent) Present() bool { return false }

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
