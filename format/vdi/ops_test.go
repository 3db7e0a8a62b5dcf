package vdi

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// TestResize: growing within the map's room, growing a qemu-made image
// whose map runs into the data (blocks move), shrinking refused over data
// and allowed over zeros; qemu agrees with the result.
func TestResize(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	f := filepath.Join(dir, "r.vdi")
	qemutest.Create(t, "vdi", f, "3M")
	qemutest.IO(t, "vdi", f, "write -P 0x21 0 1M", "write -P 0x22 2M 512", "write -P 0x23 1M 4096")
	want := qemutest.Raw(t, "vdi", f)
	d, err := vdisk.Open(ctx, f, nil)
	if err != nil {
		t.Fatal(err)
	}
	im := topImage(d)
	if im.offData != 1024 {
		t.Fatalf("qemu's layout changed: data at %d", im.offData)
	}
	// 150 blocks need 600 bytes of map: the map overlaps the data area.
	const big = 150 << 20
	if err := d.Resize(ctx, big, ""); err != nil {
		t.Fatal(err)
	}
	if im.offData <= 1024 || d.Size() != big {
		t.Fatalf("after growing: data at %d, size %d", im.offData, d.Size())
	}
	disktest.MustWrite(t, d, nil, disktest.Fill(512, 0x24), big-512)
	got := make([]byte, len(want))
	if _, err := d.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("content differs after growing (%v)", err)
	}
	disktest.MustClose(t, d)
	qemutest.Check(t, "vdi", f)
	// A sparse reference for qemu-img compare.
	ref := filepath.Join(dir, "r.raw")
	rf, err := os.Create(ref)
	if err != nil {
		t.Fatal(err)
	}
	rf.WriteAt(want, 0)
	rf.WriteAt(disktest.Fill(512, 0x24), big-512)
	rf.Close()
	if !qemutest.Compare(t, "vdi", f, "raw", ref) {
		t.Fatal("qemu reads different content after growing")
	}

	// Grow again within the map's room (our own layout keeps 1 MiB of map).
	st := memfs.New()
	d = createVDI(t, st, "/g.vdi", 5<<20, "")
	m := model.New(5 << 20)
	disktest.MustWrite(t, d, m, disktest.Fill(3<<20, 7), 1<<20)
	off := topImage(d).offData
	if err := d.Resize(ctx, 64<<20, "off"); err != nil {
		t.Fatal(err)
	}
	if topImage(d).offData != off {
		t.Fatal("growing within the map's room moved the data")
	}
	if err := d.Resize(ctx, 64<<20, "full"); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("preallocated resize: %v", err)
	}
	m2 := model.New(64 << 20)
	copy(m2.Data, m.Data)
	disktest.MustWrite(t, d, m2, disktest.Fill(1000, 8), 63<<20)
	// Shrinking over data is refused, over zeros allowed.
	if err := d.Resize(ctx, 40<<20, ""); !errors.Is(err, driver.ErrInvalidOption) {
		t.Fatalf("shrink over data: %v", err)
	}
	if err := d.WriteZeroes(63<<20, 1000, false); err != nil { // stays allocated, reads zeros
		t.Fatal(err)
	}
	m2.Zero(63<<20, 1000)
	before := disktest.FileSize(t, st, "/g.vdi")
	if err := d.Resize(ctx, 3<<20+512, ""); !errors.Is(err, driver.ErrInvalidOption) {
		t.Fatalf("shrink into data: %v", err)
	}
	if err := d.Resize(ctx, 4<<20, ""); err != nil {
		t.Fatal(err)
	}
	if after := disktest.FileSize(t, st, "/g.vdi"); after != before-1<<20 {
		t.Fatalf("shrink left the file at %d bytes (was %d)", after, before)
	}
	disktest.MustClose(t, d)
	d = openVDI(t, st, "/g.vdi", false)
	if d.Size() != 4<<20 || !bytes.Equal(disktest.ReadAll(t, d), m2.Data[:4<<20]) {
		t.Fatal("content differs after shrinking")
	}
	res, err := d.Check(ctx, driver.RepairNone)
	if err != nil || res.Corruptions+res.Leaks != 0 {
		t.Fatalf("check: %+v %v %q", res, err, res.Messages)
	}
	disktest.MustClose(t, d)

	// Fixed images are not resized.
	d = createVDI(t, st, "/fixed.vdi", 2<<20, "", driver.KV{Key: "static", Value: "on"})
	if err := d.Resize(ctx, 4<<20, ""); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("fixed resize: %v", err)
	}
	disktest.MustClose(t, d)
}

