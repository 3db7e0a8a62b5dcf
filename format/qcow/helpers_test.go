package qcow

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"

	_ "github.com/vdisk/vdisk/format/raw"
)

var ctx = context.Background()

// withGeometry makes Create use cluster_bits cb and l2_bits l2b until the
// test ends.
func withGeometry(t testing.TB, cb, l2b uint8) {
	old := geometry
	geometry = func(bool) (uint8, uint8) { return cb, l2b }
	t.Cleanup(func() { geometry = old })
}

func createQcow(t testing.TB, st driver.Storage, name string, size int64, backing string) *vdisk.Disk {
	t.Helper()
	o := &vdisk.CreateOptions{Format: "qcow", Size: size, Storage: st, Backing: backing}
	d, err := vdisk.Create(ctx, name, o)
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	return d
}

func openQcow(t testing.TB, st driver.Storage, name string, ro bool) *vdisk.Disk {
	t.Helper()
	d, err := vdisk.Open(ctx, name, &vdisk.OpenOptions{Storage: st, ReadOnly: ro})
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	return d
}

// topImage returns the driver image of the top layer.
func topImage(d *vdisk.Disk) *image {
	im, ok := vdisk.As[*image](d.Top())
	if !ok {
		panic("the top layer is not a qcow image")
	}
	return im
}

// checkAgainstQemu opens file (probed, with its chain) and checks that it
// reads what qemu-img convert reads, has qemu's virtual size, and that
// its status walk matches qemu-img map: every byte at the depth qemu
// reports, data where qemu has data, and, for runs of the top image, the
// same file offsets and run lengths.
func checkAgainstQemu(t *testing.T, file string, parentFormats ...string) {
	t.Helper()
	o := &vdisk.OpenOptions{ReadOnly: true}
	if len(parentFormats) > 0 {
		// qcow records no backing format and vdisk never guesses raw for
		// a backing file: name it.
		o.Parents = []string{filepath.Join(filepath.Dir(file), parentFormats[0])}
		o.ParentFormats = parentFormats[1:]
	}
	d, err := vdisk.Open(ctx, file, o)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if got := d.Top().Format.Name; got != "qcow" {
		t.Fatalf("probed as %s", got)
	}
	info := qemutest.Info(t, "qcow", file)
	if got, want := d.Size(), int64(info["virtual-size"].(float64)); got != want {
		t.Fatalf("size %d, qemu-img says %d", got, want)
	}
	if got, want := d.Top().Info().ClusterSize, int64(info["cluster-size"].(float64)); got != want {
		t.Fatalf("cluster size %d, qemu-img says %d", got, want)
	}
	want := qemutest.Raw(t, "qcow", file)
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
		t.Fatal("content differs from qemu-img convert's")
	}
	pos := int64(0)
	for _, e := range qemutest.Map(t, "qcow", file) {
		if e.Start != pos {
			t.Fatalf("qemu map has a gap at %d", pos)
		}
		for off := e.Start; off < e.Start+e.Length; {
			st, err := d.Status(off, e.Start+e.Length-off)
			if err != nil {
				t.Fatal(err)
			}
			if !e.Present {
				if st.Present() {
					t.Fatalf("qemu map: %d+%d unallocated everywhere; vdisk: %+v", e.Start, e.Length, st)
				}
			} else if st.Depth != e.Depth || st.IsData() != e.Data {
				t.Fatalf("qemu map %+v; vdisk at %d: %+v", e, off, st)
			}
			if e.Present && e.Depth == 0 && e.Data {
				if off != e.Start || st.Length != e.Length {
					t.Fatalf("qemu map has the data run %d+%d, vdisk %d+%d", e.Start, e.Length, off, st.Length)
				}
				if e.Offset != nil && *e.Offset != st.Offset || e.Offset == nil && st.Offset != -1 {
					t.Fatalf("qemu map %+v at offset %v, vdisk says %d", e, e.Offset, st.Offset)
				}
			}
			off += st.Length
		}
		pos = e.Start + e.Length
	}
	if pos != d.Size() {
		t.Fatalf("qemu map covers %d of %d bytes", pos, d.Size())
	}
}

func errorsIs(err, target error) bool { return errors.Is(err, target) }

// qemuCompress runs qemu-img convert -c -O qcow. qemu 7.2 exits 1 without
// a message after writing a complete image (its final zero-length
// compressed write, which ends VMDK streams, is refused by the qcow
// driver), so the result is checked with qemu-img compare instead.
func qemuCompress(t *testing.T, src, dst string) {
	t.Helper()
	out, code, err := qemutest.RunCode("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow", src, dst)
	if err != nil || code > 1 {
		t.Fatalf("qemu-img convert -c: exit %d: %v %s", code, err, out)
	}
	if !qemutest.Compare(t, "qcow", dst, "raw", src) {
		t.Fatalf("qemu-img convert -c (exit %d) made an image that differs from its source: %s", code, out)
	}
}

// qemuIO runs qemu-io commands on a qcow image with cache=unsafe: qemu's
// qcow driver syncs after every L2 update, which makes big writes slow
// and proves nothing here.
func qemuIO(t *testing.T, file string, cmds ...string) {
	t.Helper()
	args := []string{"-t", "unsafe", "-f", "qcow"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out := qemutest.Run(t, "qemu-io", append(args, file)...)
	if strings.Contains(out, "error") || strings.Contains(out, "failed") {
		t.Fatalf("qemu-io %v: %s", cmds, out)
	}
}
