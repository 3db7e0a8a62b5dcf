package vhdx

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	_ "github.com/vdisk/vdisk/format/raw"
	"github.com/vdisk/vdisk/storage/memfs"
)

var ctx = context.Background()

func createVHDX(t testing.TB, st driver.Storage, name string, size int64, backing string, opts ...driver.KV) *vdisk.Disk {
	t.Helper()
	o := &vdisk.CreateOptions{Format: "vhdx", Size: size, Options: opts, Storage: st}
	if backing != "" {
		o.Backing = backing
	}
	d, err := vdisk.Create(ctx, name, o)
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	return d
}

func openVHDX(t testing.TB, st driver.Storage, name string, ro bool) *vdisk.Disk {
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
		panic("the top layer is not a VHDX image")
	}
	return im
}

// saveTo copies a memfs file out to dir for qemu.
func saveTo(t testing.TB, st *memfs.FS, name, dir string) string {
	t.Helper()
	b, err := st.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, filepath.Base(name))
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// qemuRaw converts an image to raw with qemu-img and returns the bytes.
func qemuRaw(t testing.TB, f string) []byte {
	t.Helper()
	out := f + ".qemu.raw"
	qemutestImg(t, "convert", "-f", "vhdx", "-O", "raw", f, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(out)
	return b
}
