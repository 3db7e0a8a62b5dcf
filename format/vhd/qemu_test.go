package vhd_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/osfs"
)

// TestSizesMatchQemu: for sizes around every geometry rule, an image vdisk
// creates has the virtual size of the one qemu-img creates, and each reads
// the other's at that size.
func TestSizesMatchQemu(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	sizes := []int64{0, 512, 7000, 10<<20 + 1, 100000000,
		4*1024*17*512 - 512, 4 * 1024 * 17 * 512, 16*1024*31*512 + 512,
		65535*16*63*512 - 512, 65535 * 16 * 63 * 512, 65535*16*63*512 + 512,
		65535*16*255*512 - 4096, 65535 * 16 * 255 * 512, 200 << 30}
	for i, size := range sizes {
		for _, force := range []string{"off", "on"} {
			for _, sub := range []string{"dynamic", "fixed"} {
				// The size rules do not depend on the subformat; a few
				// fixed images suffice.
				if sub == "fixed" && (size > 2<<30 || i%3 != 0) {
					continue
				}
				name := fmt.Sprintf("%d-%s-%s", size, sub, force)
				q := filepath.Join(dir, name+".q.vhd")
				v := filepath.Join(dir, name+".v.vhd")
				qemutest.Create(t, "vpc", q, fmt.Sprint(size), "subformat="+sub, "force_size="+force)
				d := create(t, nil, v, size, "", "subformat="+sub, "force_size="+force)
				got := d.Size()
				d.Close()
				if size == 0 && sub == "fixed" {
					// qemu finds the footer of an empty fixed image at
					// offset 0 and takes it for a dynamic one.
					continue
				}
				if want := qemuSize(t, q); got != want {
					t.Errorf("%s: vdisk makes %d bytes, qemu %d", name, got, want)
				}
				if qs := qemuSize(t, v); qs != got {
					t.Errorf("%s: qemu reads vdisk's image as %d bytes, vdisk %d", name, qs, got)
				}
				d = openDisk(t, nil, q, true)
				if d.Size() != got {
					t.Errorf("%s: vdisk reads qemu's image as %d bytes, want %d", name, d.Size(), got)
				}
				d.Close()
				os.Remove(q)
				os.Remove(v)
			}
		}
	}
}

// TestAzureForceSize: a fixed image with force_size at a MiB-aligned size
// has exactly that size, and its file is that size plus the footer.
func TestAzureForceSize(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	for _, mib := range []int64{1, 10, 1000, 1025} {
		f := filepath.Join(dir, fmt.Sprintf("az%d.vhd", mib))
		d := create(t, nil, f, mib<<20, "", "subformat=fixed", "force_size=on")
		if d.Size() != mib<<20 {
			t.Fatalf("size %d, want %d", d.Size(), mib<<20)
		}
		d.Close()
		fi, _ := os.Stat(f)
		if fi.Size() != mib<<20+512 {
			t.Fatalf("file size %d", fi.Size())
		}
		if qs := qemuSize(t, f); qs != mib<<20 {
			t.Fatalf("qemu says %d", qs)
		}
	}
}

// TestReadsQemuImages: images qemu-img makes and qemu-io writes read
// bit-exact, as qemu itself reads them.
func TestReadsQemuImages(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	cmds := []string{"write -P 0xaa 0 512", "write -P 0x55 1M 64k", "write -P 0x11 3145216 1024",
		"write -P 0x77 7M 2M", "write -z 7340544 4096", "write -P 0x99 12M 513"}
	for _, c := range []struct {
		name string
		opts []string
	}{
		{"dynamic", []string{"subformat=dynamic"}},
		{"dynamic-force", []string{"subformat=dynamic", "force_size=on"}},
		{"fixed", []string{"subformat=fixed"}},
		{"fixed-force", []string{"subformat=fixed", "force_size=on"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := filepath.Join(dir, c.name+".vhd")
			qemutest.Create(t, "vpc", f, "13M", c.opts...)
			qemutest.IO(t, "vpc", f, cmds...)
			want := qemutest.Raw(t, "vpc", f)
			d := openDisk(t, nil, f, true)
			if d.Size() != int64(len(want)) {
				t.Fatalf("size %d, qemu %d", d.Size(), len(want))
			}
			mustEqual(t, "vdisk vs qemu", disktest.ReadAll(t, d), want)
			// Every run qemu calls data is data (or allocated) for vdisk.
			for _, e := range qemutest.Map(t, "vpc", f) {
				if !e.Data {
					continue
				}
				st, err := d.Status(e.Start, e.Length)
				if err != nil || !(st.IsData() || st.ReadsZero()) {
					t.Fatalf("qemu says %d+%d is data, vdisk says %+v (%v)", e.Start, e.Length, st, err)
				}
			}
			d.Close()
			// A read-write open leaves it valid for qemu.
			d2, err := vdisk.Open(ctx, f, &vdisk.OpenOptions{Format: "vpc"})
			if err == nil {
				err = d2.Close()
			}
			if err != nil {
				t.Fatal(err)
			}
			mustEqual(t, "after a read-write open", qemutest.Raw(t, "vpc", f), want)
		})
	}
}

