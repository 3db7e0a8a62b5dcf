package dmg

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/osfs"
)

// TestConvertQemuReads converts raw sources of several shapes (odd tails,
// fully sparse, dense, mixed) into every subformat; qemu-img compare finds
// the DMG identical to the source (UDBZ: qemu here has no bzip2 module,
// so every bzip2 chunk is checked with the bzip2 tool instead), vdisk
// reads it back bit-exact, and the checksums are Apple's.
func TestConvertQemuReads(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	cases := []struct {
		kind string
		size int64
	}{
		{"mixed", 2<<20 + 3*512},
		{"dense", 1<<20 + 512},
		{"sparse", 3<<20 + 7*512},
		{"half", 3 << 20},
		{"mixed", 1536},
		{"dense", 512},
	}
	for i, c := range cases {
		data := source(c.kind, c.size, uint64(i))
		src := filepath.Join(dir, fmt.Sprintf("src%d.raw", i))
		writeSparse(t, src, data)
		for _, sub := range subformats {
			if sub == "UDBZ" && c.kind == "dense" && c.size > 4096 {
				// bzip2 over random data is slow (under -race) and stored
				// raw anyway; the small dense case covers it.
				continue
			}
			t.Run(fmt.Sprintf("%s-%d-%s", c.kind, c.size, sub), func(t *testing.T) {
				dst := filepath.Join(dir, fmt.Sprintf("out%d-%s.dmg", i, sub))
				convertFile(t, src, dst, "subformat="+sub)
				checkWritten(t, dst, sub, src, data)
				if c.kind == "sparse" && sub != "UDRW" {
					if fi, _ := os.Stat(dst); fi.Size() > 4096 {
						t.Fatalf("an all-zero disk took %d bytes", fi.Size())
					}
				}
				if sub == "UDRW" {
					checkLinear(t, dst)
				}
			})
		}
	}
}

// checkLinear checks a UDRW image's layout: raw chunks only, each at
// its own offset.
func checkLinear(t *testing.T, file string) {
	t.Helper()
	im := openImage(t, osfs.New(), file)
	defer im.Close()
	var end int64
	for _, c := range im.chunks {
		if c.typ != typeRaw || c.off != c.sector*512 || c.sector != end {
			t.Fatalf("UDRW chunk %+v is not linear", c)
		}
		end = c.end()
	}
	if end*512 != im.Size() {
		t.Fatalf("UDRW chunks end at %d of %d", end*512, im.Size())
	}
	if s := im.Info().Specific.(*Specific).Subformat; s != "UDRW" {
		t.Fatalf("info says %s", s)
	}
}

// checkChecksums recomputes the trailer's data fork CRC-32, the blkx
// table's CRC-32 of the disk content and the master checksum.
func checkChecksums(t *testing.T, file string, content []byte) {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	k := b[len(b)-512:]
	be := binary.BigEndian
	if string(k[:4]) != "koly" || be.Uint32(k[4:]) != 4 || be.Uint32(k[8:]) != 512 {
		t.Fatalf("trailer %x", k[:12])
	}
	dfLen := be.Uint64(k[0x20:])
	if be.Uint32(k[0x50:]) != 2 || be.Uint32(k[0x54:]) != 32 || be.Uint32(k[0x58:]) != crc32.ChecksumIEEE(b[:dfLen]) {
		t.Fatal("data fork checksum is wrong")
	}
	if be.Uint64(k[0x1ec:]) != uint64(len(content)+511)/512 {
		t.Fatalf("sector count %d", be.Uint64(k[0x1ec:]))
	}
	entries, err := parsePlist(b[be.Uint64(k[0xd8:]) : be.Uint64(k[0xd8:])+be.Uint64(k[0xe0:])])
	if err != nil || len(entries) != 1 {
		t.Fatalf("plist: %v %d", err, len(entries))
	}
	m := entries[0].data
	padded := append(content, make([]byte, (512-len(content)%512)%512)...)
	want := crc32.ChecksumIEEE(padded)
	if be.Uint32(m[64:]) != 2 || be.Uint32(m[68:]) != 32 || be.Uint32(m[72:]) != want {
		t.Fatalf("blkx checksum %08x, content %08x", be.Uint32(m[72:]), want)
	}
	var v [4]byte
	be.PutUint32(v[:], want)
	if be.Uint32(k[0x160:]) != 2 || be.Uint32(k[0x168:]) != crc32.ChecksumIEEE(v[:]) {
		t.Fatal("master checksum is wrong")
	}
}

