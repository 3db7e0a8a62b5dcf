package vhdx

import (
	"bytes"
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

// qemuAgrees: qemu-img check is clean and qemu-img compare finds the
// image equal to want.
func qemuAgrees(t *testing.T, f string, want []byte) {
	t.Helper()
	qemutest.Check(t, "vhdx", f)
	raw := f + ".want.raw"
	if err := os.WriteFile(raw, want, 0o644); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(raw)
	if !qemutest.Compare(t, "vhdx", f, "raw", raw) {
		t.Fatalf("qemu-img compare %s: differs from the model", f)
	}
}

func fileSize(t *testing.T, f string) int64 {
	t.Helper()
	st, err := os.Stat(f)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

// TestShrink: a shrink drops the data past the new end (qemu-img resize
// --shrink; the resize command asks for the flag): the blocks past it are
// freed and the file is cut, qemu checks the image clean, reports the new
// size and compares it equal to the old content cut at the new end, and a
// grow afterwards reads zeros in the new range (also where the last block
// held data past the new end).
func TestShrink(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	cases := []struct {
		name string
		opts []string
		to   int64 // the new size
		cut  int64 // the file must be at most this long after the shrink (0: not checked)
		// noQemu: qemu opens no VHDX with 4096-byte logical sectors.
		noQemu bool
	}{
		{"dynamic-mid-block", []string{"block_size=1M"}, 10<<20 + 1536, 16 << 20, false},
		{"dynamic-block-edge", []string{"block_size=1M"}, 8 << 20, 16 << 20, false},
		{"dynamic-8M", []string{"block_size=8M"}, 2<<20 + 512, 16 << 20, false},
		{"dynamic-4k-sectors", []string{"block_size=1M", "logical_sector_size=4096"}, 12<<20 + 4096, 16 << 20, true},
		{"fixed", []string{"block_size=1M", "subformat=fixed"}, 10<<20 + 1024, 0, false},
		{"fixed-zero-off", []string{"block_size=1M", "subformat=fixed", "block_state_zero=off"}, 3 << 20, 0, false},
		{"to-one-sector", []string{"block_size=1M"}, 512, 8 << 20, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := filepath.Join(dir, c.name+".vhdx")
			const size = 40 << 20
			m := model.New(size)
			d := createVHDX(t, nil, f, size, "", disktest.KVs(c.opts...)...)
			disktest.MustWrite(t, d, m, disktest.Fill(3<<20, 0x41), 1<<20)
			disktest.MustWrite(t, d, m, disktest.Fill(5000, 0x42), 10<<20-2500)
			disktest.MustWrite(t, d, m, disktest.Fill(8192, 0x44), 12<<20)
			disktest.MustWrite(t, d, m, disktest.Fill(1<<20, 0x43), 30<<20)
			disktest.MustWrite(t, d, m, disktest.Fill(4096, 0x45), size-4096)
			if err := d.Flush(); err != nil {
				t.Fatal(err)
			}
			before := fileSize(t, f)
			if err := d.Resize(ctx, c.to, ""); err != nil {
				t.Fatal(err)
			}
			if d.Size() != c.to {
				t.Fatalf("size %d after the shrink to %d", d.Size(), c.to)
			}
			want := bytes.Clone(m.Data[:c.to])
			if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
				t.Fatal("content after shrink")
			}
			after := fileSize(t, f)
			disktest.MustClose(t, d)
			if c.cut > 0 && (after > c.cut || after >= before) {
				t.Fatalf("file of %d bytes after the shrink (%d before)", after, before)
			}
			if !c.noQemu {
				qemuAgrees(t, f, want)
				if got := int64(qemutest.Info(t, "vhdx", f)["virtual-size"].(float64)); got != c.to {
					t.Fatalf("qemu sees %d bytes, want %d", got, c.to)
				}
			}
			d = openVHDX(t, nil, f, false)
			if r, err := d.Check(ctx, driver.RepairNone); err != nil || r.Corruptions+r.Leaks+r.CheckErrors != 0 {
				t.Fatalf("check after shrink: %+v, %v", r, err)
			}
			if err := d.Resize(ctx, 24<<20, ""); err != nil {
				t.Fatal(err)
			}
			want = append(want, make([]byte, 24<<20-len(want))...)
			if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
				t.Fatal("content after shrink and grow")
			}
			disktest.MustClose(t, d)
			if !c.noQemu {
				qemuAgrees(t, f, want)
			}
		})
	}
}

