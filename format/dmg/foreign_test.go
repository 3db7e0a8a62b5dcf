package dmg

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/memfs"
)

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7/5)
	}
	return b
}

func textBytes(n int) []byte {
	return bytes.Repeat([]byte("the quick brown dmg jumps over the lazy koly\n"), n/45+1)[:n]
}

// foreignImages are DMGs laid out by the tests' own writer: every chunk
// type, several partitions, both block-map containers.
func foreignImages() map[string]*himage {
	return map[string]*himage{
		"types": {sectors: 40, parts: []hpart{{name: "whole disk (Apple_HFS : 0)", chunks: []hchunk{
			{typ: typeRaw, sectors: 4, content: pattern(2048, 3)},
			{typ: typeZlib, sectors: 8, content: textBytes(4096)},
			{typ: typeZero, sectors: 6},
			{typ: typeIgnore, sectors: 6},
			{typ: typeZlib, sectors: 2, content: pattern(1024, 9)},
			{typ: typeRaw, sectors: 14, content: textBytes(7168)},
		}}}},
		"multi": {sectors: 100, parts: []hpart{
			{name: "Driver Descriptor Map (DDM : 0)", sector: 0, chunks: []hchunk{{typ: typeRaw, sectors: 1, content: pattern(512, 1)}}},
			{name: "Apple (Apple_partition_map : 1)", sector: 1, chunks: []hchunk{{typ: typeZlib, sectors: 63, content: textBytes(63 * 512)}}},
			{name: "disk image (Apple_HFS : 2)", sector: 64, chunks: []hchunk{
				{typ: typeZero, sectors: 10},
				{typ: typeZlib, sectors: 16, content: pattern(16*512, 5)},
				{typ: typeRaw, sectors: 10, content: pattern(10*512, 77)},
			}},
		}},
		"rsrc": {sectors: 24, rsrc: true, parts: []hpart{{name: "", chunks: []hchunk{
			{typ: typeZlib, sectors: 8, content: textBytes(4096)},
			{typ: typeZero, sectors: 8},
			{typ: typeRaw, sectors: 8, content: pattern(4096, 40)},
		}}}},
		"adc": {sectors: 32, parts: []hpart{{name: "whole disk (Apple_HFS : 0)", chunks: []hchunk{
			{typ: typeADC, sectors: 16, content: append(textBytes(6000), make([]byte, 16*512-6000)...)},
			{typ: typeADC, sectors: 8, content: pattern(4096, 200)},
			{typ: typeZero, sectors: 8},
		}}}},
	}
}

// TestForeignImages: images from the tests' own writer read bit-exact
// through vdisk, and qemu-img reads the same bytes (every image but the
// ADC one: qemu has no ADC decoder).
func TestForeignImages(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	for name, h := range foreignImages() {
		t.Run(name, func(t *testing.T) {
			img := filepath.Join(dir, name+".dmg")
			want := h.content()
			if err := os.WriteFile(img, h.build(), 0o644); err != nil {
				t.Fatal(err)
			}
			d := openDisk(t, nil, img)
			defer d.Close()
			if d.Size() != int64(len(want)) {
				t.Fatalf("size %d, want %d", d.Size(), len(want))
			}
			if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
				t.Fatal("vdisk reads different bytes")
			}
			if name == "adc" {
				return
			}
			raw := filepath.Join(dir, name+".raw")
			os.WriteFile(raw, want, 0o644)
			if !qemutest.Compare(t, "dmg", img, "raw", raw) {
				t.Fatal("qemu-img reads the hand-made image differently")
			}
		})
	}
}

