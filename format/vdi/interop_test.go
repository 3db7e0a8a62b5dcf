package vdi

import (
	"bytes"
	"fmt"
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

// TestReadsQemuImages: images made by qemu-img create and written by
// qemu-io read bit-exact, with the size qemu reports and data runs where
// qemu-img map has them.
func TestReadsQemuImages(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	for _, c := range []struct {
		name string
		size string
		opts []string
		cmds []string
	}{
		{"dynamic", "24M", nil, []string{
			"write -P 0xaa 1M 64k", "write -P 0x55 10M 1M", "write -P 0x11 3145216 1k",
			"write -P 0x22 12587008 3M", "write -z 10M 4k", "write -P 0x33 23M 1M"}},
		{"static", "8M", []string{"static=on"}, []string{"write -P 0x42 0 512", "write -P 0x43 5243880 2000"}},
		{"odd-size", "3146240", nil, []string{"write -P 0x77 3M 512", "write -P 0x78 0 4096"}},
		{"tiny", "1000", nil, []string{"write -P 0x01 0 512"}},
		{"empty", "0", nil, nil},
		{"untouched", "5M", nil, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := filepath.Join(dir, c.name+".vdi")
			qemutest.Create(t, "vdi", f, c.size, c.opts...)
			if len(c.cmds) > 0 {
				qemutest.IO(t, "vdi", f, c.cmds...)
			}
			d, err := vdisk.Open(ctx, f, &vdisk.OpenOptions{ReadOnly: true}) // probed
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			if got := d.Top().Format.Name; got != "vdi" {
				t.Fatalf("probed as %s", got)
			}
			info := qemutest.Info(t, "vdi", f)
			if got, want := d.Size(), int64(info["virtual-size"].(float64)); got != want {
				t.Fatalf("size %d, qemu-img says %d", got, want)
			}
			want := qemutest.Raw(t, "vdi", f)
			if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
				t.Fatal("content differs from qemu-img convert's")
			}
			for _, e := range qemutest.Map(t, "vdi", f) {
				st, err := d.Status(e.Start, e.Length)
				if err != nil {
					t.Fatal(err)
				}
				if e.Data != st.IsData() || (e.Data && st.Length != e.Length) {
					t.Fatalf("qemu map %+v, vdisk status %+v", e, st)
				}
				if e.Data && e.Offset != nil && *e.Offset != st.Offset {
					t.Fatalf("qemu map %+v at offset %d, vdisk says %d", e, *e.Offset, st.Offset)
				}
			}
			if c.name == "static" {
				if s := topImage(d).Info().Specific.(*Info); s.Type != "fixed" || s.AllocatedBlocks != s.Blocks {
					t.Fatalf("static image info %+v", s)
				}
			}
			res, err := d.Check(ctx, driver.RepairNone)
			if err != nil || res.Corruptions != 0 || res.Leaks != 0 {
				t.Fatalf("check: %+v %v", res, err)
			}
		})
	}
}

