package vdi

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// tinyImages makes small valid images: 512-byte blocks, 512-byte
// alignment, a few KiB each.
func tinyImages(t testing.TB) map[string][]byte {
	defer func(a int64) { dataAlign = a }(dataAlign)
	dataAlign = 512
	st := memfs.New()
	bs := driver.KV{Key: "block_size", Value: "512"}
	d := createVDI(t, st, "/dynamic.vdi", 4096, "", bs, driver.KV{Key: "comment", Value: "tiny"})
	disktest.MustWrite(t, d, nil, disktest.Fill(700, 0x11), 300)
	disktest.MustWrite(t, d, nil, disktest.Fill(512, 0x22), 3072)
	if err := d.WriteZeroes(2048, 512, true); err != nil {
		t.Fatal(err)
	}
	topImage(d).SetLCHS(driver.CHS{Cylinders: 1, Heads: 1, Sectors: 8})
	disktest.MustClose(t, d)
	d = createVDI(t, st, "/fixed.vdi", 2048, "", bs, driver.KV{Key: "static", Value: "on"})
	disktest.MustWrite(t, d, nil, disktest.Fill(100, 0x33), 1000)
	disktest.MustClose(t, d)
	d = createVDI(t, st, "/diff.vdi", 0, "dynamic.vdi", bs)
	disktest.MustWrite(t, d, nil, disktest.Fill(10, 0x44), 3000)
	disktest.MustClose(t, d)
	out := map[string][]byte{}
	for _, n := range []string{"dynamic", "fixed", "diff"} {
		b, err := st.ReadFile("/" + n + ".vdi")
		if err != nil {
			t.Fatal(err)
		}
		out[n] = b
	}
	// A version 0 image: 348-byte header, map right after it.
	v0 := make([]byte, preHeaderSize+hdrV0Size+4*4+2*512)
	copy(v0, fileInfoText)
	le := binary.LittleEndian
	le.PutUint32(v0[sigOffset:], signature)
	le.PutUint32(v0[verOffset:], 0x00000002)
	h := v0[preHeaderSize:]
	le.PutUint32(h[0:], typeNormal)
	copy(h[8:], "version 0")
	le.PutUint64(h[280:], 2048)
	le.PutUint32(h[288:], 512)
	le.PutUint32(h[292:], 4)
	le.PutUint32(h[296:], 2)
	u := newUUID()
	copy(h[300:], u[:])
	copy(h[316:], u[:])
	m := v0[preHeaderSize+hdrV0Size:]
	for i, e := range []uint32{1, entFree, 0, entZero} {
		le.PutUint32(m[4*i:], e)
	}
	data := v0[preHeaderSize+hdrV0Size+16:]
	copy(data, disktest.Fill(512, 0x55))
	copy(data[512:], disktest.Fill(512, 0x66))
	out["v0"] = v0
	return out
}

// TestVersion0: the version 0 layout reads (block 0 -> data block 1,
// block 2 -> data block 0) and writes.
func TestVersion0(t *testing.T) {
	st := memfs.New()
	st.WriteFile("/v0.vdi", tinyImages(t)["v0"])
	d := openVDI(t, st, "/v0.vdi", false)
	want := make([]byte, 2048)
	copy(want, disktest.Fill(512, 0x66))
	copy(want[1024:], disktest.Fill(512, 0x55))
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
		t.Fatal("version 0 content")
	}
	if c := topImage(d).Comment(); c != "version 0" {
		t.Fatalf("comment %q", c)
	}
	disktest.MustWrite(t, d, nil, disktest.Fill(10, 0x77), 600)
	copy(want[600:], disktest.Fill(10, 0x77))
	disktest.MustClose(t, d)
	d = openVDI(t, st, "/v0.vdi", true)
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
		t.Fatal("version 0 content after a write")
	}
	if res, err := d.Check(ctx, driver.RepairNone); err != nil || res.Corruptions+res.Leaks != 0 {
		t.Fatalf("check %+v %v", res, err)
	}
	disktest.MustClose(t, d)
}

// TestFuzzSeeds keeps testdata/fuzz/FuzzOpen in step with tinyImages
// (VDI_WRITE_SEEDS=1 rewrites them).
func TestFuzzSeeds(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzOpen")
	if os.Getenv("VDI_WRITE_SEEDS") == "" {
		ents, err := os.ReadDir(dir)
		if err != nil || len(ents) < 4 {
			t.Fatalf("seed corpus missing in %s (%v); run with VDI_WRITE_SEEDS=1", dir, err)
		}
		return
	}
	for name, b := range tinyImages(t) {
		disktest.WriteFile(t, filepath.Join(dir, name), []byte(fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)))
	}
}

