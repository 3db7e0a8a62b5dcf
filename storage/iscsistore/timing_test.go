package iscsistore_test

import (
	"context"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
)

// TestConvertTiming (VDISK_LONG=1) converts a dense LUN to a local qcow2
// with vdisk and with qemu-img (libiscsi) and logs both times.
func TestConvertTiming(t *testing.T) {
	if os.Getenv("VDISK_LONG") == "" {
		t.Skip("timing run: set VDISK_LONG=1")
	}
	const size = 512 << 20
	tg, file := newTarget(t, size)
	f, err := os.OpenFile(file, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		rand.Read(buf)
		f.WriteAt(buf, off)
	}
	f.Close()
	url := tg.URL(1)
	dir := t.TempDir()
	ctx := context.Background()
	for round := 0; round < 2; round++ {
		start := time.Now()
		out, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "qcow2", url, filepath.Join(dir, "q.qcow2")).CombinedOutput()
		if err != nil {
			t.Fatalf("qemu-img: %v %s", err, out)
		}
		qt := time.Since(start)
		start = time.Now()
		src := openRaw(t, url, &vdisk.OpenOptions{ReadOnly: true})
		dst, err := vdisk.Create(ctx, filepath.Join(dir, "v.qcow2"), &vdisk.CreateOptions{Format: "qcow2", Size: size, Overwrite: true})
		if err != nil {
			t.Fatal(err)
		}
		if err := vdisk.Convert(ctx, dst, src, nil); err != nil {
			t.Fatal(err)
		}
		dst.CloseUnsynced()
		src.Close()
		vt := time.Since(start)
		t.Logf("dense %d MiB LUN to qcow2: qemu-img %v, vdisk %v (%.2fx)", size>>20, qt.Round(time.Millisecond), vt.Round(time.Millisecond), vt.Seconds()/qt.Seconds())
	}
}
