package vdisk_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

// TestStableFileRun: only plain data of a raw layer, whole in one run, is
// offered for sending from its file: not holes, not ranges that cross
// into one or reach past the file's end, not a qcow2 layer's clusters
// (qcow2 reuses space), and a raw base under a qcow2 overlay only where
// the overlay holds nothing.
func TestStableFileRun(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	f, err := os.Create(base)
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 2<<20)
	for i := range data {
		data[i] = byte(i*7 + 1)
	}
	// Data in [0, 2 MiB), a hole in [2, 4 MiB), data to the file's end
	// at 6 MiB - 100 (the disk is 6 MiB: sector rounding).
	f.WriteAt(data, 0)
	f.WriteAt(data[:2<<20-100], 4<<20)
	f.Close()

	d, err := vdisk.Open(ctx, base, &vdisk.OpenOptions{Format: "raw", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	for _, c := range []struct {
		off, n int64
		ok     bool
	}{
		{0, 2 << 20, true},
		{4096, 100000, true},
		{1 << 20, 2 << 20, false},    // into the hole
		{2 << 20, 64 << 10, false},   // the hole
		{4 << 20, 2<<20 - 100, true}, // up to the file's end
		{4 << 20, 2 << 20, false},    // past it (sector rounding)
		{0, 0, false},
	} {
		file, foff, ok, err := d.StableFileRun(c.off, c.n)
		if err != nil || ok != c.ok {
			t.Fatalf("raw [%d, +%d): ok %v, %v; want %v", c.off, c.n, ok, err, c.ok)
		}
		if ok {
			if _, sends := file.(driver.FileSender); !sends || foff != c.off {
				t.Fatalf("raw [%d, +%d): file %T at %d", c.off, c.n, file, foff)
			}
		}
	}
	if _, _, _, err := d.StableFileRun(6<<20-512, 1024); err == nil {
		t.Fatal("a range past the disk's end was accepted")
	}

	// A qcow2 overlay: its own clusters are never offered, the base's are
	// where the overlay holds nothing.
	top := filepath.Join(dir, "top.qcow2")
	o, err := vdisk.Create(ctx, top, &vdisk.CreateOptions{Format: "qcow2", Backing: base, BackingFormat: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := o.WriteAt(data[:64<<10], 1<<20); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		off, n int64
		ok     bool
	}{
		{0, 1 << 20, true},
		{1 << 20, 64 << 10, false},
		{512 << 10, 1 << 20, false},
		{1<<20 + 64<<10, 512 << 10, true},
	} {
		if _, _, ok, err := o.StableFileRun(c.off, c.n); err != nil || ok != c.ok {
			t.Fatalf("overlay [%d, +%d): ok %v, %v; want %v", c.off, c.n, ok, err, c.ok)
		}
	}
	o.Close()
	q, err := vdisk.Create(ctx, filepath.Join(dir, "q.qcow2"), &vdisk.CreateOptions{Format: "qcow2", Size: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	q.WriteAt(data[:1<<20], 0)
	if _, _, ok, err := q.StableFileRun(0, 1<<20); err != nil || ok {
		t.Fatalf("qcow2 data offered: %v, %v", ok, err)
	}
}