// TestShrinkDiff shrinks a differencing image over its parent: what it
// keeps below the new end reads as before (its own sectors and the
// parent's), and a grow afterwards reads zeros in the grown range, not
// the parent's data nor the child's old sectors there.
func TestShrinkDiff(t *testing.T) {
	mem := memfs.New()
	const size = 8 << 20
	m := model.New(size)
	d := createVHDX(t, mem, "/base.vhdx", size, "", disktest.KVs("block_size=1M")...)
	disktest.MustWrite(t, d, m, disktest.Fill(size, 0x31), 0)
	disktest.MustClose(t, d)
	d = createVHDX(t, mem, "/top.vhdx", 0, "base.vhdx")
	disktest.MustWrite(t, d, m, disktest.Fill(3000, 0x32), 3<<20-1024)
	disktest.MustWrite(t, d, m, disktest.Fill(1<<20, 0x33), 6<<20)
	disktest.MustWrite(t, d, m, disktest.Fill(512, 0x34), 5<<20+512)
	const to = 5<<20 + 1024
	if err := d.Resize(ctx, to, ""); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(m.Data[:to])
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
		t.Fatal("content after shrink")
	}
	disktest.MustClose(t, d)
	d = openVHDX(t, mem, "/top.vhdx", false)
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
		t.Fatal("content after shrink and reopen")
	}
	if r, err := d.Check(ctx, driver.RepairNone); err != nil || r.Corruptions+r.Leaks+r.CheckErrors != 0 {
		t.Fatalf("check after shrink: %+v, %v", r, err)
	}
	if err := d.Resize(ctx, size, ""); err != nil {
		t.Fatal(err)
	}
	want = append(want, make([]byte, size-to)...)
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
		t.Fatal("content after shrink and grow")
	}
	disktest.MustClose(t, d)
}

