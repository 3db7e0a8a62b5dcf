package nbdstore_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// TestOverlayModel runs the reference model over a local qcow2 overlay
// whose backing file is an nbd:// raw export of qemu-nbd, with reopen
// steps that find the base again through the recorded URL.
func TestOverlayModel(t *testing.T) {
	ops := 2000
	if os.Getenv("VDISK_LONG") != "" {
		ops = 30000
	}
	for _, seed := range []int64{1, 2} {
		t.Run(fmt.Sprintf("seed%d", seed), func(t *testing.T) {
			dir := t.TempDir()
			const size = 8<<20 + 4096
			file, want := sparseQcow2(t, dir, size, [][2]int64{{0, 1 << 20}, {3<<20 + 512, 300 << 10}, {8 << 20, 4096}})
			_, url := qemuNBD(t, "qcow2", file, "-r")
			// The overlay lives in memory (the harness flushes often);
			// qemu checks a copy at the end.
			st := memfs.New()
			const top = "/top.qcow2"
			d, err := vdisk.Create(context.Background(), top, &vdisk.CreateOptions{Format: "qcow2", Backing: url, BackingFormat: "raw", Paths: driver.PathTrusted, Storage: st, StorageOptions: map[string]string{"multi-conn": "1"}})
			if err != nil {
				t.Fatal(err)
			}
			if n := len(d.Layers()); n != 2 || d.Size() != size {
				t.Fatalf("%d layers of size %d", n, d.Size())
			}
			m := model.New(size)
			copy(m.Data, want)
			reopen := func(d *vdisk.Disk) (*vdisk.Disk, error) {
				if err := d.Close(); err != nil {
					return nil, err
				}
				nd, err := vdisk.Open(context.Background(), top, &vdisk.OpenOptions{Paths: driver.PathTrusted, Storage: st, StorageOptions: map[string]string{"multi-conn": "1"}})
				if err == nil && len(nd.Layers()) != 2 {
					nd.Close()
					return nil, fmt.Errorf("reopened chain has %d layers", len(nd.Layers()))
				}
				return nd, err
			}
			h := &model.Harness{Seed: seed, Ops: ops, MaxIO: 128 << 10, Reopen: reopen}
			d = h.Run(t, d, m)
			h.Verify(t, d, m)
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			f, err := st.Open(top, driver.ReadOnly)
			if err != nil {
				t.Fatal(err)
			}
			n, _ := f.Size()
			img := make([]byte, n)
			if _, err := f.ReadAt(img, 0); err != nil {
				t.Fatal(err)
			}
			f.Close()
			local := filepath.Join(dir, "top.qcow2")
			if err := os.WriteFile(local, img, 0o644); err != nil {
				t.Fatal(err)
			}
			qemutest.Check(t, "qcow2", local)
			ref := filepath.Join(dir, "model.raw")
			if err := os.WriteFile(ref, m.Data, 0o644); err != nil {
				t.Fatal(err)
			}
			if !qemutest.Compare(t, "qcow2", local, "raw", ref) {
				t.Fatal("qemu-img compare: the overlay on the NBD base differs from the model")
			}
		})
	}
}
