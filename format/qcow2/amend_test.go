package qcow2_test

import (
	"bytes"
	"context"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
)

type amender interface {
	Amend(ctx context.Context, opts []driver.KV) error
}

// TestAmend changes options in place and checks the result with qemu.
func TestAmend(t *testing.T) {
	qemutest.Require(t)
	dir := tempDir(t)
	f := filepath.Join(dir, "a.qcow2")
	qemutest.Create(t, "qcow2", f, "4M")
	qemutest.IO(t, "qcow2", f, "write -P 0x11 0 1M", "write -z 2M 128k", "write -P 0x22 3M 64k")
	want := rawOf(t, "qcow2", f)
	steps := [][]string{
		{"lazy_refcounts=on"},
		{"refcount_bits=4"},
		{"refcount_bits=64"},
		{"lazy_refcounts=off", "refcount_bits=16"},
		{"compat=0.10"},
		{"compat=1.1"},
	}
	for _, s := range steps {
		d, err := openRetry(f, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := topAs[amender](t, d).Amend(ctx, disktest.KVs(s...)); err != nil {
			t.Fatalf("amend %v: %v", s, err)
		}
		checkClean(t, d)
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		qemutest.Check(t, "qcow2", f)
		if got := rawOf(t, "qcow2", f); !bytes.Equal(got, want) {
			t.Fatalf("amend %v changed the content at %d", s, firstDiff(got, want))
		}
	}
	info := qemutest.Info(t, "qcow2", f)["format-specific"].(map[string]any)["data"].(map[string]any)
	if info["compat"] != "1.1" || info["refcount-bits"] != float64(16) {
		t.Fatalf("after amends: %v", info)
	}
	d, _ := openRetry(f, nil)
	defer d.Close()
	if err := topAs[amender](t, d).Amend(ctx, disktest.KVs("cluster_size=4k")); err == nil {
		t.Fatal("changing the cluster size was accepted")
	}
}
