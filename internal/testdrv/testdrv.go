// Package testdrv is a tiny differencing image format ("testdiff") used by
// the container's tests to build chains of any depth on any storage. It is
// registered only when a test imports this package.
//
// Layout: a 512-byte header (magic, virtual size, block size, parent name
// and format), a table of one uint64 per block at offset 512 (0 =
// unallocated, 1 = zero, otherwise the file offset of the block's data),
// and data blocks appended after the table, each block-size aligned.
package testdrv

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"sync"

	"github.com/vdisk/vdisk/driver"
)

const (
	magic     = "VDTSTDF1"
	hdrSize   = 512
	entFree   = 0
	entZero   = 1
	maxBlocks = 1 << 24
)

func init() { driver.Register(Format) }

// Format is the test format's descriptor.
var Format = &driver.Format{
	Name:       "testdiff",
	Extensions: []string{"tdf"},
	Caps: driver.CapCreateDynamic | driver.CapDiff | driver.CapDiscard | driver.CapZero |
		driver.CapWrite,
	CreateOptions: []driver.Option{
		{Name: "block_size", Type: driver.TypeSize, Default: "4K", Min: 512, Max: 1 << 20, PowerOf2: true, Doc: "block size"},
	},
	Probe: func(r io.ReaderAt, size int64) int {
		b := make([]byte, 8)
		if _, err := r.ReadAt(b, 0); err != nil || string(b) != magic {
			return 0
		}
		return 100
	},
	Create: create,
	Open:   open,
}

type image struct {
	mu       sync.Mutex
	f        driver.File
	name     string
	ro       bool
	size     int64
	bs       int64
	table    []uint64
	end      int64 // next free data offset
	parent   *driver.ParentRef
	statusFn func(off, n int64) // test hook
}

func tableEnd(nblocks int64, bs int64) int64 {
	e := int64(hdrSize) + nblocks*8
	return (e + bs - 1) / bs * bs
}

func create(ctx context.Context, p *driver.CreateParams) (driver.Image, error) {
	bs := p.Options.Int("block_size")
	nb := (p.Size + bs - 1) / bs
	if nb > maxBlocks {
		return nil, driver.OptionErrorf("size %d too large for the test format", p.Size)
	}
	flag := driver.ReadWrite | driver.Create | driver.Truncate
	if !p.Overwrite {
		flag |= driver.Excl
	}
	f, err := p.Storage.Open(p.Name, flag)
	if err != nil {
		return nil, err
	}
	hdr := make([]byte, hdrSize)
	copy(hdr, magic)
	binary.LittleEndian.PutUint64(hdr[8:], uint64(p.Size))
	binary.LittleEndian.PutUint64(hdr[16:], uint64(bs))
	if p.ParentRef != nil {
		if len(p.ParentRef.Name) > 200 || len(p.ParentRef.Format) > 32 {
			f.Close()
			return nil, driver.OptionErrorf("parent name too long")
		}
		hdr[24] = byte(len(p.ParentRef.Name))
		copy(hdr[25:], p.ParentRef.Name)
		hdr[240] = byte(len(p.ParentRef.Format))
		copy(hdr[241:], p.ParentRef.Format)
	}
	if _, err := f.WriteAt(hdr, 0); err != nil {
		f.Close()
		return nil, err
	}
	if err := f.Truncate(tableEnd(nb, bs)); err != nil {
		f.Close()
		return nil, err
	}
	im := &image{f: f, name: p.Name, size: p.Size, bs: bs, table: make([]uint64, nb), end: tableEnd(nb, bs)}
	if p.ParentRef != nil {
		r := *p.ParentRef
		im.parent = &r
	}
	return im, nil
}

func open(ctx context.Context, p *driver.OpenParams) (driver.Image, error) {
	flag := driver.ReadOnly
	if !p.ReadOnly {
		flag = driver.ReadWrite
	}
	f, err := p.Storage.Open(p.Name, flag)
	if err != nil {
		return nil, err
	}
	im, err := load(f, p)
	if err != nil {
		f.Close()
		return nil, err
	}
	return im, nil
}

