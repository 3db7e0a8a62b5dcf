package qed

import (
	"bytes"
	"encoding/binary"
	"errors"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/memfs"
)

func diskFeatures(t *testing.T, st *memfs.FS, name string) uint64 {
	t.Helper()
	b, err := st.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return binary.LittleEndian.Uint64(b[16:])
}

// TestNeedCheck: the flag reaches the disk before the first allocating
// write, is cleared by Flush and Close; an image left with it (a copy
// taken mid-session, plus a leaked cluster and an entry past the end of
// the file) reads correctly read-only, is repaired by a read-write open
// (vdisk's and qemu's), and then passes qemu-img check.
func TestNeedCheck(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	st := memfs.New()
	d := createQED(t, st, "/n.qed", 4<<20, "", "", disktest.KVs("cluster_size=4k", "table_size=2")...)
	if f := diskFeatures(t, st, "/n.qed"); f&featNeedCheck != 0 {
		t.Fatal("a new image has the need-check flag")
	}
	disktest.MustWrite(t, d, nil, disktest.Fill(10000, 1), 5000)
	if f := diskFeatures(t, st, "/n.qed"); f&featNeedCheck == 0 || !topImage(d).Info().Dirty {
		t.Fatal("no need-check flag after an allocating write")
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if f := diskFeatures(t, st, "/n.qed"); f&featNeedCheck != 0 || topImage(d).Info().Dirty {
		t.Fatal("the need-check flag survived a flush")
	}
	disktest.MustWrite(t, d, nil, disktest.Fill(3, 2), 5000) // in place: no flag
	if f := diskFeatures(t, st, "/n.qed"); f&featNeedCheck != 0 {
		t.Fatal("an in-place write set the need-check flag")
	}
	disktest.MustWrite(t, d, nil, disktest.Fill(20000, 3), 1<<20)
	want := make([]byte, 4<<20)
	copy(want[5000:], disktest.Fill(10000, 1))
	copy(want[5000:], disktest.Fill(3, 2))
	copy(want[1<<20:], disktest.Fill(20000, 3))
	crashed, _ := st.ReadFile("/n.qed") // what a crash now would leave
	disktest.MustClose(t, d)
	if f := diskFeatures(t, st, "/n.qed"); f&featNeedCheck != 0 {
		t.Fatal("the need-check flag survived a close")
	}
	if binary.LittleEndian.Uint64(crashed[16:])&featNeedCheck == 0 {
		t.Fatal("the mid-session copy has no need-check flag")
	}
	// Damage it as an interrupted allocation could: a leaked cluster at
	// the end and an L2 entry pointing past it.
	crashed = append(crashed, disktest.Fill(4096, 9)...)
	l2 := int64(binary.LittleEndian.Uint64(crashed[4096:]))
	binary.LittleEndian.PutUint64(crashed[l2+8*1000:], uint64(len(crashed))+4096)

	st.WriteFile("/c.qed", crashed)
	d = openQED(t, st, "/c.qed", true)
	got := make([]byte, 1000*4096)
	if _, err := d.ReadAt(got, 0); err != nil || !bytes.Equal(got, want[:len(got)]) {
		t.Fatalf("read-only open of a need-check image reads wrong data (%v)", err)
	}
	if _, err := d.ReadAt(got[:1], 1000*4096); !errors.Is(err, driver.ErrCorrupt) {
		t.Fatalf("reading the entry past the end of the file: %v", err)
	}
	if !d.Top().Info().Dirty {
		t.Fatal("read-only open cleared the flag")
	}
	disktest.MustClose(t, d)
	if f := diskFeatures(t, st, "/c.qed"); f&featNeedCheck == 0 {
		t.Fatal("a read-only open changed the file")
	}
	d = openQED(t, st, "/c.qed", false) // checks and repairs
	if d.Top().Info().Dirty {
		t.Fatal("the read-write open did not clear the flag")
	}
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
		t.Fatal("content after the open-time repair")
	}
	disktest.MustClose(t, d)
	qemutest.Check(t, "qed", disktest.SaveTo(t, st, "/c.qed", dir))

	// qemu's own repair of the same image.
	q := filepath.Join(dir, "q.qed")
	disktest.WriteFile(t, q, crashed)
	qemutest.IO(t, "qed", q, "read 0 512")
	out, code, err := qemutest.RunCode("qemu-img", "check", "-f", "qed", q)
	if err != nil || (code != 0 && code != 3) {
		t.Fatalf("qemu-img check after qemu's repair: exit %d %v\n%s", code, err, out)
	}
	// And vdisk reads what qemu repaired.
	d, err = vdisk.Open(ctx, q, &vdisk.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
		t.Fatal("content after qemu's repair")
	}
	disktest.MustClose(t, d)
}

// TestResize: growing keeps the content, reads zeros in the new range
// (also where the old last cluster held data past the old end), records
// the size qemu sees; shrinking is refused.
func TestResize(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	st := memfs.New()
	const old = 100<<10 + 512
	d := createQED(t, st, "/r.qed", old, "", "", disktest.KVs("cluster_size=64k")...)
	disktest.MustWrite(t, d, nil, disktest.Fill(old, 5), 0)
	// Stale bytes past the old end inside the last cluster.
	im := topImage(d)
	e, _, err := im.lookup(1)
	if err != nil || kindOf(e) != kindData {
		t.Fatal(e, err)
	}
	if _, err := im.f.WriteAt(disktest.Fill(1000, 0xee), int64(e)+old-64<<10); err != nil {
		t.Fatal(err)
	}
	if err := d.Resize(ctx, 10<<20, ""); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 10<<20)
	copy(want, disktest.Fill(old, 5))
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
		t.Fatal("content after growing")
	}
	if err := d.Resize(ctx, 1<<20, ""); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("shrinking: %v", err)
	}
	disktest.MustClose(t, d)
	img := disktest.SaveTo(t, st, "/r.qed", dir)
	qemutest.Check(t, "qed", img)
	if sz := int64(qemutest.Info(t, "qed", img)["virtual-size"].(float64)); sz != 10<<20 {
		t.Fatalf("qemu sees %d bytes", sz)
	}
	ref := filepath.Join(dir, "r.raw")
	disktest.WriteFile(t, ref, want)
	if !qemutest.Compare(t, "qed", img, "raw", ref) {
		t.Fatal("qemu-img compare after growing")
	}
}