// corrupt edits a closed image's block map entry and header count.
func setMapEntry(t *testing.T, st *memfs.FS, name string, b int, v uint32) {
	t.Helper()
	data, err := st.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	offBlocks := binary.LittleEndian.Uint32(data[preHeaderSize+268:])
	binary.LittleEndian.PutUint32(data[int(offBlocks)+4*b:], v)
	if err := st.WriteFile(name, data); err != nil {
		t.Fatal(err)
	}
}

func setHeaderU32(t *testing.T, st *memfs.FS, name string, off int, v uint32) {
	t.Helper()
	data, err := st.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	binary.LittleEndian.PutUint32(data[off:], v)
	if err := st.WriteFile(name, data); err != nil {
		t.Fatal(err)
	}
}

// TestCheckRepair: each kind of inconsistency is reported and repaired,
// and the repaired image passes qemu-img check.
func TestCheckRepair(t *testing.T) {
	qemutest.Require(t)
	const allocOff = preHeaderSize + 316
	for _, c := range []struct {
		name        string
		damage      func(st *memfs.FS)
		corruptions int
		leaks       int
		broken      bool // writes are refused until repaired
	}{
		{"past-eof", func(st *memfs.FS) { setMapEntry(t, st, "/c.vdi", 7, 1000) }, 2, 0, true},
		{"cross-link", func(st *memfs.FS) {
			setMapEntry(t, st, "/c.vdi", 7, 1)
			setHeaderU32(t, st, "/c.vdi", allocOff, 5)
		}, 1, 0, true},
		{"count", func(st *memfs.FS) { setHeaderU32(t, st, "/c.vdi", allocOff, 3) }, 1, 0, false},
		{"leak", func(st *memfs.FS) {
			data, _ := st.ReadFile("/c.vdi")
			st.WriteFile("/c.vdi", append(data, disktest.Fill(1<<20, 0x99)...))
		}, 0, 1, false},
		{"hole", func(st *memfs.FS) { setMapEntry(t, st, "/c.vdi", 2, entZero) }, 1, 1, false},
		// A hole below a data block in use with a count that matches the
		// map (what a kill between a discard and its pack leaves): qemu-img
		// check calls it clean; we report the hole as a leak.
		{"reuse", func(st *memfs.FS) {
			setMapEntry(t, st, "/c.vdi", 2, entZero)
			setHeaderU32(t, st, "/c.vdi", allocOff, 3)
		}, 0, 1, false},
		{"too-large", func(st *memfs.FS) {
			// Move block 3's data (index 3) to index 20 past the block count.
			data, _ := st.ReadFile("/c.vdi")
			offData := int(binary.LittleEndian.Uint32(data[preHeaderSize+272:]))
			blk := append([]byte(nil), data[offData+3<<20:offData+4<<20]...)
			data = append(data, make([]byte, offData+21<<20-len(data))...)
			copy(data[offData+20<<20:], blk)
			st.WriteFile("/c.vdi", data)
			setMapEntry(t, st, "/c.vdi", 3, 20)
			setHeaderU32(t, st, "/c.vdi", allocOff, 4)
		}, 1, 17, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			st := memfs.New()
			d := createVDI(t, st, "/c.vdi", 10<<20, "")
			m := model.New(10 << 20)
			for i := int64(0); i < 4; i++ {
				disktest.MustWrite(t, d, m, disktest.Fill(1000, byte(0x10+i)), i<<20+4096)
			}
			disktest.MustClose(t, d)
			c.damage(st)
			d = openVDI(t, st, "/c.vdi", false)
			if c.broken {
				if _, err := d.WriteAt([]byte{1}, 9<<20); !errors.Is(err, driver.ErrCorrupt) {
					t.Fatalf("write to the damaged image: %v", err)
				}
			}
			res, err := d.Check(ctx, driver.RepairNone)
			if err != nil {
				t.Fatal(err)
			}
			if res.Corruptions != c.corruptions || res.Leaks != c.leaks {
				t.Fatalf("check: %d corruptions, %d leaks (want %d, %d): %q", res.Corruptions, res.Leaks, c.corruptions, c.leaks, res.Messages)
			}
			res, err = d.Check(ctx, driver.RepairAll)
			if err != nil {
				t.Fatal(err)
			}
			if res.Corruptions != 0 || res.Leaks != 0 || res.CorruptionsFixed != c.corruptions || res.LeaksFixed != c.leaks {
				t.Fatalf("repair: %+v %q", res, res.Messages)
			}
			if _, err := d.WriteAt([]byte{1}, 9<<20); err != nil {
				t.Fatalf("write after repair: %v", err)
			}
			disktest.MustClose(t, d)
			d = openVDI(t, st, "/c.vdi", true)
			if res, err := d.Check(ctx, driver.RepairNone); err != nil || res.Corruptions+res.Leaks != 0 {
				t.Fatalf("check after repair: %+v %v", res, err)
			}
			got := disktest.ReadAll(t, d)
			disktest.MustClose(t, d)
			// Blocks whose entries survived read as before.
			for i := int64(0); i < 4; i++ {
				if (c.name == "hole" || c.name == "reuse") && i == 2 {
					continue
				}
				if !bytes.Equal(got[i<<20:(i+1)<<20], m.Data[i<<20:(i+1)<<20]) {
					t.Fatalf("block %d content lost by the repair", i)
				}
			}
			dir := t.TempDir()
			qemutest.Check(t, "vdi", disktest.SaveTo(t, st, "/c.vdi", dir))
		})
	}
}

