package qcow2_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	_ "github.com/vdisk/vdisk/format/qcow2"
	_ "github.com/vdisk/vdisk/format/raw"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
)

var ctx = context.Background()

// rawOf converts an image to raw with qemu-img and returns its content.
func rawOf(t testing.TB, format, file string, extra ...string) []byte {
	t.Helper()
	out := filepath.Join(tempDir(t), "oracle.raw")
	args := append([]string{"convert", "-f", format}, extra...)
	qemutest.Img(t, append(args, "-O", "raw", file, out)...)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// checkStatusAgainstContent verifies that every run reported as zero reads
// zeros and that runs cover the disk.
func checkStatus(t testing.TB, d *vdisk.Disk, content []byte) {
	t.Helper()
	var end int64
	err := d.Map(ctx, 0, d.Size(), func(e vdisk.Extent) error {
		if e.Start != end {
			return fmt.Errorf("gap at %d", end)
		}
		end = e.Start + e.Length
		if !e.IsData() && !bytes.Equal(content[e.Start:end], make([]byte, e.Length)) {
			return fmt.Errorf("run %d+%d reported zero but holds data", e.Start, e.Length)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if end != d.Size() {
		t.Fatalf("map ends at %d of %d", end, d.Size())
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

type qcase struct {
	name  string
	size  string
	opts  []string
	cmds  []string
	setup func(t *testing.T, dir, file string) // runs instead of create+cmds when set
}

// TestReadQemuImages: images written by qemu read bit-exact.
func TestReadQemuImages(t *testing.T) {
	qemutest.Require(t)
	writes := []string{
		"write -P 0xaa 0 64k", "write -P 0x11 100k 3k", "write -P 0x22 1M 1M",
		"write -z 1536k 64k", "write -P 0x33 5M 100k", "discard 5M 64k", "write -z 7M 1M",
		"write -P 0x44 8380416 4096",
	}
	cases := []qcase{
		{name: "v2-64k", size: "8M", opts: []string{"compat=0.10"}, cmds: writes},
		{name: "v3-64k", size: "8M", cmds: writes},
		{name: "v3-512", size: "8M", opts: []string{"cluster_size=512"}, cmds: writes},
		{name: "v3-4k", size: "8M", opts: []string{"cluster_size=4k"}, cmds: writes},
		{name: "v3-2m", size: "9M", opts: []string{"cluster_size=2M"}, cmds: writes},
		{name: "v3-extl2", size: "8M", opts: []string{"extended_l2=on"}, cmds: writes},
		{name: "v3-extl2-32k", size: "8M", opts: []string{"extended_l2=on", "cluster_size=32k"}, cmds: writes},
		{name: "refbits-1", size: "8M", opts: []string{"refcount_bits=1"}, cmds: writes},
		{name: "refbits-2", size: "8M", opts: []string{"refcount_bits=2"}, cmds: writes},
		{name: "refbits-4", size: "8M", opts: []string{"refcount_bits=4"}, cmds: writes},
		{name: "refbits-8", size: "8M", opts: []string{"refcount_bits=8"}, cmds: writes},
		{name: "refbits-32", size: "8M", opts: []string{"refcount_bits=32"}, cmds: writes},
		{name: "refbits-64", size: "8M", opts: []string{"refcount_bits=64", "cluster_size=512"}, cmds: writes},
		{name: "lazy", size: "8M", opts: []string{"lazy_refcounts=on"}, cmds: writes},
		{name: "prealloc-metadata", size: "8M", opts: []string{"preallocation=metadata"}, cmds: writes},
		{name: "prealloc-full", size: "3M", opts: []string{"preallocation=full"}, cmds: []string{"write -P 0x55 100k 200k"}},
		{name: "odd-size", size: "1000001", cmds: []string{"write -P 0x66 999424 512"}},
		{name: "empty", size: "0"},
		{name: "data-file", size: "8M", opts: []string{"data_file=df.raw"}, cmds: writes},
		{name: "data-file-raw", size: "8M", opts: []string{"data_file=dfr.raw", "data_file_raw=on"}, cmds: writes},
		{name: "compressed-zlib", setup: compressedImage("zlib", "")},
		{name: "compressed-zstd", setup: compressedImage("zstd", "")},
		{name: "compressed-zlib-4k", setup: compressedImage("zlib", "cluster_size=4k")},
		{name: "compressed-zstd-2m", setup: compressedImage("zstd", "cluster_size=2M")},
		{name: "compressed-extl2", setup: compressedImage("zlib", "extended_l2=on")},
		{name: "extl2-backing", setup: func(t *testing.T, dir, file string) {
			base := filepath.Join(dir, "base.qcow2")
			qemutest.Create(t, "qcow2", base, "4M")
			qemutest.IO(t, "qcow2", base, "write -P 0x77 0 4M")
			qemutest.Create(t, "qcow2", file, "4M", "extended_l2=on", "backing_file=base.qcow2", "backing_fmt=qcow2")
			qemutest.IO(t, "qcow2", file, "write -P 0x88 4k 2k", "write -P 0x99 70k 1k", "write -z 200k 8k", "write -z 1M 64k", "discard 2M 64k", "write -P 0x12 3M 100k")
		}},
		{name: "chain-raw-base", setup: func(t *testing.T, dir, file string) {
			base := filepath.Join(dir, "base.raw")
			qemutest.Create(t, "raw", base, "2M")
			qemutest.IO(t, "raw", base, "write -P 0x01 0 2M")
			mid := filepath.Join(dir, "mid.qcow2")
			qemutest.Create(t, "qcow2", mid, "3M", "backing_file=base.raw", "backing_fmt=raw")
			qemutest.IO(t, "qcow2", mid, "write -P 0x02 1M 1536k", "write -z 64k 64k")
			qemutest.Create(t, "qcow2", file, "4M", "backing_file=mid.qcow2", "backing_fmt=qcow2", "cluster_size=4k")
			qemutest.IO(t, "qcow2", file, "write -P 0x03 3M 512k", "write -z 1M 4k", "write -P 0x04 5000 3000")
		}},
		{name: "snapshots", setup: func(t *testing.T, dir, file string) {
			qemutest.Create(t, "qcow2", file, "4M")
			qemutest.IO(t, "qcow2", file, "write -P 0x10 0 2M")
			qemutest.Img(t, "snapshot", "-c", "s1", file)
			qemutest.IO(t, "qcow2", file, "write -P 0x20 1M 2M")
			qemutest.Img(t, "snapshot", "-c", "s2", file)
			qemutest.IO(t, "qcow2", file, "write -P 0x30 512k 64k", "discard 0 64k")
		}},
		{name: "dirty-lazy", setup: func(t *testing.T, dir, file string) {
			qemutest.Create(t, "qcow2", file, "4M", "lazy_refcounts=on")
			// abort leaves the image dirty, with refcounts not written.
			qemutest.RunCode("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x5b 2M 64k", "-c", "abort", file)
			info := qemutest.Info(t, "qcow2", file)
			if info["dirty-flag"] != true {
				t.Fatalf("qemu-io abort left no dirty image: %v", info)
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := tempDir(t)
			file := filepath.Join(dir, "img.qcow2")
			if c.setup != nil {
				c.setup(t, dir, file)
			} else {
				var opts []string
				for _, o := range c.opts {
					// qemu resolves data file names against its working
					// directory: give it absolute ones.
					if strings.HasPrefix(o, "data_file=") {
						o = "data_file=" + filepath.Join(dir, strings.TrimPrefix(o, "data_file="))
					}
					opts = append(opts, o)
				}
				qemutest.Create(t, "qcow2", file, c.size, opts...)
				if len(c.cmds) > 0 {
					qemutest.IO(t, "qcow2", file, c.cmds...)
				}
			}
			want := rawOf(t, "qcow2", file, "-U")
			d, err := openRetry(file, &vdisk.OpenOptions{ReadOnly: true, Paths: driver.PathTrusted})
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			if d.Size() != int64(len(want)) {
				t.Fatalf("size %d, qemu says %d", d.Size(), len(want))
			}
			got := disktest.ReadAll(t, d)
			if !bytes.Equal(got, want) {
				i := firstDiff(got, want)
				t.Fatalf("content differs at %d: got %#x want %#x", i, got[i], want[i])
			}
			checkStatus(t, d, got)
			checkMapAgainstQemu(t, d, file)
		})
	}
}

// checkMapAgainstQemu: where qemu-img map reports data in the top image,
// we report data too, and where it reports unallocated, so do we.
func checkMapAgainstQemu(t *testing.T, d *vdisk.Disk, file string) {
	t.Helper()
	out := qemutest.Img(t, "map", "--output", "json", "-U", "-f", "qcow2", file)
	if strings.TrimSpace(out) == "[]" {
		return
	}
	for _, e := range qemutest.Map(t, "qcow2", file) {
		if e.Depth != 0 || !e.Present {
			continue
		}
		for off := e.Start; off < e.Start+e.Length; {
			st, err := d.Status(off, e.Start+e.Length-off)
			if err != nil {
				t.Fatal(err)
			}
			if st.Depth != 0 || !st.Present() {
				t.Fatalf("qemu map says %d+%d is in the top image (%+v), vdisk says %+v", e.Start, e.Length, e, st)
			}
			if e.Data != st.IsData() && !(e.Data && e.Zero) {
				t.Fatalf("qemu map says %d+%d data=%v, vdisk says %+v", e.Start, e.Length, e.Data, st)
			}
			off += st.Length
		}
	}
}

func compressedImage(ctype, extra string) func(t *testing.T, dir, file string) {
	return func(t *testing.T, dir, file string) {
		src := filepath.Join(dir, "src.raw")
		f, err := os.Create(src)
		if err != nil {
			t.Fatal(err)
		}
		// Compressible text, random-ish data, zeros, and a partial tail.
		var b bytes.Buffer
		for i := 0; b.Len() < 3<<20; i++ {
			fmt.Fprintf(&b, "line %d of some compressible text %x\n", i, i*7919)
		}
		f.Write(b.Bytes())
		rnd := make([]byte, 512<<10)
		x := uint32(1)
		for i := range rnd {
			x = x*1664525 + 1013904223
			rnd[i] = byte(x >> 24)
		}
		f.WriteAt(rnd, 4<<20)
		f.WriteAt([]byte("tail"), 6<<20-4)
		f.Truncate(6<<20 + 1000)
		f.Close()
		opts := "compression_type=" + ctype
		if extra != "" {
			opts += "," + extra
		}
		qemutest.Img(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, src, file)
	}
}

func isUnsupported(err error) bool { return errors.Is(err, driver.ErrUnsupported) }

// tempDir is t.TempDir on a memory file system when there is one: the
// tests sync often, and syncs on a loaded disk dominate their run time.
func tempDir(t testing.TB) string {
	t.Helper()
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		if d, err := os.MkdirTemp("/dev/shm", "vdisk-qcow2-test-"); err == nil {
			t.Cleanup(func() { os.RemoveAll(d) })
			return d
		}
	}
	return t.TempDir()
}