// checkBzip2Chunks decompresses every bzip2 chunk with the bzip2 tool
// and compares it with the source; the other chunks are checked by
// vdisk's reader (and the layout by the UDZO runs qemu reads).
func checkBzip2Chunks(t *testing.T, file string, content []byte) {
	t.Helper()
	im := openImage(t, osfs.New(), file)
	defer im.Close()
	n := 0
	for _, c := range im.chunks {
		if c.typ != typeBzip2 {
			if c.typ != typeRaw && c.typ != typeZero {
				t.Fatalf("a %s chunk in a UDBZ image", typeName(c.typ))
			}
			continue
		}
		n++
		stored := make([]byte, c.length)
		if err := driver.ReadFullAt(im.f, stored, c.off); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command("bzip2", "-dc")
		cmd.Stdin = bytes.NewReader(stored)
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("bzip2 -dc: %v", err)
		}
		if !bytes.Equal(out, content[c.sector*512:c.end()*512]) {
			t.Fatalf("bzip2 chunk at sector %d decompresses to other bytes", c.sector)
		}
	}
	if n == 0 && len(content) > 1<<20 && !driver.IsZero(content) {
		t.Fatal("no bzip2 chunk in a UDBZ image")
	}
}

// TestWriteAtInOrder: plain in-order writes (not whole units) fill a new
// DMG; qemu reads what was written; going back is refused.
func TestWriteAtInOrder(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	f := filepath.Join(dir, "w.dmg")
	const size = 3<<20 + 512
	d := createDisk(t, nil, f, size)
	want := make([]byte, size)
	for _, w := range []struct {
		off int64
		n   int
		c   byte
	}{{100, 5000, 1}, {6000, 70000, 2}, {1 << 20, 1 << 20, 3}, {size - 700, 700, 4}} {
		disktest.MustWrite(t, d, nil, disktest.Fill(w.n, w.c), w.off)
		copy(want[w.off:], disktest.Fill(w.n, w.c))
	}
	if _, err := d.WriteAt(disktest.Fill(10, 9), 0); !errorsIs(err, driver.ErrUnsupported) {
		t.Fatalf("a write going back: %v", err)
	}
	if _, err := d.ReadAt(make([]byte, 10), 0); err == nil {
		t.Fatal("a DMG being written read back")
	}
	disktest.MustClose(t, d)
	raw := filepath.Join(dir, "w.raw")
	os.WriteFile(raw, want, 0o644)
	if !qemutest.Compare(t, "dmg", f, "raw", raw) {
		t.Fatal("qemu reads other bytes")
	}
	checkChecksums(t, f, want)
}

// TestEmptyCreate: an image created and closed without writes is one
// zero-fill chunk that qemu reads as zeros.
func TestEmptyCreate(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	f := filepath.Join(dir, "e.dmg")
	disktest.MustClose(t, createDisk(t, nil, f, 64<<20, "subformat=UDRO"))
	raw := filepath.Join(dir, "e.raw")
	qemutest.Create(t, "raw", raw, "64M")
	if !qemutest.Compare(t, "dmg", f, "raw", raw) {
		t.Fatal("an empty DMG does not read as zeros")
	}
	checkChecksums(t, f, make([]byte, 64<<20))
	im := openImage(t, osfs.New(), f)
	defer im.Close()
	if e, _ := im.Status(0, im.Size()); e.State != driver.Zero || e.Length != 64<<20 {
		t.Fatalf("status %+v", e)
	}
}

// TestHugeSparse: a 2 TiB disk with one written chunk in the middle is
// three chunks (zero, data, zero), its checksum is computed without
// hashing the zeros, and it reads back.
func TestHugeSparse(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "huge.dmg")
	const size = 2 << 40
	d := createDisk(t, nil, f, size)
	unit := disktest.Fill(1<<20, 0x5a)
	disktest.MustWrite(t, d, nil, unit, 1<<40)
	disktest.MustClose(t, d)
	im := openImage(t, osfs.New(), f)
	defer im.Close()
	if len(im.chunks) != 3 || im.Size() != size {
		t.Fatalf("%d chunks, size %d", len(im.chunks), im.Size())
	}
	got := make([]byte, 3<<20)
	if _, err := im.ReadAt(got, 1<<40-1<<20); err != nil {
		t.Fatal(err)
	}
	if !driver.IsZero(got[:1<<20]) || !bytes.Equal(got[1<<20:2<<20], unit) || !driver.IsZero(got[2<<20:]) {
		t.Fatal("wrong bytes around the written chunk")
	}
	want := crc32.Update(crcZeros(0, 1<<40), crc32.IEEETable, unit)
	want = crcZeros(want, size-(1<<40)-(1<<20))
	b, _ := os.ReadFile(f)
	k := decodeKoly(b[len(b)-512:])
	entries, err := parsePlist(b[k.xmlOffset : k.xmlOffset+k.xmlLength])
	if err != nil {
		t.Fatal(err)
	}
	m, err := parseMish(entries[0].data)
	if err != nil || m.checksum.value != want {
		t.Fatalf("blkx checksum %08x, want %08x (%v)", m.checksum.value, want, err)
	}
}

