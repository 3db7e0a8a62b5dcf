package raw_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	_ "github.com/vdisk/vdisk/format/raw"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/internal/qemutest"
)

var ctx = context.Background()

// TestReadsQemuImages: images written by qemu-io read bit-exact, and the
// status walk matches qemu-img map.
func TestReadsQemuImages(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	for _, c := range []struct {
		name string
		size string
		cmds []string
	}{
		{"sparse", "64M", []string{"write -P 0xaa 1M 64k", "write -P 0x55 10M 1M", "write -z 10M 4k"}},
		{"odd-size", "1000", []string{"write -P 0x11 0 512"}},
		{"empty", "0", nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := filepath.Join(dir, c.name+".raw")
			qemutest.Create(t, "raw", f, c.size)
			if len(c.cmds) > 0 {
				qemutest.IO(t, "raw", f, c.cmds...)
			}
			d, err := vdisk.Open(ctx, f, &vdisk.OpenOptions{Format: "raw", ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			info := qemutest.Info(t, "raw", f)
			if got, want := d.Size(), int64(info["virtual-size"].(float64)); got != want {
				t.Fatalf("size %d, qemu-img says %d", got, want)
			}
			want, _ := os.ReadFile(f)
			want = append(want, make([]byte, int(d.Size())-len(want))...)
			got := make([]byte, d.Size())
			if _, err := d.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatal("content differs from the file")
			}
			// Data runs cover at least what qemu-img map calls data.
			for _, e := range qemutest.Map(t, "raw", f) {
				if !e.Data {
					continue
				}
				st, err := d.Status(e.Start, e.Length)
				if err != nil || !st.IsData() {
					t.Fatalf("qemu says %d+%d is data, vdisk says %+v (%v)", e.Start, e.Length, st, err)
				}
			}
		})
	}
}

// TestWritesPassQemuCompare: what vdisk writes compares equal (via qemu-img
// compare) to a reference raw written with plain file I/O.
func TestWritesPassQemuCompare(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "img.raw")
	ref := filepath.Join(dir, "ref.raw")
	const size = 32 << 20
	for _, pre := range []string{"off", "falloc", "full"} {
		d, err := vdisk.Create(ctx, img, &vdisk.CreateOptions{Format: "raw", Size: size, Overwrite: true, Options: []driver.KV{{Key: "preallocation", Value: pre}}})
		if err != nil {
			t.Fatal(err)
		}
		m := model.New(size)
		h := &model.Harness{Seed: 7, Ops: 800, MaxIO: 1 << 20,
			Reopen: func(d *vdisk.Disk) (*vdisk.Disk, error) {
				d.Close()
				return vdisk.Open(ctx, img, &vdisk.OpenOptions{Format: "raw"})
			}}
		d = h.Run(t, d, m)
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(ref, m.Data, 0o644); err != nil {
			t.Fatal(err)
		}
		if !qemutest.Compare(t, "raw", img, "raw", ref) {
			t.Fatalf("preallocation=%s: qemu-img compare says the images differ", pre)
		}
		fi, _ := os.Stat(img)
		if fi.Size() != size {
			t.Fatalf("file size %d", fi.Size())
		}
	}
}
