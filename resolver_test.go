package vdisk_test

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/memfs"
)

// TestPerLayerStorage puts a base on one storage and its diff on another;
// the resolver picks the storage by the name's scheme.
func TestPerLayerStorage(t *testing.T) {
	remote, local := memfs.New(), memfs.New()
	base := mustCreate(t, remote, "/base.raw", "raw", 1<<20, "")
	pat := bytes.Repeat([]byte{0xa5}, 64<<10)
	if _, err := base.WriteAt(pat, 128<<10); err != nil {
		t.Fatal(err)
	}
	base.Close()
	top, err := vdisk.Create(ctx, "/top.tdf", &vdisk.CreateOptions{Format: "testdiff", Size: 1 << 20, Backing: "mem://remote/base.raw", BackingFormat: "raw", NoBackingOpen: true, Storage: local})
	if err != nil {
		t.Fatal(err)
	}
	top.Close()
	var asked []string
	resolve := func(name string) (driver.Storage, string, error) {
		asked = append(asked, name)
		if rest, ok := strings.CutPrefix(name, "mem://remote/"); ok {
			return remote, "/" + rest, nil
		}
		if strings.Contains(name, "://") {
			return nil, "", errors.New("unknown scheme")
		}
		return local, name, nil
	}
	// Strict: a scheme name is not followed.
	if _, err := vdisk.Open(ctx, "/top.tdf", &vdisk.OpenOptions{Resolver: resolve}); !errors.Is(err, vdisk.ErrInvalidOption) {
		t.Fatalf("strict open followed a URL parent: %v", err)
	}
	d, err := vdisk.Open(ctx, "/top.tdf", &vdisk.OpenOptions{Resolver: resolve, AllowUnsafeBacking: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ls := d.Layers()
	if len(ls) != 2 || ls[1].Name != "mem://remote/base.raw" || ls[1].Storage != remote || ls[0].Storage != local {
		t.Fatalf("layers: %+v", ls)
	}
	// Copy-on-write across storages: a partial write fills from the base.
	if _, err := d.WriteAt([]byte{1, 2, 3}, 130<<10); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 64<<10)
	if _, err := d.ReadAt(got, 128<<10); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(pat)
	copy(want[2<<10:], []byte{1, 2, 3})
	if !bytes.Equal(got, want) {
		t.Fatal("content differs after a write over a base on another storage")
	}
	if len(asked) < 2 {
		t.Fatalf("resolver asked for %v", asked)
	}
}