// TestZlibLevel: UDZO's zlib-level option (hdiutil's image key) is
// honoured at both ends of its range: qemu-img reads either image
// bit-exact and level 9 stores no more bytes than level 1; a level
// outside 1-9 is refused before anything is written.
func TestZlibLevel(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	data := source("mixed", 4<<20, 11)
	src := filepath.Join(dir, "src.raw")
	writeSparse(t, src, data)
	sizes := map[string]int64{}
	for _, lvl := range []string{"1", "9"} {
		dst := filepath.Join(dir, "l"+lvl+".dmg")
		convertFile(t, src, dst, "subformat=UDZO", "zlib-level="+lvl)
		if !qemutest.Compare(t, "dmg", dst, "raw", src) {
			t.Fatalf("zlib-level=%s: qemu-img compare: the DMG differs from the source", lvl)
		}
		fi, err := os.Stat(dst)
		if err != nil {
			t.Fatal(err)
		}
		sizes[lvl] = fi.Size()
	}
	if sizes["9"] > sizes["1"] {
		t.Fatalf("zlib-level=9 stored %d bytes, level 1 %d", sizes["9"], sizes["1"])
	}
	for _, bad := range []string{"0", "10", "fast"} {
		dst := filepath.Join(dir, "bad.dmg")
		_, err := vdisk.Create(ctx, dst, &vdisk.CreateOptions{Format: "dmg", Size: 1 << 20, Options: disktest.KVs("zlib-level=" + bad)})
		if !errors.Is(err, driver.ErrInvalidOption) {
			t.Fatalf("zlib-level=%s: %v, want an invalid-option error", bad, err)
		}
		if _, serr := os.Stat(dst); serr == nil {
			t.Fatalf("zlib-level=%s: the refused create left %s behind", bad, dst)
		}
	}
}

// TestLentUnits: units lent to the writer (driver.CompressedLender) are
// stored as given although each buffer is overwritten as soon as it is
// released, and each is released once, in every subformat.
func TestLentUnits(t *testing.T) {
	qemutest.Require(t)
	const size = 5<<20 + 4096 + 512 // a short last unit
	data := make([]byte, size)
	for i := 0; i < size/2; i += 64 {
		copy(data[i:], fmt.Sprintf("line %08d of a dmg unit\n", i))
	}
	x := uint32(1)
	for i := size * 5 / 8; i < size*7/8; i++ { // random; zeros between
		x = x*1664525 + 1013904223
		data[i] = byte(x >> 24)
	}
	copy(data[size-3:], "end")
	for _, sub := range subformats {
		t.Run(sub, func(t *testing.T) {
			t.Parallel()
			data := data
			if sub == "UDBZ" {
				// bzip2 is slow under -race: text and the tail only.
				data = append(make([]byte, 0, size), data[:1<<20]...)
				data = append(data, make([]byte, size-len(data))...)
				copy(data[size-3:], "end")
			}
			dir := t.TempDir()
			f := filepath.Join(dir, "l.dmg")
			disktest.Lend(t, createDisk(t, nil, f, size, "subformat="+sub), data)
			raw := filepath.Join(dir, "l.raw")
			if err := os.WriteFile(raw, data, 0o644); err != nil {
				t.Fatal(err)
			}
			checkWritten(t, f, sub, raw, data)
		})
	}
}

// checkWritten checks a DMG of subformat sub that vdisk wrote from data
// (also in the raw file raw): qemu-img compare (UDBZ: each bzip2 chunk
// through the bzip2 tool, as qemu here has no bzip2 module), vdisk's
// reader and the checksums.
func checkWritten(t *testing.T, file, sub, raw string, data []byte) {
	t.Helper()
	if sub == "UDBZ" {
		checkBzip2Chunks(t, file, data)
	} else if !qemutest.Compare(t, "dmg", file, "raw", raw) {
		t.Fatal("qemu-img compare: the DMG differs from the source")
	}
	d := openDisk(t, nil, file)
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, data) {
		t.Fatal("vdisk reads its DMG differently")
	}
	disktest.MustClose(t, d)
	checkChecksums(t, file, data)
}
