package s3

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

// TestOverlayOnS3Base: a local qcow2 overlay whose backing file is a
// compressed qcow2 on S3, driven by the reference model with reopen steps
// (10^4 operations), then checked by qemu-img against the model.
func TestOverlayOnS3Base(t *testing.T) {
	t.Parallel()
	qemutest.Require(t, "qemu-img")
	s := startServer(t)
	const size = 16 << 20
	src := makeSource(t, size)
	base := s3url("ov/base.qcow2")
	if err := convertTo(t, s, src, base, "qcow2", nil, true); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	m := model.New(size)
	m.Write(data, 0)

	ctx := context.Background()
	top := filepath.Join(t.TempDir(), "vm1.qcow2")
	sopts := s.opts("block-size", "256K")
	d, err := vdisk.Create(ctx, top, &vdisk.CreateOptions{Format: "qcow2", Backing: base, BackingFormat: "qcow2", Paths: driver.PathTrusted, Dialer: s.dial.Dial, StorageOptions: sopts})
	if err != nil {
		t.Fatal(err)
	}
	reopen := func(d *vdisk.Disk) (*vdisk.Disk, error) {
		if err := d.Close(); err != nil {
			return nil, err
		}
		// A network backing name is followed under the trusted path
		// policy (or under Strict with AllowSchemes, below).
		return vdisk.Open(ctx, top, &vdisk.OpenOptions{Paths: driver.PathTrusted, Dialer: s.dial.Dial, StorageOptions: sopts})
	}
	ops := 10000
	if testing.Short() {
		ops = 2000
	}
	h := &model.Harness{Seed: 19, Ops: ops, MaxIO: 64 << 10, Reopen: reopen}
	d = h.Run(t, d, m)
	h.Verify(t, d, m)
	if len(d.Layers()) != 2 {
		t.Fatalf("%d layers", len(d.Layers()))
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	// The base on S3 is unchanged: the writes stayed local.
	if !qemutest.Compare(t, "raw", src, "qcow2", s.download("ov/base.qcow2")) {
		t.Fatal("the S3 base changed")
	}
	// qemu has no s3 protocol: check the overlay without its backing.
	spec := `json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":"` + top + `"}}`
	if out, code, err := qemutest.RunCode("qemu-img", "check", spec); err != nil || code != 0 {
		t.Fatalf("qemu-img check of the overlay: exit %d %v\n%s", code, err, out)
	}
	// Under the strict policy the S3 base is refused, unless the s3
	// scheme is allowed for backing files.
	if d, err := vdisk.Open(ctx, top, &vdisk.OpenOptions{ReadOnly: true, Dialer: s.dial.Dial, StorageOptions: sopts}); err == nil {
		d.Close()
		t.Fatal("a strict open followed the s3:// backing file")
	}
	// The overlay read by vdisk matches the model byte for byte.
	d, err = vdisk.Open(ctx, top, &vdisk.OpenOptions{ReadOnly: true, AllowSchemes: []string{"s3"}, Dialer: s.dial.Dial, StorageOptions: sopts})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	h.Verify(t, d, m)
}
