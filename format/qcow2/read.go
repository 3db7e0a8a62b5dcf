package qcow2

import (
	"bytes"
	"errors"
	"io"
	"sync"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"

	"github.com/vdisk/vdisk/driver"
)

// Kinds of runs the mapping reports.
const (
	rUnalloc = iota
	rZero
	rData
	rCompressed
)

// run is a piece of the virtual disk with one mapping.
type run struct {
	kind int
	n    int64
	host int64  // rData: host offset of the first byte; rZero: preallocated host offset or -1
	desc uint64 // rCompressed: descriptor (offset and sector count)
}

// entry reads L2 entry i of table buf.
func (im *image) entry(tb []byte, i int64) (e, bm uint64) {
	o := i * im.esz
	e = be64(tb[o:])
	if im.ext {
		bm = be64(tb[o+8:])
	}
	return
}

// setEntry writes L2 entry i of table buf.
func (im *image) setEntry(tb []byte, i int64, e, bm uint64) {
	o := i * im.esz
	put64(tb[o:], e)
	if im.ext {
		put64(tb[o+8:], bm)
	}
}

// loadL2 returns the L2 table at host offset off. Callers hold mu.
func (im *image) loadL2(off int64) (*table, error) {
	if t := im.l2c.get(off); t != nil {
		return t, nil
	}
	if off%im.cs != 0 || off <= 0 || off > im.fileEnd-im.cs {
		return nil, driver.Corruptf(im.name, off, "L2 table at %#x is misaligned or past the end of the file", off)
	}
	buf := make([]byte, im.cs)
	if err := driver.ReadFullAt(im.f, buf, off); err != nil {
		return nil, driver.Errorf(err, im.name, off, "cannot read L2 table")
	}
	t := &table{off: off, buf: buf}
	im.l2c.add(t)
	return t, nil
}

// l2Span is the number of virtual bytes one L2 table maps.
func (im *image) l2Span() int64 { return im.cs << im.l2Bits }

// l1Entry returns the L2 table offset for L1 index i (0: none).
func (im *image) l2Offset(i int64) (int64, error) {
	if i >= int64(len(im.l1)) {
		return 0, nil
	}
	e := im.l1[i]
	o := int64(e & offMask)
	if o%im.cs != 0 {
		return 0, driver.Corruptf(im.name, int64(im.hdr.l1Offset)+i*8, "L1 entry %d (%#x) is not cluster aligned", i, e)
	}
	return o, nil
}

// unitState classifies subcluster sc (cluster, without extended L2) of an
// entry. host is the host offset of the unit for data.
func (im *image) unitState(e, bm uint64, sc int64, voff int64) (kind int, host int64, err error) {
	if e&oflagCompressed != 0 {
		return rCompressed, -1, nil
	}
	o := int64(e & offMask)
	hasHost := o != 0 || (im.extData && e&oflagCopied != 0)
	checkHost := func() error {
		if o%im.cs != 0 {
			return driver.Corruptf(im.name, voff, "L2 entry %#x for guest offset %d is not cluster aligned", e, voff)
		}
		if !im.extData && o >= im.fileEnd {
			return driver.Corruptf(im.name, voff, "L2 entry for guest offset %d points past the end of the file (%#x)", voff, o)
		}
		return nil
	}
	if !im.ext {
		if e&oflagZero != 0 && im.hdr.version < 3 {
			return 0, 0, driver.Corruptf(im.name, voff, "zero cluster entry in a version 2 image (guest offset %d)", voff)
		}
		if e&oflagZero != 0 {
			if hasHost {
				return rZero, o, nil
			}
			return rZero, -1, nil
		}
		if hasHost {
			if err := checkHost(); err != nil {
				return 0, 0, err
			}
			return rData, o, nil
		}
		return rUnalloc, -1, nil
	}
	a := bm&(1<<sc) != 0
	z := bm&(1<<(32+sc)) != 0
	switch {
	case a && z:
		return 0, 0, driver.Corruptf(im.name, voff, "subcluster %d is both allocated and zero (L2 bitmap %#x)", sc, bm)
	case a:
		if !hasHost {
			return 0, 0, driver.Corruptf(im.name, voff, "allocated subcluster %d in a cluster without a host offset", sc)
		}
		if err := checkHost(); err != nil {
			return 0, 0, err
		}
		return rData, o + sc*im.scSize, nil
	case z:
		return rZero, -1, nil
	}
	return rUnalloc, -1, nil
}