// TestQemuReadsOurImages: fixed and dynamic images vdisk writes (random
// model operations with reopen steps) read in qemu exactly as the model
// says.
func TestQemuReadsOurImages(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	for _, c := range []struct {
		name string
		size int64
		opts []string
	}{
		{"dynamic", 24 << 20, []string{"subformat=dynamic"}},
		{"dynamic-64k", 9<<20 + 3*512, []string{"subformat=dynamic", "block_size=64K"}},
		{"dynamic-force", 24<<20 + 512, []string{"subformat=dynamic", "force_size=on"}},
		{"fixed", 24 << 20, []string{"subformat=fixed"}},
		{"fixed-force", 24 << 20, []string{"subformat=fixed", "force_size=on"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := filepath.Join(dir, c.name+".vhd")
			ref := filepath.Join(dir, c.name+".raw")
			d := create(t, nil, f, c.size, "", c.opts...)
			m := model.New(d.Size())
			h := &model.Harness{Seed: 11, Ops: 300, MaxIO: 256 << 10,
				Reopen: func(d *vdisk.Disk) (*vdisk.Disk, error) {
					if err := d.Close(); err != nil {
						return nil, err
					}
					return vdisk.Open(ctx, f, &vdisk.OpenOptions{Format: "vpc"})
				}}
			d = h.Run(t, d, m)
			res, err := d.Check(ctx, 0)
			if err != nil || res.Corruptions+res.Leaks+res.CheckErrors != 0 {
				t.Fatalf("vdisk check: %+v %v", res, err)
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(ref, m.Data, 0o644); err != nil {
				t.Fatal(err)
			}
			if qs := qemuSize(t, f); qs != int64(len(m.Data)) {
				t.Fatalf("qemu size %d, vdisk %d", qs, len(m.Data))
			}
			if !qemutest.Compare(t, "vpc", f, "raw", ref) {
				t.Fatal("qemu-img compare: the image differs from the model")
			}
			// qemu-io can open it read-write and read it all.
			out := qemutest.Run(t, "qemu-io", "-f", "vpc", "-c", fmt.Sprintf("read 0 %d", len(m.Data)), f)
			if strings.Contains(out, "error") || strings.Contains(out, "failed") {
				t.Fatalf("qemu-io: %s", out)
			}
			// qemu-img check does not support vpc (exit 63); make sure it
			// says so rather than reporting a problem.
			if out, code, _ := qemutest.RunCode("qemu-img", "check", "-f", "vpc", f); code != 0 && code != 63 {
				t.Fatalf("qemu-img check: exit %d: %s", code, out)
			}
		})
	}
}

// TestQemuOpensDiff records what qemu does with a vdisk differencing image:
// qemu's vpc driver has no differencing support and opens it as a
// standalone dynamic image (sectors the child does not hold read as
// zeros, not as the parent's content).
func TestQemuOpensDiff(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	base := filepath.Join(dir, "base.vhd")
	top := filepath.Join(dir, "top.vhd")
	st := osfs.New()
	d := create(t, st, base, 4<<20, "", "force_size=on")
	pat := []byte(strings.Repeat("B", 4096))
	d.WriteAt(pat, 0)
	d.WriteAt(pat, 3<<20)
	d.Close()
	d = create(t, st, top, 0, "base.vhd")
	d.WriteAt([]byte(strings.Repeat("T", 100)), 10)
	d.Close()
	out, code, err := qemutest.RunCode("qemu-img", "info", "-f", "vpc", top)
	if err != nil {
		t.Fatal(err)
	}
	// qemu (Debian 12's 7.2) opens it as a dynamic image of the
	// same size; if a later qemu refuses it instead, this test says so.
	if code != 0 {
		t.Fatalf("qemu-img info on a differencing VHD: exit %d (qemu used to open it as a standalone dynamic image)\n%s", code, out)
	}
	if !strings.Contains(out, "file format: vpc") || !strings.Contains(out, "(4194304 bytes)") {
		t.Fatalf("qemu-img info on a differencing VHD:\n%s", out)
	}
	got := qemutest.Raw(t, "vpc", top)
	if len(got) != 4<<20 {
		t.Fatalf("qemu size %d", len(got))
	}
	// The partial sector was filled from the parent on write; the rest of
	// the block and the unallocated blocks read zeros in qemu.
	if string(got[10:110]) != strings.Repeat("T", 100) || got[0] != 'B' || got[512] != 0 || got[3<<20] != 0 {
		t.Fatalf("qemu reads the diff differently than expected: %q %q", got[:16], got[3<<20:3<<20+4])
	}
}
