package s3

import (
	"context"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

// TestCloseReleasesConnections: the storage vdisk builds for an s3:// name
// is closed with the last image on it (driver.StorageCloser), so no idle
// connection to the server outlives the Disk: as the top image, as the
// S3 base of a local overlay, and after a failed open.
func TestCloseReleasesConnections(t *testing.T) {
	t.Parallel()
	s := startServerKeepAlive(t, true)
	ctx := context.Background()
	src := makeSource(t, 8<<20)
	if err := convertTo(t, s, src, s3url("close/base.raw"), "raw", nil, false); err != nil {
		t.Fatal(err)
	}
	top := t.TempDir() + "/top.qcow2"
	d, err := vdisk.Create(ctx, top, &vdisk.CreateOptions{Format: "qcow2", Backing: s3url("close/base.raw"), BackingFormat: "raw", Paths: driver.PathTrusted, Dialer: s.dial.Dial, StorageOptions: s.opts()})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, image, format string
		fails               bool
	}{
		{"top", s3url("close/base.raw"), "raw", false},
		{"base of an overlay", top, "", false},
		{"failed open", s3url("close/base.raw"), "qcow2", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			d, err := vdisk.Open(ctx, c.image, &vdisk.OpenOptions{Format: c.format, ReadOnly: true, Paths: driver.PathTrusted, Dialer: s.dial.Dial, StorageOptions: s.opts()})
			if c.fails {
				if err == nil {
					d.Close()
					t.Fatal("open succeeded")
				}
			} else {
				if err != nil {
					t.Fatal(err)
				}
				buf := make([]byte, 4<<20)
				if _, err := d.ReadAt(buf, 2<<20); err != nil {
					t.Fatal(err)
				}
				if s.dial.open() == 0 {
					t.Fatal("no connection open while reading")
				}
				if err := d.Close(); err != nil {
					t.Fatal(err)
				}
			}
			if n := s.dial.open(); n != 0 {
				t.Fatalf("%d connections left open after the disk closed", n)
			}
		})
	}
}