// TestDiffCompactDropsParentBlocks: compaction of a differencing image
// drops blocks equal to the parent's and zero blocks; the content stays
// and qemu-img compare agrees (on the flattened chain).
func TestDiffCompactDropsParentBlocks(t *testing.T) {
	qemutest.Require(t)
	st := memfs.New()
	const size = 16 << 20
	m := model.New(size)
	base := createVDI(t, st, "/base.vdi", size, "")
	for i := int64(0); i < 16; i += 2 {
		disktest.MustWrite(t, base, m, disktest.Fill(1<<20, byte(i+1)), i<<20)
	}
	disktest.MustClose(t, base)
	top := createVDI(t, st, "/top.vdi", 0, "base.vdi")
	// Same as the parent: blocks 0, 2, 4. Different: 6 (1 byte), 1, 3.
	// Zeros over parent data: 8. Zeros over parent zeros: 9.
	for _, i := range []int64{0, 2, 4} {
		disktest.MustWrite(t, top, m, disktest.Fill(1<<20, byte(i+1)), i<<20)
	}
	disktest.MustWrite(t, top, m, disktest.Fill(1<<20, 7), 6<<20)
	disktest.MustWrite(t, top, m, []byte{0xEE}, 6<<20+777)
	disktest.MustWrite(t, top, m, disktest.Fill(1<<20, 0x31), 1<<20)
	disktest.MustWrite(t, top, m, disktest.Fill(1000, 0x33), 3<<20+5)
	disktest.MustWrite(t, top, m, make([]byte, 1<<20-512), 8<<20+512) // partial: allocates the block
	disktest.MustWrite(t, top, m, make([]byte, 512), 8<<20)
	disktest.MustWrite(t, top, m, disktest.Fill(100, 1), 9<<20) // allocates 9 ...
	disktest.MustWrite(t, top, m, make([]byte, 100), 9<<20)
	im := topImage(top)
	if im.count != 8 {
		t.Fatalf("%d blocks allocated before compaction, want 8", im.count)
	}
	dir := t.TempDir()
	raw := filepath.Join(dir, "before.raw")
	disktest.WriteFile(t, raw, disktest.ReadAll(t, top))
	before := disktest.FileSize(t, st, "/top.vdi")
	if err := top.Compact(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if im.count != 3 {
		t.Fatalf("%d blocks allocated after compaction, want 3 (1, 3, 6)", im.count)
	}
	if e := im.entry(8); e != entZero {
		t.Fatalf("zeros over parent data became %#x, want a zero block", e)
	}
	if e := im.entry(9); e != entFree {
		t.Fatalf("zeros over parent zeros became %#x, want a free block", e)
	}
	if after := disktest.FileSize(t, st, "/top.vdi"); after != before-5<<20 {
		t.Fatalf("file %d -> %d bytes, want 5 MiB fewer", before, after)
	}
	(&model.Harness{Seed: -1}).Verify(t, top, m)
	disktest.MustClose(t, top)
	// Flatten through vdisk, compare with qemu.
	d := openVDI(t, st, "/top.vdi", true)
	flat := filepath.Join(dir, "after.raw")
	disktest.WriteFile(t, flat, disktest.ReadAll(t, d))
	disktest.MustClose(t, d)
	if !qemutest.Compare(t, "raw", raw, "raw", flat) {
		t.Fatal("compaction changed the content")
	}
}
