package parallels

import (
	"context"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	_ "github.com/vdisk/vdisk/format/raw"
)

var ctx = context.Background()

// small keeps memfs tests light: the file grows by one cluster at a time.
var small = []driver.KV{{Key: "prealloc-size", Value: "0"}}

func createPrl(t testing.TB, st driver.Storage, name string, size int64, opts ...driver.KV) *vdisk.Disk {
	t.Helper()
	d, err := vdisk.Create(ctx, name, &vdisk.CreateOptions{Format: "parallels", Size: size, Options: opts, Storage: st})
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	return d
}

func openPrl(t testing.TB, st driver.Storage, name string, ro bool, opts ...driver.KV) *vdisk.Disk {
	t.Helper()
	d, err := vdisk.Open(ctx, name, &vdisk.OpenOptions{Storage: st, ReadOnly: ro, Options: opts})
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	return d
}

func topImage(d *vdisk.Disk) *image {
	im, ok := vdisk.As[*image](d.Top())
	if !ok {
		panic("the top layer is not a Parallels image")
	}
	return im
}
