package vhdx

import (
	"bytes"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
)

func qemutestImg(t testing.TB, args ...string) string { t.Helper(); return qemutest.Img(t, args...) }

// qemuCases are the kinds of VHDX qemu-img makes, each written by qemu-io.
var qemuCases = []struct {
	name string
	size string
	opts []string
	cmds []string
}{
	{"dynamic", "40M", nil, []string{"write -P 0xaa 0 64k", "write -P 0x55 9M 1M", "write -P 0x11 3145216 1k", "write -z 20M 2M", "write -P 0x33 39M 1M"}},
	{"dynamic-1M", "24M", []string{"block_size=1M"}, []string{"write -P 0xaa 1M 64k", "write -P 0x55 10M 1M", "write -P 0x11 3145216 1k", "write -P 0x22 12587008 3M", "write -z 10M 4k"}},
	{"dynamic-8M", "40M", []string{"block_size=8M"}, []string{"write -P 0x42 0 512", "write -P 0x43 17M 5M"}},
	{"dynamic-256M", "258M", []string{"block_size=256M"}, []string{"write -P 0x42 0 512", "write -P 0x43 257M 1M"}},
	{"log-4M", "16M", []string{"log_size=4M"}, []string{"write -P 0x61 5M 300k"}},
	{"zero-off", "16M", []string{"block_state_zero=off"}, []string{"write -P 0x62 1M 4k", "write -P 0x63 15M 1M"}},
	{"fixed", "20M", []string{"subformat=fixed"}, []string{"write -P 0x64 0 4k", "write -P 0x65 9M 2M"}},
	{"fixed-zero-off", "12M", []string{"subformat=fixed", "block_state_zero=off"}, []string{"write -P 0x66 4M 4k"}},
	{"odd-size", "3146240", nil, []string{"write -P 0x77 3M 512", "write -P 0x78 0 4096"}},
	{"tiny", "1000", nil, []string{"write -P 0x01 0 512"}},
	{"untouched", "5M", nil, nil},
}

// TestReadsQemuImages: every kind of VHDX qemu-img makes, written by
// qemu-io, reads bit-exact; status runs tile the disk and their zero runs
// read zeros.
func TestReadsQemuImages(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	for _, c := range qemuCases {
		t.Run(c.name, func(t *testing.T) {
			f := filepath.Join(dir, c.name+".vhdx")
			qemutest.Create(t, "vhdx", f, c.size, c.opts...)
			if len(c.cmds) > 0 {
				qemutest.IO(t, "vhdx", f, c.cmds...)
			}
			d, err := vdisk.Open(ctx, f, &vdisk.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			if got := d.Top().Format.Name; got != "vhdx" {
				t.Fatalf("probed as %s", got)
			}
			info := qemutest.Info(t, "vhdx", f)
			if got, want := d.Size(), int64(info["virtual-size"].(float64)); got != want {
				t.Fatalf("size %d, qemu-img says %d", got, want)
			}
			if got, want := d.Top().Info().ClusterSize, int64(info["cluster-size"].(float64)); got != want {
				t.Fatalf("cluster size %d, qemu-img says %d", got, want)
			}
			want := qemutest.Raw(t, "vhdx", f)
			got := disktest.ReadAll(t, d)
			if !bytes.Equal(got, want) {
				t.Fatal("content differs from qemu-img convert's")
			}
			checkRuns(t, d.Top(), got)
		})
	}
}

// checkRuns walks the image's status runs: they tile the disk, Zero and
// Unallocated runs read zeros, and Data runs read what the file holds.
func checkRuns(t testing.TB, l *vdisk.Layer, content []byte) {
	t.Helper()
	im, ok := vdisk.As[*image](l)
	if !ok {
		t.Fatal("not a vhdx layer")
	}
	size := im.Size()
	for off := int64(0); off < size; {
		e, err := im.Status(off, size-off)
		if err != nil {
			t.Fatalf("status at %d: %v", off, err)
		}
		if e.Length <= 0 || e.Length > size-off {
			t.Fatalf("status at %d: run of %d", off, e.Length)
		}
		if e.State != driver.Data && !driver.IsZero(content[off:off+e.Length]) {
			t.Fatalf("status says %v at %d+%d but the content is not zero", e.State, off, e.Length)
		}
		off += e.Length
	}
}
