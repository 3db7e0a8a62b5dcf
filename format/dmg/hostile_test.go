package dmg

import (
	"encoding/binary"
	"runtime"
	"strings"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// openBytes opens b as a DMG on memfs with the driver.
func openBytes(t testing.TB, b []byte) (*image, error) {
	t.Helper()
	st := memfs.New()
	writeMem(t, st, "h.dmg", b)
	img, err := open(ctx, &driver.OpenParams{Storage: st, Name: "h.dmg", ReadOnly: true})
	if err != nil {
		return nil, err
	}
	return img.(*image), nil
}

func simple(chunks ...hchunk) *himage {
	var n int64
	for _, c := range chunks {
		n += c.sectors
	}
	return &himage{sectors: n, parts: []hpart{{name: "p", chunks: chunks}}}
}

// TestHostileOpen: metadata that points outside the file, claims more
// chunks than it holds, overlaps or exceeds the chunk limits is refused at
// open with ErrCorrupt naming the problem.
func TestHostileOpen(t *testing.T) {
	be := binary.BigEndian
	zl := hchunk{typ: typeZlib, sectors: 8, content: textBytes(4096)}
	cases := []struct {
		name string
		img  *himage
		raw  []byte
		want string
	}{
		{"huge chunk count", &himage{sectors: 8, parts: []hpart{{chunks: []hchunk{zl}}}, chunkCount: map[int]uint32{0: 0xffffffff}}, nil, "declares 4294967295 chunks"},
		{"overlap", &himage{sectors: 16, parts: []hpart{{sector: 0, chunks: []hchunk{zl}}, {sector: 4, chunks: []hchunk{zl}}}}, nil, "overlap"},
		{"xml past EOF", &himage{sectors: 8, parts: []hpart{{chunks: []hchunk{zl}}}, kolyOverride: func(k []byte) { be.PutUint64(k[0xd8:], 1<<40) }}, nil, "XML property list"},
		{"xml length past EOF", &himage{sectors: 8, parts: []hpart{{chunks: []hchunk{zl}}}, kolyOverride: func(k []byte) { be.PutUint64(k[0xe0:], 1<<62) }}, nil, "lies past the trailer"},
		{"rsrc past EOF", &himage{sectors: 8, parts: []hpart{{chunks: []hchunk{zl}}}, kolyOverride: func(k []byte) { be.PutUint64(k[0x28:], 1<<63); be.PutUint64(k[0x30:], 5) }}, nil, "resource fork"},
		{"data fork past EOF", &himage{sectors: 8, parts: []hpart{{chunks: []hchunk{zl}}}, kolyOverride: func(k []byte) { be.PutUint64(k[0x18:], 1<<50) }}, nil, "data fork offset"},
		{"chunk past EOF", simple(hchunk{typ: typeZlib, sectors: 8, content: textBytes(4096), length: 1 << 20}), nil, "lie past the data fork"},
		{"chunk too long", simple(hchunk{typ: typeZlib, sectors: 8, content: textBytes(4096), length: 65<<20 + 1}), nil, "stored length"},
		{"chunk too many sectors", simple(hchunk{typ: typeZlib, sectors: 131073, content: textBytes(4096)}), nil, "more than the 131072"},
		{"raw too short", simple(hchunk{typ: typeRaw, sectors: 8, content: textBytes(4096), length: 100}), nil, "stores only"},
		{"sector overflow", &himage{sectors: 8, parts: []hpart{{sector: 1 << 62, chunks: []hchunk{zl}}}}, nil, "past any disk size"},
		{"bad xml", &himage{sectors: 8, parts: []hpart{{chunks: []hchunk{zl}}}, xmlOverride: []byte("<plist><dict><key>resource-fork</key><dict><key>blkx</key><array><dict><key>Data</key><data>!!!</data></dict></array></dict></dict></plist>")}, nil, "base64"},
		{"deep xml", &himage{sectors: 8, parts: []hpart{{chunks: []hchunk{zl}}}, xmlOverride: []byte("<plist>" + strings.Repeat("<array>", 100) + "</plist>")}, nil, "nested deeper"},
		{"no blkx", &himage{sectors: 8, parts: []hpart{{chunks: []hchunk{zl}}}, xmlOverride: []byte("<plist><dict></dict></plist>")}, nil, "no resource-fork"},
		{"no map", &himage{sectors: 8, parts: []hpart{{chunks: []hchunk{zl}}}, kolyOverride: func(k []byte) { be.PutUint64(k[0xe0:], 0) }}, nil, "neither"},
		{"no trailer", nil, make([]byte, 4096), "no UDIF trailer"},
		{"tiny", nil, []byte("koly"), "too small"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := c.raw
			if c.img != nil {
				b = c.img.build()
			}
			im, err := openBytes(t, b)
			if err == nil {
				im.Close()
				t.Fatal("opened")
			}
			if !errorsIs(err, driver.ErrCorrupt) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want ErrCorrupt with %q", err, c.want)
			}
		})
	}
}

