package vdisk_test

import (
	"bytes"
	"crypto/sha256"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/internal/xfstest"
	"github.com/vdisk/vdisk/storage/osfs"
)

func fileSum(t *testing.T, name string) []byte {
	t.Helper()
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return h.Sum(nil)
}

// TestConvertReflinkXFS runs convert's copy offload on a file system that
// shares blocks (XFS with reflinks) rather than on ext4, where the other
// offload tests run: every block-aligned data run of the source is cloned
// (FICLONERANGE), not copied. The file system's own count of used space
// hardly moves, the stats count the bytes as reflinked, the output is
// qemu-img compare-identical with holes where the source has them, and a
// write to the output afterwards leaves the source as it was (the file
// system unshares the block). Formats whose data area is not block-aligned
// in their file (qemu-img's VDI and VHD; vdisk aligns VHD data) are copied by copy_file_range
// under -C (this package's tests run under CopyRangeAlways), still without
// passing through vdisk, and read and written by default. The other direction, raw
// into the formats that take file ranges (VHDX, QED, Parallels, VHD), is
// offloaded the same way and passes qemu-img check.
func TestConvertReflinkXFS(t *testing.T) {
	qemutest.Require(t)
	dir := xfstest.Dir(t)
	rawName, data := offloadSource(t, dir)
	rawSum := fileSum(t, rawName)

	t.Run("to-raw", func(t *testing.T) {
		for _, c := range []struct {
			name, format string
			opts         []string
			aligned      bool // every data run is block-aligned in the file: cloned
			vdiskMade    bool // the source is vdisk's convert of the raw file
		}{
			{"raw", "raw", nil, true, false},
			{"qcow2", "qcow2", nil, true, false},
			{"vhdx", "vhdx", nil, true, false},
			{"qed", "qed", nil, true, false},
			{"parallels", "parallels", nil, true, false},
			{"vmdk", "vmdk", nil, true, false},
			{"vdi", "vdi", nil, false, false},
			{"vpc", "vpc", nil, false, false},
			// vdisk aligns each VHD block's data to 4 KiB.
			{"vpc-vdisk", "vpc", nil, true, true},
		} {
			t.Run(c.name, func(t *testing.T) {
				name := rawName
				if c.vdiskMade {
					name = filepath.Join(dir, "src-vdisk."+c.format)
					src := openRO(t, rawName)
					convertInto(t, src, name, vdisk.CreateOptions{Format: c.format}, vdisk.ConvertOptions{NoOffload: true})
					src.Close()
				} else if c.format != "raw" {
					name = filepath.Join(dir, "src."+c.format)
					convertSource(t, rawName, c.format, name, c.opts...)
				}
				src, err := vdisk.Open(ctx, name, &vdisk.OpenOptions{Format: c.format, ReadOnly: true})
				if err != nil {
					t.Fatal(err)
				}
				out := filepath.Join(dir, c.name+"-out.raw")
				before := xfstest.Used(t, dir)
				st := convertToRaw(t, src, out, vdisk.ConvertOptions{Workers: 4, ChunkSize: 1 << 20})
				src.Close()
				grew := xfstest.Used(t, dir) - before
				t.Logf("stats %+v; file system use grew by %d bytes", st, grew)
				if st.Offloaded < data || st.Read != 0 || st.Written != 0 {
					t.Fatalf("stats %+v; want at least %d offloaded and nothing read or written", st, data)
				}
				if c.aligned {
					if st.Reflinked != st.Offloaded {
						t.Fatalf("stats %+v: %d of %d offloaded bytes cloned, want all", st, st.Reflinked, st.Offloaded)
					}
					// Metadata only (the file's extent records): far
					// less than the data, which a copy would add.
					if grew > data/4 {
						t.Fatalf("the file system's use grew by %d bytes for %d bytes of data: copied, not cloned", grew, data)
					}
				} else if grew < st.Offloaded-st.Reflinked {
					t.Fatalf("stats %+v: the file system's use grew by only %d bytes for the bytes not cloned", st, grew)
				}
				if !qemutest.Compare(t, "raw", rawName, "raw", out) {
					t.Fatal("qemu-img compare: the output differs from the source")
				}
				// Holes stay holes. (XFS allocates around a small write:
				// the source holds more than its data, the output need
				// not, so the data runs may differ.)
				if a, b := allocatedFiles(t, name), allocated(t, out); b > a {
					t.Fatalf("output allocates %d bytes, the source files %d", b, a)
				}
				// A write into a cloned block of the output must not reach
				// the source (or, for another format, its data).
				qemutest.IO(t, "raw", out, "write -P 0x77 0 64k", "write -P 0x78 20M 4k")
				if !bytes.Equal(fileSum(t, rawName), rawSum) {
					t.Fatal("a write to the output changed the raw source")
				}
				if !qemutest.Compare(t, c.format, name, "raw", rawName) {
					t.Fatal("a write to the output changed the source image")
				}
				if err := os.Remove(out); err != nil {
					t.Fatal(err)
				}
				if c.aligned {
					return
				}
				// By default (this package's tests run under
				// CopyRangeAlways, convert -C) what cannot be cloned is
				// read and written: XFS's copy_file_range would splice it
				// through the page cache.
				defer osfs.SetCopyRangePolicy(osfs.SetCopyRangePolicy(osfs.CopyRangeAuto))
				src, err = vdisk.Open(ctx, name, &vdisk.OpenOptions{Format: c.format, ReadOnly: true})
				if err != nil {
					t.Fatal(err)
				}
				st = convertToRaw(t, src, out, vdisk.ConvertOptions{Workers: 4, ChunkSize: 1 << 20})
				src.Close()
				t.Logf("default policy: stats %+v", st)
				if st.Offloaded != st.Reflinked || st.Written == 0 {
					t.Fatalf("default policy: stats %+v; want only clones offloaded, the rest written", st)
				}
				if !qemutest.Compare(t, "raw", rawName, "raw", out) {
					t.Fatal("default policy: qemu-img compare: the output differs from the source")
				}
			})
		}
	})

	t.Run("from-raw", func(t *testing.T) {
		for _, c := range []struct {
			format  string
			aligned bool // data blocks block-aligned in the file: all cloned
		}{
			{"vhdx", true},
			{"qed", true},
			{"parallels", true},
			{"vpc", true}, // (vdisk aligns VHD data to 4 KiB)
		} {
			t.Run(c.format, func(t *testing.T) {
				src := openRO(t, rawName)
				out := filepath.Join(dir, "out."+c.format)
				st := convertInto(t, src, out, vdisk.CreateOptions{Format: c.format}, vdisk.ConvertOptions{Workers: 4, ChunkSize: 1 << 20})
				src.Close()
				t.Logf("stats %+v", st)
				if st.Offloaded < data || st.Read != 0 || st.Written != 0 || (c.aligned && st.Reflinked != st.Offloaded) {
					t.Fatalf("stats %+v: want at least %d bytes offloaded, nothing read or written, all cloned: %v", st, data, c.aligned)
				}
				if c.format != "vpc" { // (qemu-img checks no VHD)
					qemutest.Check(t, c.format, out)
				}
				if !qemutest.Compare(t, "raw", rawName, c.format, out) {
					t.Fatal("qemu-img compare: the output differs from the source")
				}
				qemutest.IO(t, c.format, out, "write -P 0x79 0 64k")
				if !bytes.Equal(fileSum(t, rawName), rawSum) {
					t.Fatal("a write to the output changed the raw source")
				}
				if err := os.Remove(out); err != nil {
					t.Fatal(err)
				}
			})
		}
	})
}
