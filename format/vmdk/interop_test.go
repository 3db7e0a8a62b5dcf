package vmdk

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// TestReadsQemuImages: images of every subformat made by qemu-img and
// written by qemu-io read bit-exact, with qemu's size, and status runs
// matching qemu-img map.
func TestReadsQemuImages(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	writes := []string{"write -P 0xaa 1M 64k", "write -P 0x55 3M 1M", "write -P 0x11 1049088 1k",
		"write -P 0x22 5243392 300k", "write -P 0x33 7M 512"}
	for _, c := range []struct {
		name, size string
		opts       []string
		cmds       []string
		compress   bool
	}{
		{"monolithicSparse", "8M", nil, writes, false},
		{"monolithicFlat", "8M", []string{"subformat=monolithicFlat"}, writes, false},
		{"twoGbMaxExtentSparse", "8M", []string{"subformat=twoGbMaxExtentSparse"}, writes, false},
		{"twoGbMaxExtentFlat", "8M", []string{"subformat=twoGbMaxExtentFlat"}, writes, false},
		{"streamOptimized", "8M", []string{"subformat=streamOptimized"}, nil, true},
		{"zeroed-grain", "8M", []string{"zeroed_grain=on"}, append(writes, "write -z 3M 128k", "write -z 6M 64k"), false},
		{"unaligned", "3146240", nil, []string{"write -P 0x77 3M 512", "write -P 0x78 0 4096"}, false},
		{"empty", "0", nil, nil, false},
		{"untouched", "5M", nil, nil, false},
		{"crlf-desc", "1M", []string{"subformat=monolithicFlat"}, []string{"write -P 9 4096 8k"}, false},
		{"adapter-hw", "2M", []string{"adapter_type=lsilogic", "hwversion=7"}, []string{"write -P 1 0 1M"}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := filepath.Join(dir, c.name+".vmdk")
			if c.compress {
				// qemu writes stream-optimized images through convert -c.
				src := filepath.Join(dir, c.name+".src")
				qemutest.Create(t, "raw", src, c.size)
				qemutest.IO(t, "raw", src, writes...)
				qemutest.Img(t, "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", src, f)
			} else {
				qemutest.Create(t, "vmdk", f, c.size, c.opts...)
				if len(c.cmds) > 0 {
					qemutest.IO(t, "vmdk", f, c.cmds...)
				}
			}
			if c.name == "empty" {
				d := openDisk(t, nil, f, true)
				if d.Size() != 0 {
					t.Fatalf("size %d", d.Size())
				}
				disktest.MustClose(t, d)
				return
			}
			info := qemutest.Info(t, "vmdk", f)
			want := qemuRaw(t, f)
			qmap := qemutest.Map(t, "vmdk", f)
			if c.name == "crlf-desc" {
				crlfDescriptor(t, f)
			}
			d, err := vdisk.Open(ctx, f, &vdisk.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			if got := d.Top().Format.Name; got != "vmdk" {
				t.Fatalf("probed as %s", got)
			}
			if got, want := d.Size(), int64(info["virtual-size"].(float64)); got != want {
				t.Fatalf("size %d, qemu-img says %d", got, want)
			}
			if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
				t.Fatal("content differs from qemu-img convert's")
			}
			for _, e := range qmap {
				st, err := topImage(d).Status(e.Start, e.Length)
				if err != nil {
					t.Fatal(err)
				}
				if e.Data != (st.State == driver.Data) || st.Length > e.Length || (e.Data && st.State != driver.Data) {
					t.Fatalf("qemu map %+v, vdisk status %+v", e, st)
				}
				if e.Zero && !e.Data && st.State == driver.Data {
					t.Fatalf("qemu map %+v, vdisk status %+v", e, st)
				}
			}
			spec := topImage(d).Info().Specific.(*Info)
			q := info["format-specific"].(map[string]any)["data"].(map[string]any)
			if spec.CreateType != q["create-type"] || float64(spec.CID) != q["cid"] || float64(spec.ParentCID) != q["parent-cid"] {
				t.Fatalf("info %+v, qemu %v", spec, q)
			}
			if len(spec.Extents) != len(q["extents"].([]any)) {
				t.Fatalf("extents %+v, qemu %v", spec.Extents, q["extents"])
			}
			res, err := d.Check(ctx, driver.RepairNone)
			if err != nil || res.Corruptions != 0 {
				t.Fatalf("check: %+v %v %q", res, err, res.Messages)
			}
		})
	}
}

// crlfDescriptor rewrites a descriptor file with CRLF line ends, extra
// blanks and comments, and upper-case keywords, as VMware files vary.
func crlfDescriptor(t *testing.T, f string) {
	b, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	s := strings.ReplaceAll(string(b), "\n", "\r\n")
	s = strings.Replace(s, "createType=", "  # a comment\r\n\r\ncreatetype = ", 1)
	s = strings.Replace(s, "RW ", "rw  ", 1)
	if err := os.WriteFile(f, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestReadsQemuSplit: a twoGbMaxExtentSparse image of three extents reads
// what qemu wrote across the extent boundaries.
func TestReadsQemuSplit(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	f := filepath.Join(dir, "big.vmdk")
	qemutest.Create(t, "vmdk", f, "4500M", "subformat=twoGbMaxExtentSparse")
	qemutest.IO(t, "vmdk", f, "write -P 0x44 2147418112 128k", "write -P 0x45 4400M 4k")
	for _, n := range []string{"big-s001.vmdk", "big-s002.vmdk", "big-s003.vmdk"} {
		if _, err := os.Stat(filepath.Join(dir, n)); err != nil {
			t.Fatal(err)
		}
	}
	d := openDisk(t, nil, f, true)
	defer d.Close()
	if d.Size() != 4500<<20 {
		t.Fatalf("size %d", d.Size())
	}
	buf := make([]byte, 256<<10)
	if _, err := d.ReadAt(buf, 2147418112-64<<10); err != nil {
		t.Fatal(err)
	}
	if !driver.IsZero(buf[:64<<10]) || !bytes.Equal(buf[64<<10:192<<10], disktest.Fill(128<<10, 0x44)) || !driver.IsZero(buf[192<<10:]) {
		t.Fatal("content across the extent boundary differs")
	}
	if _, err := d.ReadAt(buf[:8192], 4400<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf[:4096], disktest.Fill(4096, 0x45)) || !driver.IsZero(buf[4096:8192]) {
		t.Fatal("content in the third extent differs")
	}
	if n := len(topImage(d).exts); n != 3 {
		t.Fatalf("%d extents", n)
	}
}