// mapRange returns the run starting at off, at most n bytes, all inside one
// L2 table's range. Compressed clusters are returned one at a time unless
// merge is set (Status), in which case consecutive compressed clusters form
// one run. Callers hold mu.
func (im *image) mapRange(off, n int64, merge bool) (run, error) {
	span := im.l2Span()
	l1i := off / span
	limit := min(off+n, (l1i+1)*span)
	l2off, err := im.l2Offset(l1i)
	if err != nil {
		return run{}, err
	}
	if l2off == 0 {
		return run{kind: rUnalloc, n: limit - off, host: -1}, nil
	}
	t, err := im.loadL2(l2off)
	if err != nil {
		return run{}, err
	}
	return im.mapInTable(t.buf, off, limit, merge)
}

func (im *image) mapInTable(tb []byte, off, limit int64, merge bool) (run, error) {
	var r run
	pos := off
	first := true
	for pos < limit {
		ci := (pos >> im.cbits) & (im.l2n - 1)
		e, bm := im.entry(tb, ci)
		sc := (pos & (im.cs - 1)) >> im.scBits
		unitStart := pos &^ (im.scSize - 1)
		if e&oflagCompressed != 0 {
			unitStart = pos &^ (im.cs - 1)
		}
		kind, host, err := im.unitState(e, bm, sc, pos)
		if err != nil {
			return run{}, err
		}
		unitEnd := unitStart + im.scSize
		if kind == rCompressed {
			unitEnd = unitStart + im.cs
		}
		end := min(unitEnd, limit)
		if first {
			r.kind = kind
			r.host = -1
			if host >= 0 {
				r.host = host + (pos - unitStart)
			}
			if kind == rCompressed {
				r.desc = e &^ (oflagCompressed | oflagCopied)
			}
			first = false
		} else {
			if kind != r.kind {
				break
			}
			switch kind {
			case rData:
				if host != r.host+(pos-off) {
					return r, nil
				}
			case rZero:
				if r.host >= 0 && host != r.host+(pos-off) || r.host < 0 && host >= 0 {
					return r, nil
				}
			case rCompressed:
				if !merge {
					return r, nil
				}
			}
		}
		r.n = end - off
		pos = end
	}
	return r, nil
}

// Status reports the run starting at off.
func (im *image) Status(off, n int64) (driver.Extent, error) {
	im.opMu.RLock()
	defer im.opMu.RUnlock()
	im.drainCompressor()
	im.mu.Lock()
	r, err := im.mapRange(off, n, true)
	im.mu.Unlock()
	if err != nil {
		return driver.Extent{}, err
	}
	x := driver.Extent{Length: r.n, Offset: -1}
	switch r.kind {
	case rUnalloc:
		x.State = driver.Unallocated
	case rZero:
		x.State = driver.Zero
		x.Offset = r.host
	case rData:
		x.State = driver.Data
		x.Offset = r.host
		if im.crypt != nil {
			x.Offset = -1 // ciphertext: no byte-for-byte copy
		}
	case rCompressed:
		x.State = driver.Data
		x.Compressed = true
	}
	return x, nil
}

// ReadAt reads guest data. The container asks only for runs Status
// reports as Data; zero and unallocated runs read as zeros.
func (im *image) ReadAt(p []byte, off int64) (int, error) {
	im.opMu.RLock()
	defer im.opMu.RUnlock()
	im.drainCompressor()
	if err := driver.CheckRange(im.name, off, int64(len(p)), im.Size()); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		im.mu.Lock()
		r, err := im.mapRange(pos, int64(len(p)-done), false)
		im.mu.Unlock()
		if err != nil {
			return done, err
		}
		chunk := p[done : done+int(r.n)]
		switch r.kind {
		case rUnalloc, rZero:
			// Unallocated runs are the container's to read (from the
			// backing chain, or zeros); reading them here is harmless.
			clear(chunk)
		case rData:
			if err := im.readData(chunk, r.host, pos); err != nil {
				return done, err
			}
		case rCompressed:
			if im.crypt != nil {
				return done, driver.Corruptf(im.name, pos, "compressed cluster in an encrypted image")
			}
			if err := im.readCompressed(chunk, r.desc, pos&(im.cs-1)); err != nil {
				return done, err
			}
		}
		done += int(r.n)
	}
	return done, nil
}