// TestGrowMovesBAT grows a 1 MiB-block image past what its 1 MiB BAT
// region holds (128 GiB): the BAT moves to the end of the file through
// the log, data written far out reads back in vdisk and qemu, qemu checks
// it clean; shrunk back (after a discard), the moved BAT stays valid and
// the image compares equal.
func TestGrowMovesBAT(t *testing.T) {
	qemutest.Require(t)
	f := filepath.Join(t.TempDir(), "g.vhdx")
	const size = 8 << 20
	m := model.New(size)
	d := createVHDX(t, nil, f, size, "", disktest.KVs("block_size=1M")...)
	disktest.MustWrite(t, d, m, disktest.Fill(1<<20+77, 0x51), 3<<20)
	oldBAT := topImage(d).batOff
	const big = 130 << 30
	if err := d.Resize(ctx, big, ""); err != nil {
		t.Fatal(err)
	}
	im := topImage(d)
	if im.batOff == oldBAT || im.batLen != 2<<20 {
		t.Fatalf("BAT at %d (%d bytes), was at %d", im.batOff, im.batLen, oldBAT)
	}
	far := int64(129 << 30)
	disktest.MustWrite(t, d, nil, disktest.Fill(64<<10, 0x52), far)
	disktest.MustClose(t, d)
	qemutest.Check(t, "vhdx", f)
	if got := int64(qemutest.Info(t, "vhdx", f)["virtual-size"].(float64)); got != big {
		t.Fatalf("qemu sees %d bytes", got)
	}
	qemutest.IO(t, "vhdx", f, "read -P 0x52 129G 64k", "read -P 0 128G 1M", "read -P 0x51 3M 1M", "write -P 0x53 100G 4k")
	d = openVHDX(t, nil, f, false)
	p := make([]byte, 4096)
	if _, err := d.ReadAt(p, 100<<30); err != nil || !bytes.Equal(p, disktest.Fill(4096, 0x53)) {
		t.Fatalf("qemu's write far out: %v", err)
	}
	if err := d.Discard(64<<30, big-64<<30); err != nil {
		t.Fatal(err)
	}
	if err := d.Resize(ctx, size, ""); err != nil {
		t.Fatal(err)
	}
	disktest.MustClose(t, d)
	qemuAgrees(t, f, m.Data)
	// Compact brings the BAT (now at the end) down and cuts the file.
	d = openVHDX(t, nil, f, false)
	if err := d.Compact(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if im := topImage(d); im.batOff+im.batLen > 6<<20 {
		t.Fatalf("BAT still at %d after compact", im.batOff)
	}
	disktest.MustClose(t, d)
	// header, log, BAT, metadata and the 2 blocks written.
	if got := fileSize(t, f); got != 6<<20 {
		t.Fatalf("file of %d bytes after compact", got)
	}
	qemuAgrees(t, f, m.Data)
}

// TestCompact: discarded blocks leave holes; Compact moves the blocks
// above them down and cuts the file; the content is unchanged in vdisk
// and qemu, and qemu checks the image clean. A differencing image's
// blocks and sector bitmaps move too, and the chain reads the same.
func TestCompact(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	f := filepath.Join(dir, "c.vhdx")
	const size = 48 << 20
	m := model.New(size)
	d := createVHDX(t, nil, f, size, "", disktest.KVs("block_size=1M")...)
	for b := int64(0); b < size>>20; b++ {
		disktest.MustWrite(t, d, m, disktest.Fill(1<<20, byte(b+1)), b<<20)
	}
	for b := int64(0); b < size>>20; b += 2 {
		if err := d.Discard(b<<20, 1<<20); err != nil {
			t.Fatal(err)
		}
		m.Zero(b<<20, 1<<20)
	}
	disktest.MustClose(t, d)
	before := fileSize(t, f)
	d = openVHDX(t, nil, f, false)
	var calls int
	if err := d.Compact(ctx, func(done, total int64) { calls++ }); err != nil {
		t.Fatal(err)
	}
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, m.Data) {
		t.Fatal("content after compact")
	}
	disktest.MustClose(t, d)
	after := fileSize(t, f)
	// header 1M, log 1M, BAT 1M, metadata 1M, 24 blocks.
	if after != 28<<20 || calls == 0 {
		t.Fatalf("file %d -> %d bytes (%d progress calls)", before, after, calls)
	}
	qemuAgrees(t, f, m.Data)

	t.Run("differencing", func(t *testing.T) {
		mem := memfs.New()
		base := createVHDX(t, mem, "/base.vhdx", 16<<20, "", disktest.KVs("block_size=1M")...)
		m := model.New(16 << 20)
		disktest.MustWrite(t, base, m, disktest.Fill(16<<20, 0x11), 0)
		disktest.MustClose(t, base)
		d := createVHDX(t, mem, "/top.vhdx", 0, "base.vhdx", disktest.KVs("block_size=1M")...)
		for b := int64(0); b < 16; b++ {
			disktest.MustWrite(t, d, m, disktest.Fill(4096, byte(0x20+b)), b<<20+8192)
		}
		for b := int64(0); b < 8; b++ {
			if err := d.Discard(b<<20, 1<<20); err != nil {
				t.Fatal(err)
			}
			copy(m.Data[b<<20:(b+1)<<20], disktest.Fill(1<<20, 0x11))
		}
		if got := disktest.ReadAll(t, d); !bytes.Equal(got, m.Data) {
			i := 0
			for ; got[i] == m.Data[i]; i++ {
			}
			t.Fatalf("chain content before compact: byte %d is %#x, want %#x", i, got[i], m.Data[i])
		}
		disktest.MustClose(t, d)
		d = openVHDX(t, mem, "/top.vhdx", false)
		if got := disktest.ReadAll(t, d); !bytes.Equal(got, m.Data) {
			t.Fatal("chain content before compact, reopened")
		}
		if err := d.Compact(ctx, nil); err != nil {
			t.Fatal(err)
		}
		disktest.MustClose(t, d)
		d = openVHDX(t, mem, "/top.vhdx", true)
		if got := disktest.ReadAll(t, d); !bytes.Equal(got, m.Data) {
			t.Fatal("chain content after compact")
		}
		if res, err := d.Check(ctx, driver.RepairNone); err != nil || res.Corruptions != 0 {
			t.Fatalf("check: %v %+v", err, res)
		}
		disktest.MustClose(t, d)
		st, _ := mem.Stat("/top.vhdx")
		// header, log, BAT, metadata, the sector bitmap, 8 blocks.
		if st.Size != 13<<20 {
			t.Fatalf("differencing file of %d bytes after compact", st.Size)
		}
	})
}

