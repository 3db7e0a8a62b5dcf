package qcow

import (
	"bytes"
	"errors"
	"io"
	"sync"

	"github.com/klauspost/compress/flate"

	"github.com/vdisk/vdisk/driver"
)

// batch is how many L2 entries one metadata lookup fetches.
const batch = 512

// maxScan bounds the L2 entries one Status call looks at.
const maxScan = 1 << 18

// kind classifies an L2 entry.
type kind uint8

const (
	kUnalloc kind = iota
	kNormal
	kCompressed
)

func kindOf(e uint64) kind {
	switch {
	case e == 0:
		return kUnalloc
	case e&flagCompressed != 0:
		return kCompressed
	}
	return kNormal
}

// Status reports the run at off: unallocated clusters, compressed
// clusters (data without a file offset), or normal clusters contiguous in
// the file.
func (im *image) Status(off, n int64) (driver.Extent, error) {
	if err := im.drainCompressed(); err != nil {
		return driver.Extent{}, err
	}
	im.mu.RLock()
	defer im.mu.RUnlock()
	size := im.Size()
	if n <= 0 || off < 0 || off >= size {
		return driver.Extent{}, driver.CheckRange(im.name, off, max(n, 1), size)
	}
	end := off + min(n, size-off)
	cs := im.lo.cs
	c := off / cs
	var buf [batch]uint64
	first, prev := uint64(0), uint64(0)
	pos := off // end of the run so far
	// A hostile image can map a huge disk with a few repeated tables:
	// one call looks at a bounded number of entries (absent and empty
	// tables count as one) and returns a shorter run beyond.
	for scanned := 0; pos < end && scanned < maxScan; scanned++ {
		if k := im.absentTable(c); k > 0 && (pos == off || first == 0) {
			// No L2 table: the rest of its span is unallocated, in one step.
			first, prev = 0, 0
			c += k
			pos = min(end, c*cs)
			continue
		}
		want := min(int64(batch), (end-1)/cs-c+1)
		got, err := im.entries(c, buf[:want])
		if err != nil {
			return driver.Extent{}, err
		}
		scanned += got - 1
		for _, e := range buf[:got] {
			if pos == off {
				first, prev = e, e
			} else if kindOf(e) != kindOf(first) || (kindOf(e) == kNormal && e != prev+uint64(cs)) {
				return im.extent(first, off, pos), nil
			}
			prev = e
			c++
			pos = min(end, c*cs)
		}
	}
	return im.extent(first, off, pos), nil
}

func (im *image) extent(first uint64, off, end int64) driver.Extent {
	switch kindOf(first) {
	case kNormal:
		return driver.Extent{State: driver.Data, Length: end - off, Offset: int64(first) + off%im.lo.cs}
	case kCompressed:
		return driver.Extent{State: driver.Data, Length: end - off, Offset: -1, Compressed: true}
	}
	return driver.Extent{State: driver.Unallocated, Length: end - off, Offset: -1}
}

// ReadAt reads p at off: normal clusters from the file (clusters
// contiguous in the file in one read), compressed clusters inflated.
// Unallocated clusters read zeros (the container reads them from the
// chain below instead).
func (im *image) ReadAt(p []byte, off int64) (int, error) {
	if err := im.drainCompressed(); err != nil {
		return 0, err
	}
	im.mu.RLock()
	defer im.mu.RUnlock()
	if err := driver.CheckRange(im.name, off, int64(len(p)), im.Size()); err != nil {
		return 0, err
	}
	cs := im.lo.cs
	var buf [batch]uint64
	done := int64(0)
	total := int64(len(p))
	for done < total {
		pos := off + done
		c := pos / cs
		want := min(int64(batch), (off+total-1)/cs-c+1)
		got, err := im.entries(c, buf[:want])
		if err != nil {
			return int(done), err
		}
		for i := 0; i < got; {
			pos = off + done
			in := pos % cs
			e := buf[i]
			n := min(total-done, cs-in)
			i++
			switch kindOf(e) {
			case kUnalloc:
				clear(p[done : done+n])
			case kCompressed:
				data, err := im.inflate(e, c)
				if err != nil {
					return int(done), err
				}
				copy(p[done:done+n], data[in:])
			default:
				if e&511 != 0 {
					return int(done), driver.Corruptf(im.name, pos, "cluster %d is at file offset %d, which is not sector-aligned", c, e)
				}
				if e >= maxFileOff {
					return int(done), driver.Corruptf(im.name, pos, "cluster %d is at file offset %d, past the end of the file", c, e)
				}
				// Extend over clusters contiguous in the file.
				for i < got && done+n < total && buf[i] == e+uint64(n+in) {
					n += min(total-done-n, cs)
					i++
				}
				if err := im.readData(p[done:done+n], int64(e)+in); err != nil {
					return int(done), err
				}
			}
			done += n
			c = (off + done) / cs
		}
	}
	return int(done), nil
}

