package vhd_test

import (
	"bytes"
	"context"
	"fmt"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	_ "github.com/vdisk/vdisk/format/raw"
	"github.com/vdisk/vdisk/format/vhd"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
)

var ctx = context.Background()

func create(t testing.TB, st driver.Storage, name string, size int64, backing string, opts ...string) *vdisk.Disk {
	t.Helper()
	co := &vdisk.CreateOptions{Format: "vpc", Size: size, Options: disktest.KVs(opts...), Storage: st, Overwrite: true}
	if backing != "" {
		co.Backing, co.BackingFormat = backing, "vpc"
	}
	d, err := vdisk.Create(ctx, name, co)
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	return d
}

func openDisk(t testing.TB, st driver.Storage, name string, ro bool) *vdisk.Disk {
	t.Helper()
	d, err := vdisk.Open(ctx, name, &vdisk.OpenOptions{Format: "vpc", Storage: st, ReadOnly: ro})
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	return d
}

func spec(d *vdisk.Disk) *vhd.Specific {
	return d.Top().Info().Specific.(*vhd.Specific)
}

// ident is the top image's driver.Identifier.
func ident(t testing.TB, d *vdisk.Disk) driver.Identifier {
	t.Helper()
	id, ok := vdisk.As[driver.Identifier](d.Top())
	if !ok {
		t.Fatal("the VHD image is not a driver.Identifier")
	}
	return id
}

func firstDiff(a, b []byte) string {
	n := min(len(a), len(b))
	for i := 0; i < n; i++ {
		if a[i] != b[i] {
			return fmt.Sprintf("byte %d: %#x vs %#x", i, a[i], b[i])
		}
	}
	if len(a) != len(b) {
		return fmt.Sprintf("lengths %d vs %d", len(a), len(b))
	}
	return "equal"
}

func mustEqual(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: content differs (%s)", what, firstDiff(got, want))
	}
}

func qemuSize(t testing.TB, file string) int64 {
	t.Helper()
	return int64(qemutest.Info(t, "vpc", file)["virtual-size"].(float64))
}