// TestFreeReuse: space freed by discards is allocated again, in the same
// session and after reopening (the free list is rebuilt from the BAT), so
// the file does not grow; stale data in reused space never shows.
func TestFreeReuse(t *testing.T) {
	qemutest.Require(t)
	f := filepath.Join(t.TempDir(), "r.vhdx")
	const size = 32 << 20
	m := model.New(size)
	d := createVHDX(t, nil, f, size, "", disktest.KVs("block_size=1M")...)
	for b := int64(0); b < 16; b++ {
		disktest.MustWrite(t, d, m, disktest.Fill(1<<20, byte(b+1)), b<<20)
	}
	if err := d.Discard(0, 8<<20); err != nil {
		t.Fatal(err)
	}
	m.Zero(0, 8<<20)
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	full := fileSize(t, f)
	// Partial writes into new blocks: the rest of each block must read
	// zeros, not the discarded data that was there.
	for b := int64(16); b < 20; b++ {
		disktest.MustWrite(t, d, m, disktest.Fill(512, 0x60), b<<20+4096)
	}
	disktest.MustClose(t, d)
	if got := fileSize(t, f); got != full {
		t.Fatalf("file grew from %d to %d bytes with free space in it", full, got)
	}
	d = openVHDX(t, nil, f, false)
	if n := len(topImage(d).free); n == 0 {
		t.Fatal("no free space found on open")
	}
	for b := int64(20); b < 24; b++ {
		disktest.MustWrite(t, d, m, disktest.Fill(512, 0x61), b<<20+1024)
	}
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, m.Data) {
		t.Fatal("content after reuse")
	}
	disktest.MustClose(t, d)
	if got := fileSize(t, f); got != full {
		t.Fatalf("file grew from %d to %d bytes after reopening", full, got)
	}
	qemuAgrees(t, f, m.Data)
}

// TestRebase: a differencing image rebased (safe mode) onto another
// parent reads the same, records the new parent, and reads through it
// after reopening; an unsafe rebase shows the new parent's data where the
// child holds nothing; SetParent(nil) makes a standalone image qemu opens.
func TestRebase(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	const size = 8 << 20
	mk := func(name string, c byte) {
		d := createVHDX(t, nil, filepath.Join(dir, name), size, "", disktest.KVs("block_size=1M")...)
		disktest.MustWrite(t, d, nil, disktest.Fill(size, c), 0)
		disktest.MustClose(t, d)
	}
	mk("a.vhdx", 0xAA)
	mk("b.vhdx", 0xBB)
	top := filepath.Join(dir, "top.vhdx")
	d := createVHDX(t, nil, top, 0, "a.vhdx", disktest.KVs("block_size=1M")...)
	disktest.MustWrite(t, d, nil, disktest.Fill(3000, 0x01), 1<<20+512)
	disktest.MustWrite(t, d, nil, disktest.Fill(2<<20, 0x02), 4<<20)
	view := disktest.ReadAll(t, d)
	disktest.MustClose(t, d)

	// Unsafe: onto b.vhdx; reads show b where top holds nothing.
	d = openVHDX(t, nil, top, false)
	if err := d.Rebase(ctx, "b.vhdx", &vdisk.RebaseOptions{Unsafe: true}); err != nil {
		t.Fatal(err)
	}
	disktest.MustClose(t, d)
	d = openVHDX(t, nil, top, true)
	if len(d.Layers()) != 2 || filepath.Base(d.Layers()[1].Name) != "b.vhdx" {
		t.Fatalf("chain %v after rebase", d.Layers())
	}
	bmod := vhdxModUUID(t, filepath.Join(dir, "b.vhdx"))
	if got := topImage(d).ParentModificationUUID(); got != bmod {
		t.Fatalf("parent linkage %s, want %s", got, bmod)
	}
	got := disktest.ReadAll(t, d)
	held, fell := 0, 0
	for i := range got {
		switch {
		case view[i] == 0xAA && got[i] == 0xBB:
			fell++
		case got[i] == view[i]: // held (sectors filled from a too)
			if view[i] != 0xAA {
				held++
			}
		default:
			t.Fatalf("byte %d reads %#x after an unsafe rebase (was %#x)", i, got[i], view[i])
		}
	}
	if held == 0 || fell == 0 {
		t.Fatalf("%d bytes held, %d read from the new parent", held, fell)
	}
	disktest.MustClose(t, d)

	// Safe: back onto a.vhdx; the content stays as it read over b.
	d = openVHDX(t, nil, top, false)
	if err := d.Rebase(ctx, "a.vhdx", nil); err != nil {
		t.Fatal(err)
	}
	disktest.MustClose(t, d)
	d = openVHDX(t, nil, top, true)
	if filepath.Base(d.Layers()[1].Name) != "a.vhdx" {
		t.Fatalf("chain %v after rebase", d.Layers())
	}
	if again := disktest.ReadAll(t, d); !bytes.Equal(again, got) {
		t.Fatal("safe rebase changed the content")
	}
	disktest.MustClose(t, d)

	// Standalone: the child keeps what it holds (the rest reads zeros).
	d = openVHDX(t, nil, top, false)
	want := disktest.ReadAll(t, d)
	for pos := int64(0); pos < size; {
		e, err := topImage(d).Status(pos, size-pos)
		if err != nil {
			t.Fatal(err)
		}
		if e.State == driver.Unallocated {
			clear(want[pos : pos+e.Length])
		}
		pos += e.Length
	}
	if err := d.SetParent(nil); err != nil {
		t.Fatal(err)
	}
	disktest.MustClose(t, d)
	d = openVHDX(t, nil, top, false)
	if len(d.Layers()) != 1 || topImage(d).Parent() != nil {
		t.Fatal("still has a parent")
	}
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
		i := 0
		for got[i] == want[i] {
			i++
		}
		t.Fatalf("standalone content: byte %d reads %#x, want %#x", i, got[i], want[i])
	}
	disktest.MustClose(t, d)
	qemuAgrees(t, top, want)
}