// TestForeignStatus: zero-fill chunks are Zero runs, ignore chunks and
// uncovered sectors Unallocated, raw chunks Data at their file offset,
// compressed chunks Data without one; the runs tile the disk.
func TestForeignStatus(t *testing.T) {
	h := foreignImages()["types"]
	st := memfs.New()
	writeMem(t, st, "t.dmg", h.build())
	im := openImage(t, st, "t.dmg")
	defer im.Close()
	type run struct {
		state driver.State
		n     int64
		raw   bool
	}
	want := []run{{driver.Data, 4 * 512, true}, {driver.Data, 8 * 512, false}, {driver.Zero, 6 * 512, false},
		{driver.Unallocated, 6 * 512, false}, {driver.Data, 2 * 512, false}, {driver.Data, 14 * 512, true}}
	var off int64
	for i, w := range want {
		e, err := im.Status(off, im.Size()-off)
		if err != nil {
			t.Fatal(err)
		}
		if e.State != w.state || e.Length != w.n || (e.Offset >= 0) != w.raw || e.Compressed == w.raw && w.state == driver.Data {
			t.Fatalf("run %d at %d: %+v, want %+v", i, off, e, w)
		}
		if w.raw {
			b := make([]byte, 512)
			im.f.ReadAt(b, e.Offset)
			if !bytes.Equal(b, h.content()[off:off+512]) {
				t.Fatalf("run %d: raw offset %d holds other bytes", i, e.Offset)
			}
		}
		off += e.Length
	}
	if off != im.Size() {
		t.Fatalf("runs end at %d of %d", off, im.Size())
	}
	// A request inside a run is cut to it; a short request to its length.
	if e, _ := im.Status(5*512+100, 100); e.Length != 100 || e.State != driver.Data {
		t.Fatalf("short request: %+v", e)
	}
}

// TestPartitionsOutOfOrder: blkx tables listed out of sector order (and a
// gap between them) read as the ordered disk, the gap as a hole.
func TestPartitionsOutOfOrder(t *testing.T) {
	h := &himage{sectors: 30, parts: []hpart{
		{name: "b", sector: 20, chunks: []hchunk{{typ: typeZlib, sectors: 10, content: pattern(5120, 4)}}},
		{name: "a", sector: 0, chunks: []hchunk{{typ: typeRaw, sectors: 10, content: pattern(5120, 8)}}},
	}}
	st := memfs.New()
	writeMem(t, st, "o.dmg", h.build())
	im := openImage(t, st, "o.dmg")
	defer im.Close()
	got := make([]byte, im.Size())
	if _, err := im.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, h.content()) {
		t.Fatal("out-of-order partitions read wrong")
	}
	if e, _ := im.Status(10*512, 20*512); e.State != driver.Unallocated || e.Length != 10*512 {
		t.Fatalf("gap: %+v", e)
	}
	if n := len(im.Info().Specific.(*Specific).Partitions); n != 2 {
		t.Fatalf("%d partitions in info", n)
	}
}

// TestADCVectors decodes hand-assembled ADC codes: literals, a run (a
// copy overlapping its output) and a 2-byte back-reference.
func TestADCVectors(t *testing.T) {
	in := []byte{0x82, 'a', 'b', 'c', 0x40 | 1, 0, 0, 0x00 | 1<<2, 7}
	// "abc", then 5 x 'c' (distance 1), then 4 bytes from distance 8.
	want := []byte("abccccccabcc")
	out, err := adcDecode(in, len(want))
	if err != nil || !bytes.Equal(out, want) {
		t.Fatalf("%q %v", out, err)
	}
	data := append(textBytes(3000), pattern(1000, 1)...)
	if out, err = adcDecode(hadc(data), len(data)); err != nil || !bytes.Equal(out, data) {
		t.Fatalf("round trip: %v", err)
	}
	for _, bad := range [][]byte{
		{0x00, 5},               // back-reference before the start
		{0x80, 'a', 0x40, 0},    // cut short
		{0x85, 'a'},             // literal past the input
		{0x80, 'a', 0x7f, 0, 0}, // output past the chunk
	} {
		if _, err := adcDecode(bad, 8); err == nil {
			t.Fatalf("%x decoded", bad)
		}
	}
}