func load(f driver.File, p *driver.OpenParams) (*image, error) {
	fsize, err := f.Size()
	if err != nil {
		return nil, err
	}
	hdr := make([]byte, hdrSize)
	if err := driver.ReadFullAt(f, hdr, 0); err != nil {
		return nil, driver.Corruptf(p.Name, 0, "short header: %v", err)
	}
	if !bytes.Equal(hdr[:8], []byte(magic)) {
		return nil, driver.Corruptf(p.Name, 0, "bad magic")
	}
	size := int64(binary.LittleEndian.Uint64(hdr[8:]))
	bs := int64(binary.LittleEndian.Uint64(hdr[16:]))
	if bs < 512 || bs > 1<<20 || bs&(bs-1) != 0 {
		return nil, driver.Corruptf(p.Name, 16, "bad block size %d", bs)
	}
	if size < 0 || size/bs > maxBlocks {
		return nil, driver.Corruptf(p.Name, 8, "bad size %d", size)
	}
	nb := (size + bs - 1) / bs
	if tableEnd(nb, bs) > fsize {
		return nil, driver.Corruptf(p.Name, hdrSize, "block table past end of file")
	}
	raw := make([]byte, nb*8)
	if err := driver.ReadFullAt(f, raw, hdrSize); err != nil {
		return nil, err
	}
	im := &image{f: f, name: p.Name, ro: p.ReadOnly, size: size, bs: bs, table: make([]uint64, nb)}
	im.end = tableEnd(nb, bs)
	for i := range im.table {
		e := binary.LittleEndian.Uint64(raw[i*8:])
		if e > entZero && (e%uint64(bs) != 0 || int64(e) < tableEnd(nb, bs) || int64(e) > fsize-bs) {
			return nil, driver.Corruptf(p.Name, int64(hdrSize+i*8), "block %d points to %d, outside the data area", i, e)
		}
		im.table[i] = e
		if e > entZero && int64(e)+bs > im.end {
			im.end = int64(e) + bs
		}
	}
	if n := int(hdr[24]); n > 0 {
		if n > 200 || int(hdr[240]) > 32 {
			return nil, driver.Corruptf(p.Name, 24, "bad parent name length")
		}
		im.parent = &driver.ParentRef{Name: string(hdr[25 : 25+n]), Format: string(hdr[241 : 241+int(hdr[240])])}
	}
	return im, nil
}

func (im *image) Size() int64 { return im.size }

func (im *image) Status(off, n int64) (driver.Extent, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	b := off / im.bs
	first := im.table[b]
	st, dataOff := state(first), int64(-1)
	if st == driver.Data {
		dataOff = int64(first) + off%im.bs
	}
	end := min(off+n, (b+1)*im.bs)
	for end < off+n {
		nb := end / im.bs
		e := im.table[nb]
		if state(e) != st || (st == driver.Data && int64(e) != int64(first)+(nb-b)*im.bs) {
			break
		}
		end = min(off+n, (nb+1)*im.bs)
	}
	return driver.Extent{State: st, Length: end - off, Offset: dataOff}, nil
}

func state(e uint64) driver.State {
	switch e {
	case entFree:
		return driver.Unallocated
	case entZero:
		return driver.Zero
	}
	return driver.Data
}

func (im *image) ReadAt(p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		b := (off + int64(done)) / im.bs
		in := (off + int64(done)) % im.bs
		c := min(int64(len(p)-done), im.bs-in)
		im.mu.Lock()
		e := im.table[b]
		im.mu.Unlock()
		chunk := p[done : done+int(c)]
		switch e {
		case entFree, entZero:
			// Only Data runs are read (contract v2); be harmless anyway.
			clear(chunk)
		default:
			if err := driver.ReadFullAt(im.f, chunk, int64(e)+in); err != nil {
				return done, err
			}
		}
		done += int(c)
	}
	return done, nil
}

// needFill asks the container to fill the partial free blocks at either end
// of [off, off+n). Unlike the real formats, testdiff asks also without a
// parent (its free blocks then read zeros through the container), so that
// the container's fill path is exercised by every chain test.
func (im *image) needFill(off, n int64) error {
	if n <= 0 {
		return nil
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	start, end := off, off+n
	if hb := off / im.bs; off%im.bs != 0 && im.table[hb] == entFree {
		start = hb * im.bs
	}
	tb := (off + n - 1) / im.bs
	if tEnd := min((tb+1)*im.bs, im.size); end != tEnd && im.table[tb] == entFree {
		end = tEnd
	}
	if start != off || end != off+n {
		return driver.NeedFill(im.name, start, end)
	}
	return nil
}

func (im *image) WriteAt(p []byte, off int64) (int, error) {
	if im.ro {
		return 0, driver.ErrReadOnly
	}
	if err := im.needFill(off, int64(len(p))); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		b := pos / im.bs
		in := pos % im.bs
		c := min(int64(len(p)-done), im.bs-in)
		if err := im.writeBlock(b, in, p[done:done+int(c)]); err != nil {
			return done, err
		}
		done += int(c)
	}
	return done, nil
}