func vhdxModUUID(t *testing.T, f string) string {
	t.Helper()
	d := openVHDX(t, nil, f, true)
	defer d.Close()
	return topImage(d).ModificationUUID()
}

// TestSetIDs: the page 83 data, data write GUID and parent linkage change
// and survive a reopen; qemu still checks the image clean.
func TestSetIDs(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	base := filepath.Join(dir, "base.vhdx")
	d := createVHDX(t, nil, base, 4<<20, "", disktest.KVs("block_size=1M")...)
	disktest.MustClose(t, d)
	top := filepath.Join(dir, "top.vhdx")
	d = createVHDX(t, nil, top, 0, "base.vhdx")
	disktest.MustClose(t, d)
	const u1, u2, u3 = "6b0a6a5e-1d4c-4b7e-9d0f-0123456789ab", "11111111-2222-4333-8444-555555555555", "99999999-8888-4777-a666-555555555555"
	d = openVHDX(t, nil, base, false)
	im := topImage(d)
	if err := im.SetUUID(u1); err != nil {
		t.Fatal(err)
	}
	if err := im.SetModificationUUID(u2); err != nil {
		t.Fatal(err)
	}
	if err := im.SetUUID("nope"); !errors.Is(err, driver.ErrInvalidOption) {
		t.Fatalf("bad UUID: %v", err)
	}
	if err := im.SetParentModificationUUID(u3); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("parent linkage of a base image: %v", err)
	}
	disktest.MustClose(t, d)
	qemutest.Check(t, "vhdx", base)
	d = openVHDX(t, nil, base, true)
	if im := topImage(d); im.UUID() != u1 || im.ModificationUUID() != u2 {
		t.Fatalf("ids %s %s", im.UUID(), im.ModificationUUID())
	}
	disktest.MustClose(t, d)
	d = openVHDX(t, nil, top, false)
	if err := topImage(d).SetParentModificationUUID(u3); err != nil {
		t.Fatal(err)
	}
	disktest.MustClose(t, d)
	d = openVHDX(t, nil, top, true)
	if got := topImage(d).ParentModificationUUID(); got != u3 {
		t.Fatalf("parent linkage %s", got)
	}
	if ref := topImage(d).Parent(); ref.Name != "base.vhdx" {
		t.Fatalf("parent %+v", ref)
	}
	disktest.MustClose(t, d)
}
