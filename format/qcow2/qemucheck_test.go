package qcow2_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"maps"
	"time"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// writeCases are the layouts whose images we write and qemu checks.
var writeCases = []struct {
	name string
	opts []string
	size int64
}{
	{"v2", []string{"compat=0.10"}, 16 << 20},
	{"v3", nil, 16 << 20},
	{"v3-512", []string{"cluster_size=512"}, 2 << 20},
	{"v3-4k-refbits1", []string{"cluster_size=4k", "refcount_bits=1"}, 8 << 20},
	// Refcount blocks of 64 clusters and tables of 64 blocks: the refcount
	// table grows (moves) several times.
	{"v3-512-refbits64", []string{"refcount_bits=64", "cluster_size=512"}, 6 << 20},
	{"v3-2m", []string{"cluster_size=2M"}, 12 << 20},
	{"extl2", []string{"extended_l2=on"}, 16 << 20},
	{"lazy", []string{"lazy_refcounts=on"}, 16 << 20},
	{"zstd", []string{"compression_type=zstd"}, 8 << 20},
	{"prealloc-metadata", []string{"preallocation=metadata"}, 8 << 20},
	{"prealloc-full", []string{"preallocation=full", "cluster_size=16k"}, 4 << 20},
	{"data-file", []string{"data_file=DIR/data.raw"}, 8 << 20},
	{"data-file-raw", []string{"data_file=DIR/dataraw.raw", "data_file_raw=on"}, 8 << 20},
}

// TestWritesPassQemuCheck: every image we write passes qemu-img check with
// no errors and no leaks and compares equal to the model's content.
func TestWritesPassQemuCheck(t *testing.T) {
	qemutest.Require(t)
	for _, c := range writeCases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := tempDir(t)
			img := filepath.Join(dir, "img.qcow2")
			var opts []string
			for _, o := range c.opts {
				opts = append(opts, strings.ReplaceAll(o, "DIR", dir))
			}
			d, err := vdisk.Create(ctx, img, &vdisk.CreateOptions{Format: "qcow2", Size: c.size, Options: disktest.KVs(opts...)})
			if err != nil {
				t.Fatal(err)
			}
			m := model.New(c.size)
			reopens := 0
			h := &model.Harness{Seed: 11, Ops: 500, MaxIO: 160 << 10,
				Reopen: func(d *vdisk.Disk) (*vdisk.Disk, error) {
					if err := d.Close(); err != nil {
						return nil, err
					}
					if reopens++; reopens <= 3 {
						qemutest.Check(t, "qcow2", img)
					}
					// The data file is named absolutely: trusted.
					return openRetry(img, &vdisk.OpenOptions{Paths: driver.PathTrusted})
				}}
			d = h.Run(t, d, m)
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			qemutest.Check(t, "qcow2", img)
			ref := filepath.Join(dir, "ref.raw")
			if err := os.WriteFile(ref, m.Data, 0o644); err != nil {
				t.Fatal(err)
			}
			if !qemutest.Compare(t, "qcow2", img, "raw", ref) {
				t.Fatal("qemu-img compare: the image differs from the model")
			}
		})
	}
}