// FuzzOpen opens arbitrary bytes as a VDI image: errors must be ErrCorrupt
// or ErrUnsupported, never a panic; an image that opens must serve every
// operation without panicking and, after a repair and our own writes,
// must open again.
func FuzzOpen(f *testing.F) {
	for _, b := range tinyImages(f) {
		f.Add(b)
	}
	for _, b := range qemutest.Seeds(f, "vdi",
		qemutest.Seed{Name: "dynamic", Size: "3M", IO: []string{"write -P 0x11 4k 4k", "write -z 1M 1M"}},
		qemutest.Seed{Name: "empty", Size: "64M"},
		qemutest.Seed{Name: "static", Size: "256k", Opts: []string{"static=on"}, IO: []string{"write -P 0x22 0 1k"}},
	) {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 4<<20 {
			return
		}
		if os.Getenv("VDI_FUZZ_SLOW") != "" { // report inputs that take long
			start := time.Now()
			defer func() {
				if d := time.Since(start); d > 300*time.Millisecond {
					t.Fatalf("slow input: %v", d)
				}
			}()
		}
		st := memfs.New()
		st.WriteFile("/f.vdi", data)
		img, err := Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/f.vdi", ReadOnly: true})
		if err != nil {
			if !errors.Is(err, driver.ErrCorrupt) && !errors.Is(err, driver.ErrUnsupported) {
				t.Fatalf("open: unexpected error kind: %v", err)
			}
			return
		}
		walk(t, img)
		disktest.Walk(t, "vdi", img, 4<<20)
		img.Info()
		img.Parent()
		if _, err := img.(driver.Checker).Check(ctx, driver.RepairNone); err != nil {
			t.Fatalf("check: %v", err)
		}
		img.Close()

		img, err = Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/f.vdi"})
		if err != nil {
			t.Fatalf("opens read-only but not read-write: %v", err)
		}
		if _, err := img.(driver.Checker).Check(ctx, driver.RepairAll); err != nil {
			// A repair may fail on I/O or refuse; the image must still open.
			t.Logf("repair: %v", err)
		}
		size := img.Size()
		if size > 0 {
			img.WriteAt([]byte{1, 2, 3}, 0)
			img.WriteAt([]byte{4}, size-1)
			img.(driver.Discarder).Discard(0, min(size, 1<<20))
			img.(driver.Zeroer).WriteZeroes(size/2, min(size/2, 5000), true)
		}
		img.(driver.Compacter).Compact(ctx, nil)
		img.(driver.Resizer).Resize(ctx, size+4096, "")
		if err := img.Close(); err != nil {
			return
		}
		img, err = Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/f.vdi", ReadOnly: true})
		if err != nil {
			t.Fatalf("our own changes left an image that does not open: %v", err)
		}
		walk(t, img)
		img.Close()
	})
}

// walk reads every status run's first bytes.
func walk(t *testing.T, img driver.Image) {
	size := img.Size()
	buf := make([]byte, 4096)
	for off := int64(0); off < size; {
		e, err := img.Status(off, size-off)
		if err != nil {
			t.Fatalf("status at %d: %v", off, err)
		}
		if err := driver.CheckExtent("vdi", "image", off, size-off, e); err != nil {
			t.Fatal(err)
		}
		n := min(e.Length, int64(len(buf)))
		if _, err := img.ReadAt(buf[:n], off); err != nil && !errors.Is(err, driver.ErrCorrupt) {
			t.Fatalf("read at %d: %v", off, err)
		}
		if e.State == driver.Zero && !driver.IsZero(buf[:n]) {
			t.Fatalf("zero run at %d reads data", off)
		}
		off += e.Length
	}
}