// TestHostileChunks: chunks that decompress to more or less than they
// claim, ADC references before the start and truncated streams open but
// fail to read with ErrCorrupt, using memory bounded by the chunk's claimed
// size (a zlib bomb is not expanded).
func TestHostileChunks(t *testing.T) {
	bomb := hzlib(make([]byte, 8<<20))
	cases := []struct {
		name string
		c    hchunk
		want string
	}{
		{"zlib more", hchunk{typ: typeZlib, sectors: 4, stored: hzlib(textBytes(4096))}, "more than"},
		{"zlib less", hchunk{typ: typeZlib, sectors: 16, stored: hzlib(textBytes(4096))}, "less than"},
		{"zlib bomb", hchunk{typ: typeZlib, sectors: 8, stored: bomb}, "more than"},
		{"zlib claims 64 MiB", hchunk{typ: typeZlib, sectors: 131072, stored: hzlib(textBytes(4096))}, "less than"},
		{"adc claims 64 MiB", hchunk{typ: typeADC, sectors: 131072, stored: hadc(textBytes(4096))}, "decompresses to 4096"},
		{"zlib garbage", hchunk{typ: typeZlib, sectors: 8, stored: []byte("not zlib at all")}, "zlib chunk"},
		{"zlib truncated", hchunk{typ: typeZlib, sectors: 8, stored: hzlib(textBytes(4096))[:20]}, "zlib chunk"},
		{"adc before start", hchunk{typ: typeADC, sectors: 1, stored: []byte{0x00, 5}}, "before the start"},
		{"adc more", hchunk{typ: typeADC, sectors: 1, stored: hadc(textBytes(1024))}, "more than"},
		{"adc less", hchunk{typ: typeADC, sectors: 4, stored: hadc(textBytes(1024))}, "decompresses to 1024"},
		{"bzip2 garbage", hchunk{typ: typeBzip2, sectors: 8, stored: []byte("BZh91AY&SYgarbage")}, "bzip2 chunk"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			im, err := openBytes(t, simple(c.c).build())
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			var ms0, ms1 runtime.MemStats
			runtime.ReadMemStats(&ms0)
			_, err = im.ReadAt(make([]byte, 512), 0)
			runtime.ReadMemStats(&ms1)
			if !errorsIs(err, driver.ErrCorrupt) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("read: %v, want ErrCorrupt with %q", err, c.want)
			}
			if grew := ms1.TotalAlloc - ms0.TotalAlloc; grew > 16<<20 {
				t.Fatalf("a hostile chunk made the reader allocate %d bytes", grew)
			}
		})
	}
}