// compressedRange decodes a compressed descriptor into the host byte range
// holding the data (as the refcounts count it: whole 512-byte sectors).
func (im *image) compressedRange(desc uint64) (off, n int64) {
	off = int64(desc & im.cOffMask)
	nsec := int64((desc >> im.cshift) & im.cSecMask)
	return off, (nsec+1)*512 - (off & 511)
}

// readCompressed fills p with the bytes at in-cluster offset in of the
// compressed cluster desc.
func (im *image) readCompressed(p []byte, desc uint64, in int64) error {
	im.dcMu.Lock()
	defer im.dcMu.Unlock()
	if !im.dcValid || im.dcOff != desc {
		if im.dcBuf == nil {
			im.dcBuf = make([]byte, im.cs)
		}
		im.dcValid = false
		if err := im.decompressCluster(im.dcBuf, desc); err != nil {
			return err
		}
		im.dcOff, im.dcValid = desc, true
	}
	copy(p, im.dcBuf[in:])
	return nil
}

// invalidateDecompressed drops the decompressed-cluster cache (after the
// host bytes of a compressed cluster may have been reused).
func (im *image) invalidateDecompressed() {
	im.dcMu.Lock()
	im.dcValid = false
	im.dcMu.Unlock()
}

// decompressCluster decompresses the cluster described by desc into out
// (one cluster). Output is bounded by the cluster size whatever the input.
func (im *image) decompressCluster(out []byte, desc uint64) error {
	off, n := im.compressedRange(desc)
	fend := im.fileEndShared()
	if off <= 0 || off >= fend || off > maxHostOffset {
		return driver.Corruptf(im.name, off, "compressed cluster at %#x lies outside the file", off)
	}
	n = min(n, fend-off)
	src := getBuf(int(n))
	defer putBuf(src)
	// The last compressed cluster of a file may end short of its last
	// sector; what is missing reads as zeros.
	if err := readAtFile(im.f, src, off); err != nil {
		return driver.Errorf(err, im.name, off, "cannot read compressed cluster")
	}
	if err := decompress(im.hdr.compressionType, out, src); err != nil {
		return driver.Corruptf(im.name, off, "compressed cluster at %#x does not decompress to a full cluster: %v", off, err)
	}
	return nil
}

// fileEndShared reads fileEnd under mu.
func (im *image) fileEndShared() int64 {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.fileEnd
}

var (
	flatePool sync.Pool // io.ReadCloser implementing flate.Resetter
	zstdPool  sync.Pool // *zstd.Decoder
	bufPool   sync.Pool // *[]byte
)

func getBuf(n int) []byte {
	if b, ok := bufPool.Get().(*[]byte); ok && cap(*b) >= n {
		return (*b)[:n]
	}
	return make([]byte, n, max(n, 64<<10))
}

func putBuf(b []byte) { bufPool.Put(&b) }

// decompress fills out exactly from src; trailing input is ignored, and a
// stream that ends early is an error.
func decompress(ctype uint8, out, src []byte) error {
	switch ctype {
	case compressionZlib:
		br := bytes.NewReader(src)
		var r io.ReadCloser
		if v, ok := flatePool.Get().(io.ReadCloser); ok {
			r = v
			if err := r.(flate.Resetter).Reset(br, nil); err != nil {
				return err
			}
		} else {
			r = flate.NewReader(br)
		}
		_, err := io.ReadFull(r, out)
		flatePool.Put(r)
		return err
	case compressionZstd:
		d, _ := zstdPool.Get().(*zstd.Decoder)
		if d == nil {
			var err error
			d, err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
				zstd.WithDecoderMaxWindow(64<<20), zstd.WithDecoderMaxMemory(64<<20))
			if err != nil {
				return err
			}
		}
		if err := d.Reset(bytes.NewReader(src)); err != nil {
			zstdPool.Put(d)
			return err
		}
		_, err := io.ReadFull(d, out)
		_ = d.Reset(nil)
		zstdPool.Put(d)
		return err
	}
	return errors.New("unknown compression type")
}
