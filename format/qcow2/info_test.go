package qcow2_test

import (
	"encoding/json"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// TestInfoMatchesQemu: our format-specific information is qemu-img info's.
func TestInfoMatchesQemu(t *testing.T) {
	qemutest.Require(t)
	dir := tempDir(t)
	for _, c := range []struct {
		name string
		opts []string
		prep func(f string)
	}{
		{"v2", []string{"compat=0.10"}, nil},
		{"v3-lazy", []string{"lazy_refcounts=on", "refcount_bits=8"}, nil},
		{"extl2-zstd", []string{"extended_l2=on", "compression_type=zstd"}, nil},
		{"data-file-raw", []string{"data_file=" + filepath.Join(dir, "d.raw"), "data_file_raw=on"}, nil},
		{"bitmaps", nil, func(f string) {
			qemutest.Img(t, "bitmap", "--add", f, "b0")
			qemutest.Img(t, "bitmap", "--add", "-g", "128k", "--disable", f, "b1")
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := filepath.Join(dir, c.name+".qcow2")
			qemutest.Create(t, "qcow2", f, "1M", c.opts...)
			if c.prep != nil {
				c.prep(f)
			}
			want := qemutest.Info(t, "qcow2", f)["format-specific"].(map[string]any)["data"]
			d, err := openRetry(f, &vdisk.OpenOptions{ReadOnly: true, Paths: driver.PathTrusted})
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			inf := d.Top().Info()
			if inf.Format != "qcow2" || inf.ClusterSize <= 0 || inf.VirtualSize != 1<<20 {
				t.Fatalf("info %+v", inf)
			}
			b, _ := json.Marshal(inf.Specific)
			var got map[string]any
			json.Unmarshal(b, &got)
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("format-specific:\n got  %v\n want %v", got, want)
			}
		})
	}
}

// TestBitmapsPreserved: writing to an image with persistent bitmaps keeps
// them (qemu-img check stays clean), marks enabled ones in use and leaves
// disabled ones alone.
func TestBitmapsPreserved(t *testing.T) {
	qemutest.Require(t)
	dir := tempDir(t)
	f := filepath.Join(dir, "b.qcow2")
	qemutest.Create(t, "qcow2", f, "4M")
	qemutest.IO(t, "qcow2", f, "write -P 1 0 64k")
	qemutest.Img(t, "bitmap", "--add", f, "enabled")
	qemutest.Img(t, "bitmap", "--add", "--disable", f, "disabled")
	qemutest.IO(t, "qcow2", f, "write -P 2 1M 64k")
	d, err := openRetry(f, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.WriteAt(make([]byte, 8192), 2<<20); err != nil {
		t.Fatal(err)
	}
	if err := d.WriteZeroes(0, 64<<10, true); err != nil {
		t.Fatal(err)
	}
	checkClean(t, d)
	d.Close()
	qemutest.Check(t, "qcow2", f)
	info := qemutest.Info(t, "qcow2", f)
	bms := info["format-specific"].(map[string]any)["data"].(map[string]any)["bitmaps"].([]any)
	flags := map[string]string{}
	for _, b := range bms {
		m := b.(map[string]any)
		var fl []string
		for _, x := range m["flags"].([]any) {
			fl = append(fl, x.(string))
		}
		flags[m["name"].(string)] = strings.Join(fl, ",")
	}
	if flags["enabled"] != "in-use,auto" || flags["disabled"] != "" {
		t.Fatalf("bitmap flags after our writes: %v", flags)
	}
}

// TestSetParent rebases the recorded backing file.
func TestSetParent(t *testing.T) {
	qemutest.Require(t)
	dir := tempDir(t)
	qemutest.Create(t, "raw", filepath.Join(dir, "a.raw"), "1M")
	qemutest.Create(t, "raw", filepath.Join(dir, "b.raw"), "1M")
	f := filepath.Join(dir, "t.qcow2")
	qemutest.Create(t, "qcow2", f, "1M", "backing_file=a.raw", "backing_fmt=raw")
	d, err := openRetry(f, &vdisk.OpenOptions{NoBacking: true})
	if err != nil {
		t.Fatal(err)
	}
	rp := topAs[driver.Reparenter](t, d)
	if err := rp.SetParent(&driver.ParentRef{Name: "b.raw", Format: "raw"}); err != nil {
		t.Fatal(err)
	}
	d.Close()
	info := qemutest.Info(t, "qcow2", f)
	if info["backing-filename"] != "b.raw" || info["backing-filename-format"] != "raw" {
		t.Fatalf("after rebase: %v", info)
	}
	d, _ = openRetry(f, &vdisk.OpenOptions{NoBacking: true})
	if err := topAs[driver.Reparenter](t, d).SetParent(nil); err != nil {
		t.Fatal(err)
	}
	d.Close()
	info = qemutest.Info(t, "qcow2", f)
	if _, ok := info["backing-filename"]; ok {
		t.Fatalf("backing file still recorded: %v", info)
	}
	qemutest.Check(t, "qcow2", f)
}