// TestHostileMemory smashes trailer and mish fields of a small image (its
// block map in a resource fork, so the tables are binary in the file):
// opening, walking and reading stay within 64 MiB of heap or fail clearly.
func TestHostileMemory(t *testing.T) {
	h := foreignImages()["rsrc"]
	good := h.build()
	ko := len(good) - 512
	var data int
	for _, c := range h.parts[0].chunks {
		switch c.typ {
		case typeZlib:
			data += len(hzlib(c.content))
		case typeRaw:
			data += len(c.content)
		}
	}
	mish := data + 256 + 4
	be := func(off, size int, v uint64) disktest.Field {
		return disktest.Field{Off: off, Size: size, BigEndian: true, Value: v}
	}
	cases := []disktest.Hostile{
		{Name: "sector count", Fields: []disktest.Field{be(ko+0x1ec, 8, 1<<53)}},
		{Name: "sector count overflow", Fields: []disktest.Field{be(ko+0x1ec, 8, 1<<63)}},
		{Name: "rsrc length", Fields: []disktest.Field{be(ko+0x30, 8, 1<<40)}},
		{Name: "rsrc offset", Fields: []disktest.Field{be(ko+0x28, 8, 1<<62)}},
		{Name: "data fork offset", Fields: []disktest.Field{be(ko+0x18, 8, 1<<62)}},
		{Name: "xml instead", Fields: []disktest.Field{be(ko+0x30, 8, 0), be(ko+0xe0, 8, 1<<30)}},
		{Name: "resource data length", Fields: []disktest.Field{be(data+8, 4, 0xffffffff)}},
		{Name: "resource length", Fields: []disktest.Field{be(data+256, 4, 0xfffffff0)}},
		{Name: "mish chunk count", Fields: []disktest.Field{be(mish+200, 4, 0xffffffff)}},
		{Name: "mish sectors", Fields: []disktest.Field{be(mish+8, 8, 1<<60)}},
		{Name: "chunk sectors", Fields: []disktest.Field{be(mish+204+16, 8, 131072)}},
		{Name: "chunk sectors huge", Fields: []disktest.Field{be(mish+204+16, 8, 1<<40)}},
		{Name: "chunk length", Fields: []disktest.Field{be(mish+204+32, 8, 64<<20)}},
		{Name: "chunk offset", Fields: []disktest.Field{be(mish+204+24, 8, 1<<62)}},
		{Name: "zero chunk sectors", Fields: []disktest.Field{be(mish+204+40+16, 8, 1<<50)}},
		{Name: "chunk type", Fields: []disktest.Field{be(mish+204, 4, typeLZFSE)}},
	}
	disktest.HostileMemory(t, "dmg", good, cases, 64<<20)
}

// TestUnsupportedChunks: LZFSE and unknown chunk types open (their
// sectors are Data) and fail to read with ErrUnsupported.
func TestUnsupportedChunks(t *testing.T) {
	for _, typ := range []uint32{typeLZFSE, 0x80000009} {
		im, err := openBytes(t, simple(hchunk{typ: typ, sectors: 8, stored: []byte("bvx2....")}, hchunk{typ: typeZero, sectors: 8}).build())
		if err != nil {
			t.Fatal(err)
		}
		if e, _ := im.Status(0, im.Size()); e.State != driver.Data || e.Length != 4096 {
			t.Fatalf("status %+v", e)
		}
		_, err = im.ReadAt(make([]byte, 512), 0)
		if !errorsIs(err, driver.ErrUnsupported) {
			t.Fatalf("read of %s: %v", typeName(typ), err)
		}
		if typ == typeLZFSE && !strings.Contains(err.Error(), "LZFSE chunks are not supported") {
			t.Fatalf("read of an LZFSE chunk: %v; want an error saying LZFSE chunks are not supported", err)
		}
		if _, err := im.ReadAt(make([]byte, 512), 4096); err != nil {
			t.Fatal(err)
		}
		im.Close()
	}
}

// TestOpenReadWrite: a DMG opens read-only only.
func TestOpenReadWrite(t *testing.T) {
	st := memfs.New()
	writeMem(t, st, "r.dmg", simple(hchunk{typ: typeZero, sectors: 8}).build())
	_, err := open(ctx, &driver.OpenParams{Storage: st, Name: "r.dmg"})
	if !errorsIs(err, driver.ErrReadOnly) {
		t.Fatalf("open for writing: %v", err)
	}
	im := openImage(t, st, "r.dmg")
	defer im.Close()
	if _, err := im.WriteAt([]byte{1}, 0); !errorsIs(err, driver.ErrReadOnly) {
		t.Fatalf("write: %v", err)
	}
}

// TestZeroSectorCount: a trailer with sector count 0 (libdmg's whole-disk
// images) takes the disk size from the block map.
func TestZeroSectorCount(t *testing.T) {
	h := simple(hchunk{typ: typeRaw, sectors: 8, content: pattern(4096, 1)})
	h.sectors = 0
	im, err := openBytes(t, h.build())
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if im.Size() != 4096 {
		t.Fatalf("size %d", im.Size())
	}
}