// TestHostileHeaders: damaged or hostile header fields give ErrCorrupt (or
// ErrUnsupported for a version we do not read), fast and without a big
// allocation.
func TestHostileHeaders(t *testing.T) {
	good := tinyImages(t)["dynamic"]
	le := binary.LittleEndian
	h := preHeaderSize
	u32 := func(off int, v uint32) func([]byte) []byte {
		return func(b []byte) []byte { le.PutUint32(b[off:], v); return b }
	}
	u64 := func(off int, v uint64) func([]byte) []byte {
		return func(b []byte) []byte { le.PutUint64(b[off:], v); return b }
	}
	for _, c := range []struct {
		name   string
		mutate func([]byte) []byte
		want   error
		msg    string
	}{
		{"bad signature", u32(sigOffset, 0xBEDA107E), driver.ErrCorrupt, "signature"},
		{"version 2", u32(verOffset, 0x00020000), driver.ErrUnsupported, "version"},
		{"short file", func(b []byte) []byte { return b[:50] }, driver.ErrCorrupt, "too small"},
		{"short header", func(b []byte) []byte { return b[:200] }, driver.ErrCorrupt, "too small"},
		{"header size 10", u32(h, 10), driver.ErrCorrupt, "header size"},
		{"type 0", u32(h+4, 0), driver.ErrCorrupt, "type"},
		{"type 9", u32(h+4, 9), driver.ErrCorrupt, "type"},
		{"unknown flags", u32(h+8, 0x10), driver.ErrCorrupt, "flags"},
		{"block size 0", u32(h+304, 0), driver.ErrCorrupt, "block size"},
		{"block size 3000", u32(h+304, 3000), driver.ErrCorrupt, "block size"},
		{"block size 1G", u32(h+304, 1<<30), driver.ErrCorrupt, "block size"},
		{"extra 3", u32(h+308, 3), driver.ErrCorrupt, "extra"},
		{"disk beyond blocks", u64(h+296, 8*512+1024), driver.ErrCorrupt, "disk size"},
		{"disk size 2^63", u64(h+296, 1<<63), driver.ErrCorrupt, "disk size"},
		{"huge block count", u32(h+312, 0xFFFFFFF0), driver.ErrCorrupt, "block count"},
		{"map past the data offset", u32(h+312, 1000), driver.ErrCorrupt, "overlaps the block map"},
		{"allocated > blocks", u32(h+316, 9), driver.ErrCorrupt, "allocated"},
		{"map offset 0", u32(h+268, 0), driver.ErrCorrupt, "overlaps the header"},
		{"map offset past EOF", u32(h+268, 1<<30), driver.ErrCorrupt, "overlaps the block map"},
		{"data offset past EOF", func(b []byte) []byte {
			le.PutUint32(b[h+272:], uint32(len(b)+512))
			return b
		}, driver.ErrCorrupt, "past the end"},
		{"data offset below map", u32(h+272, 512), driver.ErrCorrupt, "overlaps the block map"},
		{"huge blocks, map past EOF", func(b []byte) []byte {
			le.PutUint32(b[h+312:], maxBlocks)
			le.PutUint64(b[h+296:], uint64(maxBlocks)*512)
			le.PutUint32(b[h+272:], 0xFFFFFE00)
			return b
		}, driver.ErrCorrupt, "past the end"},
		{"diff without parent", u32(h+4, typeDiff), driver.ErrCorrupt, "parent UUID"},
	} {
		t.Run(c.name, func(t *testing.T) {
			st := memfs.New()
			st.WriteFile("/h.vdi", c.mutate(bytes.Clone(good)))
			_, err := Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/h.vdi", ReadOnly: true})
			if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("got %v, want %v mentioning %q", err, c.want, c.msg)
			}
		})
	}

	// An undo image reads as a dynamic base image.
	st := memfs.New()
	b := bytes.Clone(good)
	le.PutUint32(b[h+4:], typeUndo)
	st.WriteFile("/u.vdi", b)
	d := openVDI(t, st, "/u.vdi", true)
	if d.Top().ParentRef() != nil || len(d.Layers()) != 1 || topImage(d).Info().Specific.(*Info).Type != "undo" {
		t.Fatal("undo image")
	}
	disktest.MustClose(t, d)

	// A comment without its NUL reads as 255 bytes.
	b = bytes.Clone(good)
	copy(b[h+12:h+12+commentSize], bytes.Repeat([]byte{'x'}, commentSize))
	st.WriteFile("/c.vdi", b)
	d = openVDI(t, st, "/c.vdi", true)
	if c := topImage(d).Comment(); c != strings.Repeat("x", 255) {
		t.Fatalf("comment of %d bytes", len(c))
	}
	disktest.MustClose(t, d)

	// A block map entry past the end of the file: the image opens, the
	// block reads as an error, writes are refused, check finds it.
	b = bytes.Clone(good)
	le.PutUint32(b[int(le.Uint32(b[h+268:]))+4*6:], 5000)
	st.WriteFile("/e.vdi", b)
	d, err := vdisk.Open(ctx, "/e.vdi", &vdisk.OpenOptions{Storage: st})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.ReadAt(make([]byte, 512), 6*512); !errors.Is(err, driver.ErrCorrupt) {
		t.Fatalf("reading the bad block: %v", err)
	}
	if _, err := d.WriteAt([]byte{1}, 0); !errors.Is(err, driver.ErrCorrupt) {
		t.Fatalf("writing the damaged image: %v", err)
	}
	disktest.MustClose(t, d)
}
