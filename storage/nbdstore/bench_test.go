package nbdstore_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// TestConvertTiming (VDISK_LONG=1) converts a 256 MiB allocated export
// served by qemu-nbd to a local qcow2 with vdisk and with qemu-img, and
// logs both times.
func TestConvertTiming(t *testing.T) {
	if os.Getenv("VDISK_LONG") == "" {
		t.Skip("timing run: set VDISK_LONG=1")
	}
	dir := t.TempDir()
	file, _ := sparseQcow2(t, dir, 256<<20, [][2]int64{{0, 256 << 20}})
	for _, mc := range []string{"1", "4"} {
		_, url := qemuNBD(t, "qcow2", file, "-r")
		out := filepath.Join(dir, "vdisk"+mc+".qcow2")
		start := time.Now()
		src := openRaw(t, url, true, &vdisk.OpenOptions{StorageOptions: map[string]string{"multi-conn": mc}})
		dst, err := vdisk.Create(context.Background(), out, &vdisk.CreateOptions{Format: "qcow2", Size: src.Size()})
		if err != nil {
			t.Fatal(err)
		}
		if err := vdisk.Convert(context.Background(), dst, src, nil); err != nil {
			t.Fatal(err)
		}
		dst.Close()
		src.Close()
		t.Logf("vdisk convert, multi-conn=%s: %v", mc, time.Since(start))
		start = time.Now()
		qemutest.Img(t, "convert", "-f", "raw", "-O", "qcow2", url, filepath.Join(dir, "qemu"+mc+".qcow2"))
		t.Logf("qemu-img convert: %v", time.Since(start))
	}
}
