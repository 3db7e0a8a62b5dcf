package cache_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/cache"
	"github.com/vdisk/vdisk/storage/memfs"
	"github.com/vdisk/vdisk/storage/osfs"

	_ "github.com/vdisk/vdisk/format/qcow2"
	_ "github.com/vdisk/vdisk/format/raw"
)

// TestQcow2ThroughCache: a qcow2 image made by qemu-img and qemu-io, whose
// storage is wrapped by NewStorage, reads bit-exact (against qemu-img
// convert's raw output); a second open with the warm cache file reads
// nothing from the source.
func TestQcow2ThroughCache(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "base.qcow2")
	qemutest.Create(t, "qcow2", img, "64M")
	qemutest.IO(t, "qcow2", img,
		"write -P 0x11 0 1M",
		"write -P 0x22 5M 64k",
		"write -P 0x33 33M 300k",
		"write -z 40M 1M",
		"write -P 0x44 63M 1M")
	ref := filepath.Join(dir, "ref.raw")
	qemutest.Img(t, "convert", "-O", "raw", img, ref)
	want, err := os.ReadFile(ref)
	if err != nil {
		t.Fatal(err)
	}
	src := &countingStorage{Storage: osfs.New()}
	cacheFile := filepath.Join(dir, "base.vci")
	o := cache.Options{Size: 32 << 20, BlockSize: 64 << 10}
	open := func() (*vdisk.Disk, driver.Storage) {
		st := cache.NewStorage(src, osfs.New(), cacheFile, o)
		d, err := vdisk.Open(context.Background(), img, &vdisk.OpenOptions{ReadOnly: true,
			Resolver: func(name string) (driver.Storage, string, error) { return st, name, nil }})
		if err != nil {
			t.Fatal(err)
		}
		return d, st
	}
	d, _ := open()
	if d.Top().Format.Name != "qcow2" {
		t.Fatalf("opened as %s", d.Top().Format.Name)
	}
	got := disktest.ReadAll(t, d)
	disktest.MustClose(t, d)
	if !bytes.Equal(got, want) {
		t.Fatal("qcow2 read through the cache differs from qemu-img convert")
	}
	fi, _ := os.Stat(img)
	cold := src.bytes.Load()
	// 4 data extents (1M, 64k, 300k, 1M) plus the header, L1, L2 and
	// refcount clusters, each rounded to 64 KiB cache blocks.
	if cold == 0 || cold > 3<<20 {
		t.Fatalf("cold read fetched %d bytes of a %d-byte image", cold, fi.Size())
	}

	src.bytes.Store(0)
	src.reads.Store(0)
	d, _ = open()
	got = disktest.ReadAll(t, d)
	disktest.MustClose(t, d)
	if !bytes.Equal(got, want) {
		t.Fatal("warm read differs")
	}
	if n := src.bytes.Load(); n != 0 {
		t.Fatalf("warm cache: fetched %d bytes in %d reads", n, src.reads.Load())
	}
	t.Logf("qcow2 file %d bytes: cold read fetched %d bytes, warm read 0", fi.Size(), cold)
}

// TestModel runs the reference model (reads, writes, zeroes, discards,
// parallel batches, reopens) on a raw disk whose storage is wrapped by
// NewStorage, with a cache small enough to evict, both in a file and in
// memory.
func TestModel(t *testing.T) {
	for _, name := range []string{"/c.vci", ""} {
		t.Run("cache="+name, func(t *testing.T) {
			const size = 6<<20 + 512
			mem := memfs.New()
			data := make([]byte, size)
			for i := range data {
				data[i] = byte(i * 13)
			}
			mem.WriteFile("/disk.raw", data)
			m := model.New(size)
			m.Write(data, 0)
			st := &recorder{Storage: cache.NewStorage(mem, memfs.New(), name, cache.Options{Size: 4 << 20, BlockSize: 64 << 10})}
			open := func() (*vdisk.Disk, error) {
				return vdisk.Open(context.Background(), "/disk.raw", &vdisk.OpenOptions{Format: "raw",
					Resolver: func(n string) (driver.Storage, string, error) { return st, n, nil }})
			}
			d, err := open()
			if err != nil {
				t.Fatal(err)
			}
			h := &model.Harness{Seed: 5, Ops: 1500, MaxIO: 200 << 10,
				Reopen: func(d *vdisk.Disk) (*vdisk.Disk, error) {
					if err := d.Close(); err != nil {
						return nil, err
					}
					return open()
				}}
			d = h.Run(t, d, m)
			h.Verify(t, d, m)
			disktest.MustClose(t, d)
			var hits, evictions int64
			for _, f := range st.files {
				s := f.Stats()
				hits += s.Hits
				evictions += s.Evictions
			}
			if len(st.files) < 2 || hits == 0 || evictions == 0 {
				t.Fatalf("%d cached opens, %d hits, %d evictions: the cache was not exercised", len(st.files), hits, evictions)
			}
			t.Logf("%d cached opens, %d hits, %d evictions", len(st.files), hits, evictions)
			// The source holds what the model says.
			got, _ := mem.ReadFile("/disk.raw")
			if int64(len(got)) != size || m.Check(got, 0) >= 0 {
				t.Fatal("the source differs from the model")
			}
		})
	}
}

// countingStorage counts what is read from its files (those files are
// not HoleSeekers: a network source that does not know its holes).
type countingStorage struct {
	driver.Storage
	reads, bytes atomic.Int64
}

func (c *countingStorage) Open(name string, flag driver.OpenFlag) (driver.File, error) {
	f, err := c.Storage.Open(name, flag)
	if err != nil {
		return nil, err
	}
	return &countingFile{File: f, c: c}, nil
}

type countingFile struct {
	driver.File
	c *countingStorage
}

func (f *countingFile) ReadAt(p []byte, off int64) (int, error) {
	n, err := f.File.ReadAt(p, off)
	f.c.reads.Add(1)
	f.c.bytes.Add(int64(n))
	return n, err
}

// recorder keeps the cached files its storage opens.
type recorder struct {
	driver.Storage
	mu    sync.Mutex
	files []cache.Cached
}

func (r *recorder) Open(name string, flag driver.OpenFlag) (driver.File, error) {
	f, err := r.Storage.Open(name, flag)
	if c, ok := f.(cache.Cached); ok {
		r.mu.Lock()
		r.files = append(r.files, c)
		r.mu.Unlock()
	}
	return f, err
}
