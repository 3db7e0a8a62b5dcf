package vdisk_test

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/memfs"
)

// remoteStore is the storage behind the test scheme "vdtest://": memory,
// counting the bytes read from it, as a network storage's traffic.
var (
	remoteStore = memfs.New()
	remoteRead  atomic.Int64
	remoteEnv   atomic.Pointer[driver.SchemeEnv]
)

func init() {
	driver.RegisterScheme("vdtest", func(_ context.Context, name string, env *driver.SchemeEnv) (driver.Storage, string, error) {
		remoteEnv.Store(env)
		rest, _ := strings.CutPrefix(name, "vdtest://host")
		if rest == "" {
			return nil, "", errors.New("no path")
		}
		return countingStorage{remoteStore}, rest, nil
	})
}

type countingStorage struct{ driver.Storage }

func (s countingStorage) Open(name string, flag driver.OpenFlag) (driver.File, error) {
	f, err := s.Storage.Open(name, flag)
	if err != nil {
		return nil, err
	}
	return countingFile{f}, nil
}

type countingFile struct{ driver.File }

func (f countingFile) ReadAt(p []byte, off int64) (int, error) {
	n, err := f.File.ReadAt(p, off)
	remoteRead.Add(int64(n))
	return n, err
}

// TestSchemeLayers: a name with a registered scheme opens in that
// scheme's storage, as the top and as a recorded parent (trusted only),
// with the caller's dialer, secrets and storage options handed to it; an
// unknown scheme is a clear error.
func TestSchemeLayers(t *testing.T) {
	base := mustCreate(t, remoteStore, "/schemes/base.raw", "raw", 1<<20, "")
	pat := bytes.Repeat([]byte{0x6b}, 256<<10)
	if _, err := base.WriteAt(pat, 0); err != nil {
		t.Fatal(err)
	}
	base.Close()
	dir := t.TempDir()
	top := filepath.Join(dir, "top.qcow2")
	secrets := &driver.SecretMap{}
	d, err := vdisk.Create(ctx, top, &vdisk.CreateOptions{Format: "qcow2", Backing: "vdtest://host/schemes/base.raw", BackingFormat: "raw", Paths: driver.PathTrusted, Secrets: secrets, StorageOptions: map[string]string{"k": "v"}})
	if err != nil {
		t.Fatal(err)
	}
	if env := remoteEnv.Load(); env == nil || env.Secrets != driver.Secrets(secrets) || env.Options["k"] != "v" {
		t.Errorf("the scheme got env %+v", env)
	}
	d.Close()
	if _, err := vdisk.Open(ctx, top, &vdisk.OpenOptions{ReadOnly: true}); !errors.Is(err, vdisk.ErrInvalidOption) {
		t.Fatalf("strict open followed a URL parent: %v", err)
	}
	d, err = vdisk.Open(ctx, top, &vdisk.OpenOptions{ReadOnly: true, Paths: driver.PathTrusted})
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(pat))
	if _, err := d.ReadAt(got, 0); err != nil || !bytes.Equal(got, pat) {
		t.Fatalf("read through a scheme parent: %v", err)
	}
	if ls := d.Layers(); len(ls) != 2 || ls[1].Name != "vdtest://host/schemes/base.raw" {
		t.Errorf("layers %v", ls)
	}
	d.Close()
	if _, err := vdisk.Open(ctx, "nosuch://x/y", &vdisk.OpenOptions{}); !errors.Is(err, vdisk.ErrUnsupported) || !strings.Contains(err.Error(), "no storage handles nosuch://") {
		t.Errorf("unknown scheme: %v", err)
	}
}

// TestCacheLayer: OpenOptions.Cache keeps what is read from the network
// layer in a local VCI file: a second open reads nothing from the source,
// and Prefetch fills a cold cache so reads fetch nothing more.
func TestCacheLayer(t *testing.T) {
	base := mustCreate(t, remoteStore, "/cache/base.raw", "raw", 8<<20, "")
	pat := bytes.Repeat([]byte{0x3d, 0x91}, 2<<20)
	if _, err := base.WriteAt(pat, 2<<20); err != nil {
		t.Fatal(err)
	}
	base.Close()
	dir := t.TempDir()
	top := filepath.Join(dir, "top.qcow2")
	d, err := vdisk.Create(ctx, top, &vdisk.CreateOptions{Format: "qcow2", Backing: "vdtest://host/cache/base.raw", BackingFormat: "raw", Paths: driver.PathTrusted})
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	readAll := func(cacheFile string, prefetch bool) (fetched int64, stats int) {
		t.Helper()
		d, err := vdisk.Open(ctx, top, &vdisk.OpenOptions{ReadOnly: true, Paths: driver.PathTrusted, Cache: cacheFile})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		if prefetch {
			if err := d.Prefetch(ctx, nil); err != nil {
				t.Fatal(err)
			}
		}
		start := remoteRead.Load()
		got := make([]byte, 8<<20)
		if _, err := d.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got[2<<20:6<<20], pat) || !driver.IsZero(got[:2<<20]) || !driver.IsZero(got[6<<20:]) {
			t.Fatal("content read through the cache differs")
		}
		return remoteRead.Load() - start, len(d.CacheStats())
	}
	cache := filepath.Join(dir, "base.vci")
	if n, s := readAll(cache, false); n == 0 || s != 1 {
		t.Fatalf("cold cache: fetched %d bytes, %d caches", n, s)
	}
	if n, _ := readAll(cache, false); n != 0 {
		t.Errorf("warm cache fetched %d bytes", n)
	}
	if n, _ := readAll(filepath.Join(dir, "other.vci"), true); n != 0 {
		t.Errorf("after a prefetch, reads fetched %d bytes", n)
	}
	if n, s := readAll("", false); n == 0 || s != 0 {
		t.Errorf("without a cache: fetched %d bytes, %d caches", n, s)
	}
	// The cache is a local file: a URL is refused before anything opens.
	_, err = vdisk.Open(ctx, top, &vdisk.OpenOptions{ReadOnly: true, Paths: driver.PathTrusted, Cache: "vdtest://host/cache/c.vci"})
	if !errors.Is(err, driver.ErrInvalidOption) || !strings.Contains(err.Error(), "vdtest://host/cache/c.vci") {
		t.Fatalf("a cache named by a URL: %v; want an invalid-option error naming it", err)
	}
}
