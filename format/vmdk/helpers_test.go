package vmdk

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	_ "github.com/vdisk/vdisk/format/raw"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/memfs"
)

var ctx = context.Background()

func createDisk(t testing.TB, st driver.Storage, name string, size int64, backing string, opts ...string) *vdisk.Disk {
	t.Helper()
	o := &vdisk.CreateOptions{Format: "vmdk", Size: size, Options: disktest.KVs(opts...), Storage: st}
	if backing != "" {
		o.Backing, o.BackingFormat = backing, "vmdk"
	}
	d, err := vdisk.Create(ctx, name, o)
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	return d
}

func openDisk(t testing.TB, st driver.Storage, name string, ro bool) *vdisk.Disk {
	t.Helper()
	d, err := vdisk.Open(ctx, name, &vdisk.OpenOptions{Storage: st, ReadOnly: ro})
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	return d
}

func topImage(d *vdisk.Disk) *image {
	im, ok := vdisk.As[*image](d.Top())
	if !ok {
		panic("the top layer is not a VMDK image")
	}
	return im
}

// qemuRaw converts an image to raw with qemu-img and returns the bytes.
func qemuRaw(t testing.TB, f string) []byte {
	t.Helper()
	out := f + ".qemu.raw"
	qemutest.Img(t, "convert", "-f", "vmdk", "-O", "raw", f, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(out)
	return b
}

// saveAll copies every memfs file of the image set to dir.
func saveAll(t testing.TB, st *memfs.FS, dir string) {
	t.Helper()
	names, err := st.List("/")
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		b, err := st.ReadFile("/" + n)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, n), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func errorsIs(err, target error) bool { return errors.Is(err, target) }