func (im *image) writeBlock(b, in int64, p []byte) error {
	im.mu.Lock()
	defer im.mu.Unlock()
	e := im.table[b]
	if e > entZero {
		_, err := im.f.WriteAt(p, int64(e)+in)
		return err
	}
	// A free block is written whole (needFill saw to it) or is the short
	// last block; a zero block reads zeros around p.
	blk := make([]byte, im.bs)
	copy(blk[in:], p)
	at := im.end
	if _, err := im.f.WriteAt(blk, at); err != nil {
		return err
	}
	im.end += im.bs
	return im.setEntry(b, uint64(at))
}

func (im *image) setEntry(b int64, v uint64) error {
	var buf [8]byte
	binary.LittleEndian.PutUint64(buf[:], v)
	if _, err := im.f.WriteAt(buf[:], hdrSize+b*8); err != nil {
		return err
	}
	im.table[b] = v
	return nil
}

// WriteZeroes marks whole blocks zero and zero-fills partial ones.
func (im *image) WriteZeroes(off, n int64, unmap bool) error {
	return im.mark(off, n, entZero)
}

// Discard makes whole blocks unallocated (falling through to the parent).
func (im *image) Discard(off, n int64) error {
	return im.mark(off, n, entFree)
}

func (im *image) mark(off, n int64, v uint64) error {
	if im.ro {
		return driver.ErrReadOnly
	}
	if v == entZero {
		if err := im.needFill(off, n); err != nil {
			return err
		}
	}
	end := off + n
	for off < end {
		b := off / im.bs
		in := off % im.bs
		c := min(end-off, im.bs-in)
		if c == im.bs || (off+c == im.size && in == 0) {
			im.mu.Lock()
			err := im.setEntry(b, v)
			im.mu.Unlock()
			if err != nil {
				return err
			}
		} else if v == entZero {
			if err := im.writeBlock(b, in, make([]byte, c)); err != nil {
				return err
			}
		}
		off += c
	}
	return nil
}

func (im *image) Flush() error {
	if im.ro {
		return nil
	}
	return im.f.Sync()
}

func (im *image) Close() error { return im.f.Close() }

func (im *image) Info() driver.Info {
	return driver.Info{Format: "testdiff", VirtualSize: im.size, ClusterSize: im.bs,
		Specific: map[string]any{"block-size": im.bs}}
}

func (im *image) Parent() *driver.ParentRef { return im.parent }

func (im *image) String() string { return fmt.Sprintf("testdiff(%s)", im.name) }

// SetParent rewrites the parent reference in the header.
func (im *image) SetParent(ref *driver.ParentRef) error {
	if im.ro {
		return driver.ErrReadOnly
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	var name, format string
	if ref != nil {
		name, format = ref.Name, ref.Format
	}
	if len(name) > 200 || len(format) > 32 {
		return driver.OptionErrorf("parent name too long")
	}
	buf := make([]byte, hdrSize-24)
	buf[0] = byte(len(name))
	copy(buf[1:], name)
	buf[240-24] = byte(len(format))
	copy(buf[241-24:], format)
	if _, err := im.f.WriteAt(buf, 24); err != nil {
		return err
	}
	if ref == nil {
		im.parent = nil
	} else {
		r := *ref
		im.parent = &r
	}
	return nil
}

// MakeEmpty frees every block.
func (im *image) MakeEmpty() error {
	if im.ro {
		return driver.ErrReadOnly
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	clear(im.table)
	if _, err := im.f.WriteAt(make([]byte, len(im.table)*8), hdrSize); err != nil {
		return err
	}
	im.end = tableEnd(int64(len(im.table)), im.bs)
	return im.f.Truncate(im.end)
}