// readData reads file data at fo. A cluster whose tail is missing from
// the file reads zeros there (files are not always extended to a whole
// last cluster); data starting past the end of the file is corrupt.
func (im *image) readData(p []byte, fo int64) error {
	n, err := im.f.ReadAt(p, fo)
	if n == len(p) {
		return nil
	}
	if err != nil && err != io.EOF {
		return driver.WithFile(err, "read", im.name)
	}
	if n == 0 {
		return driver.Corruptf(im.name, fo, "data cluster starts past the end of the file")
	}
	clear(p[n:])
	return nil
}

var flatePool sync.Pool // io.ReadCloser implementing flate.Resetter

// inflate returns the content of compressed cluster c (entry e), which
// the caller must not change. It reads at most one cluster of stream and
// produces exactly one cluster: longer streams are cut short there, as
// qemu does, and streams that end early are corrupt.
func (im *image) inflate(e uint64, c int64) ([]byte, error) {
	if data := im.zc.get(e); data != nil {
		return data, nil
	}
	coff, clen := im.lo.compressed(e)
	if clen == 0 {
		return nil, driver.Corruptf(im.name, coff, "compressed cluster %d has a stream of length 0", c)
	}
	src := make([]byte, clen)
	if n, err := im.f.ReadAt(src, coff); n != len(src) {
		if err == nil || err == io.EOF {
			return nil, driver.Corruptf(im.name, coff, "compressed cluster %d (%d bytes) extends past the end of the file", c, clen)
		}
		return nil, driver.WithFile(err, "read compressed cluster", im.name)
	}
	out := make([]byte, im.lo.cs)
	var r io.ReadCloser
	if v := flatePool.Get(); v != nil {
		r = v.(io.ReadCloser)
		if err := r.(flate.Resetter).Reset(bytes.NewReader(src), nil); err != nil {
			return nil, driver.WithFile(err, "inflate", im.name)
		}
	} else {
		r = flate.NewReader(bytes.NewReader(src))
	}
	_, err := io.ReadFull(r, out)
	flatePool.Put(r)
	if err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			return nil, driver.Corruptf(im.name, coff, "compressed cluster %d inflates to less than a cluster", c)
		}
		return nil, driver.Corruptf(im.name, coff, "compressed cluster %d does not inflate: %v", c, err)
	}
	im.zc.put(e, out)
	return out, nil
}

// zcache holds the last few inflated clusters, keyed by their L2 entry
// (stream offset and length), so that reads in pieces smaller than a
// cluster inflate it once. Streams are never rewritten in place (only
// MakeEmpty, which resets the cache, reuses file space).
type zcache struct {
	mu   sync.Mutex
	keys [4]uint64
	data [4][]byte
	next int
}

func (z *zcache) get(e uint64) []byte {
	z.mu.Lock()
	defer z.mu.Unlock()
	for i, k := range z.keys {
		if k == e && z.data[i] != nil {
			return z.data[i]
		}
	}
	return nil
}

func (z *zcache) put(e uint64, d []byte) {
	z.mu.Lock()
	defer z.mu.Unlock()
	z.keys[z.next], z.data[z.next] = e, d
	z.next = (z.next + 1) % len(z.keys)
}

func (z *zcache) reset() {
	z.mu.Lock()
	defer z.mu.Unlock()
	z.keys, z.data = [4]uint64{}, [4][]byte{}
}
