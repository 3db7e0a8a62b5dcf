package qed

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

func createQED(t testing.TB, st driver.Storage, name string, size int64, backing, backFmt string, opts ...driver.KV) *vdisk.Disk {
	t.Helper()
	o := &vdisk.CreateOptions{Format: "qed", Size: size, Options: opts, Storage: st, Backing: backing, BackingFormat: backFmt}
	d, err := vdisk.Create(ctx, name, o)
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	return d
}

func openQED(t testing.TB, st driver.Storage, name string, ro bool) *vdisk.Disk {
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
		panic("the top layer is not a QED image")
	}
	return im
}

func fileSize(t testing.TB, st driver.Storage, name string) int64 {
	t.Helper()
	fi, err := st.Stat(name)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size
}

func writeRaw(t testing.TB, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// saveTo copies a memfs file out to dir for qemu.
func saveTo(t testing.TB, st *memfs.FS, name, dir string) string {
	t.Helper()
	b, err := st.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, filepath.Base(name))
	writeRaw(t, p, b)
	return p
}