// openRetry opens an image, retrying while a lock is held: a qemu process
// forked by a parallel test may briefly hold a copy of our file descriptor
// (and so its flock) between fork and exec.
func openRetry(name string, o *vdisk.OpenOptions) (*vdisk.Disk, error) {
	for i := 0; ; i++ {
		d, err := vdisk.Open(ctx, name, o)
		if err == nil || !errors.Is(err, driver.ErrBusy) || i >= 50 {
			return d, err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// topAs returns the top image of d as T (an optional driver interface),
// failing the test when it is not one.
func topAs[T any](t testing.TB, d *vdisk.Disk) T {
	t.Helper()
	v, ok := vdisk.As[T](d.Top())
	if !ok {
		t.Fatalf("the top image is not a %v", reflect.TypeFor[T]())
	}
	return v
}

// TestRefcountTableGrowth fills an image whose refcount table must move
// several times and checks it with qemu.
func TestRefcountTableGrowth(t *testing.T) {
	qemutest.Require(t)
	dir := tempDir(t)
	img := filepath.Join(dir, "g.qcow2")
	const size = 6 << 20
	d, err := vdisk.Create(ctx, img, &vdisk.CreateOptions{Format: "qcow2", Size: size, Options: disktest.KVs("cluster_size=512", "refcount_bits=64")})
	if err != nil {
		t.Fatal(err)
	}
	data := compressibleData(size)
	for off := 0; off < size; off += 256 << 10 {
		if _, err := d.WriteAt(data[off:off+256<<10], int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	checkClean(t, d)
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	r := loadRaw(t, img)
	if n := r.u32(56); n < 4 {
		t.Fatalf("refcount table has %d clusters; the test did not make it grow", n)
	}
	qemutest.Check(t, "qcow2", img)
	ref := filepath.Join(dir, "ref.raw")
	os.WriteFile(ref, data, 0o644)
	if !qemutest.Compare(t, "qcow2", img, "raw", ref) {
		t.Fatal("content differs")
	}
}

// TestCreateOverExistingFile: creating over an existing file leaves none
// of its bytes in the new image.
func TestCreateOverExistingFile(t *testing.T) {
	qemutest.Require(t)
	dir := tempDir(t)
	img := filepath.Join(dir, "o.qcow2")
	garbage := make([]byte, 3<<20)
	for i := range garbage {
		garbage[i] = byte(i*7 + 1)
	}
	if err := os.WriteFile(img, garbage, 0o644); err != nil {
		t.Fatal(err)
	}
	d, err := vdisk.Create(ctx, img, &vdisk.CreateOptions{Format: "qcow2", Size: 2 << 20, Overwrite: true, Options: disktest.KVs("cluster_size=512")})
	if err != nil {
		t.Fatal(err)
	}
	if got := disktest.ReadAll(t, d); !driver.IsZero(got) {
		t.Fatal("a new image over an old file does not read zeros")
	}
	d.Close()
	qemutest.Check(t, "qcow2", img)
	if fi, _ := os.Stat(img); fi.Size() >= 3<<20 {
		t.Fatalf("the old file's tail survived (%d bytes)", fi.Size())
	}
}

// TestCommitEmptiesTop commits qemu-made qcow2 chains into their backing
// file: the chain reads as before, the top holds no cluster afterwards
// (qemu-img map reports everything at depth >= 1), its host clusters are
// freed and both images pass qemu-img check.
func TestCommitEmptiesTop(t *testing.T) {
	qemutest.Require(t)
	for _, tc := range []struct {
		name string
		opts []string
	}{
		{"v3", nil},
		{"v2", []string{"compat=0.10"}},
		{"extl2", []string{"extended_l2=on"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := tempDir(t)
			base := filepath.Join(dir, "base.qcow2")
			top := filepath.Join(dir, "top.qcow2")
			qemutest.Create(t, "qcow2", base, "4M", tc.opts...)
			qemutest.IO(t, "qcow2", base, "write -P 0x11 0 2M")
			qemutest.Create(t, "qcow2", top, "4M", append([]string{"backing_file=base.qcow2", "backing_fmt=qcow2"}, tc.opts...)...)
			qemutest.IO(t, "qcow2", top, "write -P 0x22 64k 192k", "write -P 0x33 1M 1M", "write -z 3M 64k", "write -P 0x44 3200k 4k")
			want := filepath.Join(dir, "want.raw")
			qemutest.Img(t, "convert", "-O", "raw", top, want)
			if err := vdisk.Commit(ctx, top, &vdisk.CommitOptions{Base: 1}); err != nil {
				t.Fatal(err)
			}
			qemutest.Check(t, "qcow2", base)
			qemutest.Check(t, "qcow2", top)
			if !qemutest.Compare(t, "qcow2", top, "raw", want) || !qemutest.Compare(t, "qcow2", base, "raw", want) {
				t.Fatal("content changed by the commit")
			}
			for _, e := range qemutest.Map(t, "qcow2", top) {
				if e.Depth == 0 && (e.Data || e.Zero && e.Present) {
					t.Errorf("top still holds %+v after the commit", e)
				}
			}
			if r := qemutest.Check(t, "qcow2", top); r.AllocatedClusters != 0 {
				t.Errorf("top still has %d allocated clusters", r.AllocatedClusters)
			}
		})
	}
}

// TestMeasureBitmapsMatchesQemu measures qemu-made images with persistent
// bitmaps (and one without) as qcow2 targets of several layouts: every
// figure, bitmaps included, equals qemu-img measure's.
func TestMeasureBitmapsMatchesQemu(t *testing.T) {
	qemutest.Require(t)
	dir := tempDir(t)
	plain := filepath.Join(dir, "plain.qcow2")
	bm := filepath.Join(dir, "bm.qcow2")
	qemutest.Create(t, "qcow2", plain, "100M")
	qemutest.Create(t, "qcow2", bm, "300M")
	qemutest.IO(t, "qcow2", bm, "write -P 0x5a 1M 3M")
	qemutest.Img(t, "bitmap", "--add", "-g", "64k", bm, "b1")
	qemutest.Img(t, "bitmap", "--add", "-g", "512", bm, "a-much-longer-bitmap-name-for-the-directory")
	qemutest.Img(t, "bitmap", "--add", "--disable", "-g", "2M", bm, "off")
	for _, img := range []string{plain, bm} {
		for _, opts := range []string{"cluster_size=64k", "cluster_size=4k", "cluster_size=2M", "compat=0.10", "cluster_size=512,refcount_bits=64"} {
			out := qemutest.Img(t, "measure", "--output", "json", "-O", "qcow2", "-o", opts, img)
			var want, got map[string]int64
			if err := json.Unmarshal([]byte(out), &want); err != nil {
				t.Fatal(err)
			}
			d, err := vdisk.Open(ctx, img, &vdisk.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			kvs, _ := driver.SplitOptions(opts)
			res, err := vdisk.Measure(ctx, "qcow2", &vdisk.MeasureOptions{Options: kvs, Source: d})
			d.Close()
			if err != nil {
				t.Fatal(err)
			}
			b, _ := json.Marshal(res)
			json.Unmarshal(b, &got)
			if !maps.Equal(got, want) {
				t.Errorf("%s -o %s: got %v, qemu-img says %v", filepath.Base(img), opts, got, want)
			}
		}
	}
}

// TestFreshClusterWrites: small writes into new clusters at the end of the
// file write only their data (the file grows over the whole cluster, the
// rest reads zeros); over a backing file the rest is copied as before.
func TestFreshClusterWrites(t *testing.T) {
	qemutest.Require(t)
	dir := tempDir(t)
	base := filepath.Join(dir, "base.qcow2")
	qemutest.Create(t, "qcow2", base, "4M")
	qemutest.IO(t, "qcow2", base, "write -P 0x5b 0 4M")
	for _, tc := range []struct {
		name    string
		opts    []string
		backing bool
	}{
		{"plain", nil, false},
		{"extl2", []string{"extended_l2=on"}, false},
		{"backing", nil, true},
		{"backing-extl2", []string{"extended_l2=on"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := filepath.Join(dir, tc.name+".qcow2")
			co := &vdisk.CreateOptions{Format: "qcow2", Size: 4 << 20, Options: disktest.KVs(tc.opts...)}
			if tc.backing {
				co.Backing, co.BackingFormat = "base.qcow2", "qcow2"
			}
			d, err := vdisk.Create(ctx, img, co)
			if err != nil {
				t.Fatal(err)
			}
			want := make([]byte, 4<<20)
			if tc.backing {
				for i := range want {
					want[i] = 0x5b
				}
			}
			for i, off := range []int64{3 << 20, 100 << 10, 2<<20 + 7000, 65536 - 512} {
				p := bytes.Repeat([]byte{byte(0xa0 + i)}, 4096)
				if _, err := d.WriteAt(p, off); err != nil {
					t.Fatal(err)
				}
				copy(want[off:], p)
			}
			if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
				t.Fatal("content differs before close")
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			fi, err := os.Stat(img)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Size()%(64<<10) != 0 {
				t.Errorf("file size %d does not end on a cluster boundary", fi.Size())
			}
			qemutest.Check(t, "qcow2", img)
			raw := filepath.Join(dir, tc.name+".raw")
			if err := os.WriteFile(raw, want, 0o644); err != nil {
				t.Fatal(err)
			}
			if !qemutest.Compare(t, "qcow2", img, "raw", raw) {
				t.Fatal("qemu-img compare: content differs")
			}
		})
	}
}