// TestDiscardShrinks: discarding and unmapping whole clusters gives them
// back (the file shrinks, qemu-img check finds no leak), partial ranges
// stay; in a diff image discarded clusters read the backing file again.
func TestDiscardShrinks(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	st := memfs.New()
	const size = 8 << 20
	base := createQED(t, st, "/b.qed", size, "", "")
	disktest.MustWrite(t, base, nil, disktest.Fill(size, 0x0b), 0)
	disktest.MustClose(t, base)
	d := createQED(t, st, "/d.qed", size, "b.qed", "")
	disktest.MustWrite(t, d, nil, disktest.Fill(size, 0x0d), 0)
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	full := disktest.FileSize(t, st, "/d.qed")
	want := disktest.Fill(size, 0x0d)
	// Discard 1 MiB + a partial cluster: the backing file shows again.
	if err := d.Discard(1<<20, 1<<20+1000); err != nil {
		t.Fatal(err)
	}
	copy(want[1<<20:], disktest.Fill(1<<20, 0x0b))
	// Unmapping zeroes: zero clusters.
	if err := d.WriteZeroes(4<<20, 512<<10, true); err != nil {
		t.Fatal(err)
	}
	clear(want[4<<20 : 4<<20+512<<10])
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
		t.Fatal("content after discard and zero")
	}
	if got, wantSize := disktest.FileSize(t, st, "/d.qed"), full-(1<<20+512<<10); got != wantSize {
		t.Fatalf("file %d bytes after freeing 1.5 MiB of %d, want %d", got, full, wantSize)
	}
	if e, err := d.Status(4<<20, 512<<10); err != nil || e.State != driver.Zero || e.Depth != 0 {
		t.Fatalf("zeroed range: %+v %v", e, err)
	}
	disktest.MustClose(t, d)
	disktest.SaveTo(t, st, "/b.qed", dir)
	img := disktest.SaveTo(t, st, "/d.qed", dir)
	qemutest.Check(t, "qed", img)
	ref := filepath.Join(dir, "d.raw")
	disktest.WriteFile(t, ref, want)
	if !qemutest.Compare(t, "qed", img, "raw", ref) {
		t.Fatal("qemu-img compare after discard")
	}
}

// TestParentInfo: Parent reports the recorded backing file (format raw
// only with the no-probe feature); SetParent rewrites it and qemu follows
// the new name; MakeEmpty unallocates everything.
func TestParentInfo(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	st := memfs.New()
	b, err := vdisk.Create(ctx, "/base.raw", &vdisk.CreateOptions{Format: "raw", Size: 1 << 20, Storage: st})
	if err != nil {
		t.Fatal(err)
	}
	disktest.MustWrite(t, b, nil, disktest.Fill(1<<20, 0x77), 0)
	disktest.MustClose(t, b)
	d := createQED(t, st, "/top.qed", 0, "base.raw", "raw")
	if ref := d.Top().ParentRef(); ref == nil || ref.Name != "base.raw" || ref.Format != "raw" {
		t.Fatalf("parent %+v", ref)
	}
	s := d.Top().Info().Specific.(*Info)
	if s.BackingFile != "base.raw" || s.BackingFormat != "raw" || s.ClusterSize != 64<<10 || s.TableSize != 4 {
		t.Fatalf("info %+v", s)
	}
	disktest.MustWrite(t, d, nil, disktest.Fill(100, 1), 0)
	disktest.MustClose(t, d)
	raw, _ := st.ReadFile("/base.raw")
	st.WriteFile("/other.raw", raw)
	d = openQED(t, st, "/top.qed", false)
	im := topImage(d)
	if err := im.SetParent(&driver.ParentRef{Name: "other.raw", Format: "raw"}); err != nil {
		t.Fatal(err)
	}
	if ref := im.Parent(); ref.Name != "other.raw" || ref.Format != "raw" {
		t.Fatalf("parent after SetParent %+v", ref)
	}
	if err := im.MakeEmpty(); err != nil {
		t.Fatal(err)
	}
	disktest.MustClose(t, d)
	disktest.SaveTo(t, st, "/other.raw", dir)
	img := disktest.SaveTo(t, st, "/top.qed", dir)
	qemutest.Check(t, "qed", img)
	info := qemutest.Info(t, "qed", img)
	if info["backing-filename"] != "other.raw" || info["backing-filename-format"] != "raw" {
		t.Fatalf("qemu-img info %v", info)
	}
	if !qemutest.Compare(t, "qed", img, "raw", filepath.Join(dir, "other.raw")) {
		t.Fatal("the emptied image does not show its backing file")
	}
	d = openQED(t, st, "/top.qed", false)
	if err := topImage(d).SetParent(nil); err != nil {
		t.Fatal(err)
	}
	if d.Top().ParentRef() != nil {
		t.Fatal("SetParent(nil) kept a parent")
	}
	disktest.MustClose(t, d)
}
