package vhdx

import (
	"context"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	_ "github.com/vdisk/vdisk/format/raw"
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
