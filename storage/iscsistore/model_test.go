package iscsistore_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// A qcow2 overlay on a local disk whose backing file is an iSCSI LUN,
// driven by the reference model: reads fall through to the LUN, writes go
// to the overlay, the LUN is never written.
func TestQcow2OverlayOnISCSI(t *testing.T) {
	const size = 8 << 20
	tg, lunFile := newTarget(t, size)
	url := tg.URL(1)
	qemuIO(t, url, "write -P 0x11 0 1M", "write -P 0x22 3M 512k", "write -P 0x33 7M 100k")
	before, err := os.ReadFile(lunFile)
	if err != nil {
		t.Fatal(err)
	}
	m := model.New(size)
	m.Write(before, 0)

	ctx := context.Background()
	top := filepath.Join(t.TempDir(), "top.qcow2")
	d, err := vdisk.Create(ctx, top, &vdisk.CreateOptions{Format: "qcow2", Backing: url, BackingFormat: "raw", Paths: driver.PathTrusted})
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Layers()) != 2 {
		t.Fatalf("%d layers", len(d.Layers()))
	}
	reopen := func(d *vdisk.Disk) (*vdisk.Disk, error) {
		if err := d.Close(); err != nil {
			return nil, err
		}
		return vdisk.Open(ctx, top, &vdisk.OpenOptions{Paths: driver.PathTrusted})
	}
	ops := 3000
	if testing.Short() {
		ops = 500
	}
	h := &model.Harness{Seed: 18, Ops: ops, MaxIO: 512 << 10, Reopen: reopen}
	d = h.Run(t, d, m)
	h.Verify(t, d, m)
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	after, err := os.ReadFile(lunFile)
	if err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "the LUN under the overlay", after, before)
	// qemu reads the same chain through its own initiator.
	if r := qemutest.Check(t, "qcow2", top); r.Corruptions != 0 || r.Leaks != 0 {
		t.Fatalf("qemu-img check: %+v", r)
	}
	flat := filepath.Join(t.TempDir(), "flat.raw")
	if err := os.WriteFile(flat, m.Data, 0o644); err != nil {
		t.Fatal(err)
	}
	if !qemutest.Compare(t, "qcow2", top, "raw", flat) {
		t.Fatal("qemu-img compare: the chain differs from the model")
	}
}
