package dmg

import (
	"bytes"
	"compress/bzip2"
	"errors"
	"fmt"
	"io"

	"github.com/klauspost/compress/zlib"

	"github.com/vdisk/vdisk/driver"
)

// decompress reads chunk c and expands it to exactly its sectors. A
// stream that yields more or fewer bytes than the chunk claims is
// corrupt; the output buffer is sized by the (bounded) sector count, never
// by what the stream produces.
func (im *image) decompress(c *chunk) ([]byte, error) {
	switch c.typ {
	case typeZlib, typeBzip2, typeADC:
	case typeLZFSE:
		return nil, driver.Unsupportedf(im.name, "LZFSE chunks are not supported: no pure-Go LZFSE decoder is available to this build (ULFO image; chunk at sector %d, file offset %d)", c.sector, c.off)
	default:
		return nil, driver.Unsupportedf(im.name, "chunk of %s at sector %d", typeName(c.typ), c.sector)
	}
	in := make([]byte, c.length)
	if err := driver.ReadFullAt(im.f, in, c.off); err != nil {
		return nil, driver.WithFile(err, "read", im.name)
	}
	want := int(c.count * sectorSize)
	var out []byte
	var err error
	switch c.typ {
	case typeADC:
		out, err = adcDecode(in, want)
	case typeZlib:
		var zr io.ReadCloser
		if zr, err = zlib.NewReader(bytes.NewReader(in)); err == nil {
			out, err = expand(zr, want)
		}
	case typeBzip2:
		out, err = expand(bzip2.NewReader(bytes.NewReader(in)), want)
	}
	if err != nil {
		return nil, driver.Corruptf(im.name, c.off, "%s chunk for sectors [%d, %d): %v", typeName(c.typ), c.sector, c.end(), err)
	}
	return out, nil
}

// eagerLimit is the claimed size up to which a chunk's output buffer is
// allocated at once; larger claims (up to qemu's 64 MiB) grow with what
// the stream actually produces, so a chunk that merely claims many sectors
// costs nothing.
const eagerLimit = 4 << 20

// expand reads the stream r, which must produce exactly want bytes and
// then end (with its checksum holding).
func expand(r io.Reader, want int) ([]byte, error) {
	var out []byte
	if want <= eagerLimit {
		out = make([]byte, want)
		n, err := io.ReadFull(r, out)
		if err == io.ErrUnexpectedEOF || err == io.EOF {
			return nil, fmt.Errorf("decompresses to %d bytes, less than the %d it claims", n, want)
		}
		if err != nil {
			return nil, err
		}
	} else {
		var buf bytes.Buffer
		buf.Grow(eagerLimit)
		if _, err := buf.ReadFrom(io.LimitReader(r, int64(want))); err != nil {
			return nil, err
		}
		if buf.Len() < want {
			return nil, fmt.Errorf("decompresses to %d bytes, less than the %d it claims", buf.Len(), want)
		}
		out = buf.Bytes()
	}
	// The stream must end here (and its checksum hold).
	var one [1]byte
	for range 64 {
		k, err := r.Read(one[:])
		if k > 0 {
			return nil, fmt.Errorf("decompresses to more than the %d bytes it claims", want)
		}
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, err
		}
	}
	return nil, errors.New("the stream does not end after its data")
}