// TestWritesPassQemu: what vdisk writes (dynamic, static, odd size with a
// comment) passes qemu-img check and compares equal to the model's
// content; qemu can then write the image and vdisk reads what it wrote.
// The model runs on memfs (the bytes are the same as on disk, without the
// cost of real syncs); qemu gets a copy.
func TestWritesPassQemu(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	for _, c := range []struct {
		name string
		size int64
		opts []driver.KV
	}{
		{"dynamic", 12 << 20, nil},
		{"static", 5 << 20, []driver.KV{{Key: "static", Value: "on"}}},
		{"odd-size", 5<<20 + 3*512, []driver.KV{{Key: "comment", Value: "made by vdisk"}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			st := memfs.New()
			name := "/" + c.name + ".vdi"
			d := createVDI(t, st, name, c.size, "", c.opts...)
			m := model.New(c.size)
			h := &model.Harness{Seed: 11, Ops: 400, MaxIO: 1 << 20,
				Reopen: func(d *vdisk.Disk) (*vdisk.Disk, error) {
					if err := d.Close(); err != nil {
						return nil, err
					}
					return vdisk.Open(ctx, name, &vdisk.OpenOptions{Storage: st})
				}}
			d = h.Run(t, d, m)
			disktest.MustClose(t, d)
			img := disktest.SaveTo(t, st, name, dir)
			ref := filepath.Join(dir, c.name+".raw")
			disktest.WriteFile(t, ref, m.Data)
			qemutest.Check(t, "vdi", img)
			if !qemutest.Compare(t, "vdi", img, "raw", ref) {
				t.Fatal("qemu-img compare: the VDI differs from the model")
			}
			// qemu writes into our layout; we read it.
			qemutest.IO(t, "vdi", img, "write -P 0x5a 1049000 3000", fmt.Sprintf("write -P 0x6b %d 512", c.size-512))
			copy(m.Data[1049000:], disktest.Fill(3000, 0x5a))
			copy(m.Data[c.size-512:], disktest.Fill(512, 0x6b))
			d, err := vdisk.Open(ctx, img, &vdisk.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			if got := disktest.ReadAll(t, d); !bytes.Equal(got, m.Data) {
				t.Fatal("vdisk does not read what qemu-io wrote")
			}
			disktest.MustClose(t, d)
		})
	}
}

// TestCompactDiscardShrink: compaction and discard keep the content (qemu-img
// compare against a raw copy taken before) and shrink the file.
func TestCompactDiscardShrink(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "c.vdi")
	ref := filepath.Join(dir, "c.raw")
	const size = 16 << 20
	d, err := vdisk.Create(ctx, img, &vdisk.CreateOptions{Format: "vdi", Size: size})
	if err != nil {
		t.Fatal(err)
	}
	m := model.New(size)
	for i := int64(0); i < 16; i++ {
		disktest.MustWrite(t, d, m, disktest.Fill(1<<20, byte(i+1)), i<<20)
	}
	// Zero some blocks in place (they stay allocated), and parts of others.
	for _, b := range []int64{2, 3, 9, 11, 15} {
		if err := d.WriteZeroes(b<<20, 1<<20, false); err != nil {
			t.Fatal(err)
		}
		m.Zero(b<<20, 1<<20)
	}
	if err := d.WriteZeroes(10<<20+100, 5000, true); err != nil {
		t.Fatal(err)
	}
	m.Zero(10<<20+100, 5000)
	disktest.MustClose(t, d)
	disktest.WriteFile(t, ref, m.Data)
	before := fileSizeOS(t, img)
	d, err = vdisk.Open(ctx, img, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Compact(ctx, nil); err != nil {
		t.Fatal(err)
	}
	disktest.MustClose(t, d)
	after := fileSizeOS(t, img)
	if after != before-5<<20 {
		t.Fatalf("compact: file %d -> %d bytes, want %d fewer", before, after, 5<<20)
	}
	qemutest.Check(t, "vdi", img)
	if !qemutest.Compare(t, "vdi", img, "raw", ref) {
		t.Fatal("compact changed the content")
	}

	// Discard: whole blocks go (free blocks of a base image read zeros; the
	// file shrinks by them), partial ranges are left as they are. Zero the
	// whole blocks in the reference first.
	d, err = vdisk.Open(ctx, img, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range [][3]int64{{5 << 20, 2 << 20, 1}, {12<<20 + 4096, 8192, 0}, {14 << 20, 1 << 20, 1}} {
		if err := d.Discard(r[0], r[1]); err != nil {
			t.Fatal(err)
		}
		if r[2] != 0 {
			m.Zero(r[0], r[1])
		}
	}
	for _, b := range []int64{5, 6, 14} {
		if e := topImage(d).entry(b); e != entFree {
			t.Fatalf("discarded block %d has entry %#x, want a free block", b, e)
		}
	}
	disktest.MustClose(t, d)
	disktest.WriteFile(t, ref, m.Data)
	if got := fileSizeOS(t, img); got != after-3<<20 {
		t.Fatalf("discard: file %d -> %d bytes, want 3 MiB fewer", after, got)
	}
	qemutest.Check(t, "vdi", img)
	if !qemutest.Compare(t, "vdi", img, "raw", ref) {
		t.Fatal("discard changed the content beyond the discarded ranges")
	}
}

func fileSizeOS(t testing.TB, name string) int64 {
	t.Helper()
	fi, err := os.Stat(name)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}
