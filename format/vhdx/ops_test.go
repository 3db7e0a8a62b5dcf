package vhdx

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// TestResize grows dynamic and fixed images (through the log): the old
// data stays, the new range reads zeros, qemu agrees on the size and
// checks the image clean, and qemu-io writes into the new range.
func TestResize(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	for _, sub := range []string{"dynamic", "fixed"} {
		t.Run(sub, func(t *testing.T) {
			f := filepath.Join(dir, sub+".vhdx")
			d := createVHDX(t, nil, f, 10<<20+512, "", disktest.KVs("block_size=1M", "subformat="+sub)...)
			disktest.MustWrite(t, d, nil, disktest.Fill(512, 0x71), 10<<20)
			disktest.MustWrite(t, d, nil, disktest.Fill(4096, 0x72), 0)
			if err := d.Resize(ctx, 50<<20, ""); err != nil {
				t.Fatal(err)
			}
			if d.Size() != 50<<20 {
				t.Fatalf("size %d after resize", d.Size())
			}
			got := disktest.ReadAll(t, d)
			want := make([]byte, 50<<20)
			copy(want[10<<20:], disktest.Fill(512, 0x71))
			copy(want, disktest.Fill(4096, 0x72))
			if !bytes.Equal(got, want) {
				t.Fatal("content after resize")
			}
			disktest.MustClose(t, d)
			qemutest.Check(t, "vhdx", f)
			if got := int64(qemutest.Info(t, "vhdx", f)["virtual-size"].(float64)); got != 50<<20 {
				t.Fatalf("qemu sees %d bytes", got)
			}
			qemutest.IO(t, "vhdx", f, "write -P 0x73 45M 64k")
			copy(want[45<<20:], disktest.Fill(64<<10, 0x73))
			raw := f + ".raw"
			os.WriteFile(raw, want, 0o644)
			if !qemutest.Compare(t, "vhdx", f, "raw", raw) {
				t.Fatal("qemu-img compare after resize")
			}
			// Shrinking drops the data past the new end (the resize
			// command asks for --shrink first).
			d = openVHDX(t, nil, f, false)
			if err := d.Resize(ctx, 1<<20, ""); err != nil {
				t.Fatalf("shrink over data: %v", err)
			}
			disktest.MustClose(t, d)
			qemuAgrees(t, f, want[:1<<20])
		})
	}
}

// TestDiffParent: a differencing image records its parent's data write
// GUID as parent_linkage and its relative path, reports them through
// Parent, Info and Identifier, and refuses a raw parent.
func TestDiffParent(t *testing.T) {
	mem := memfs.New()
	d := createVHDX(t, mem, "/dir/base.vhdx", 4<<20, "", disktest.KVs("block_size=1M")...)
	disktest.MustWrite(t, d, nil, disktest.Fill(1000, 1), 0)
	disktest.MustClose(t, d)
	d = openVHDX(t, mem, "/dir/base.vhdx", true)
	baseMod := topImage(d).ModificationUUID()
	baseID := topImage(d).UUID()
	disktest.MustClose(t, d)
	d = createVHDX(t, mem, "/dir/top.vhdx", 0, "base.vhdx")
	im := topImage(d)
	ref := im.Parent()
	if ref == nil || ref.Name != "base.vhdx" || ref.ModUUID != baseMod || ref.Format != "" {
		t.Fatalf("parent %+v, want base.vhdx with linkage %s", ref, baseMod)
	}
	if im.ParentModificationUUID() != baseMod || im.UUID() == baseID || im.UUID() == "" {
		t.Fatal("identifier")
	}
	sp := im.Info().Specific.(*Specific)
	if !sp.HasParent || sp.Subformat != "differencing" || sp.ParentLinkage != "{"+baseMod+"}" ||
		sp.ParentLocator["relative_path"] != `.\base.vhdx` || sp.ParentLocator["absolute_win32_path"] == "" {
		t.Fatalf("info %+v", sp)
	}
	if len(d.Layers()) != 2 {
		t.Fatal("chain")
	}
	disktest.MustClose(t, d)
	// A raw parent cannot be found again.
	f, _ := mem.Open("/dir/p.raw", driver.ReadWrite|driver.Create)
	f.Truncate(1 << 20)
	f.Close()
	_, err := vdisk.Create(ctx, "/dir/x.vhdx", &vdisk.CreateOptions{Format: "vhdx", Backing: "p.raw", BackingFormat: "raw", Storage: mem})
	if !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("raw parent: %v", err)
	}
}

// TestCreateOptions: invalid option values are refused before anything is
// written.
func TestCreateOptions(t *testing.T) {
	mem := memfs.New()
	for _, o := range []string{"block_size=3M", "block_size=512K", "block_size=512M", "log_size=1536K", "logical_sector_size=1024", "subformat=sparse"} {
		_, err := vdisk.Create(ctx, "/x.vhdx", &vdisk.CreateOptions{Format: "vhdx", Size: 1 << 20, Options: disktest.KVs(o), Storage: mem})
		if !errors.Is(err, driver.ErrInvalidOption) {
			t.Fatalf("%s: %v", o, err)
		}
	}
	if _, err := vdisk.Create(ctx, "/y.vhdx", &vdisk.CreateOptions{Format: "vhdx", Size: 65 << 40, Storage: mem}); !errors.Is(err, driver.ErrInvalidOption) {
		t.Fatalf("65 TiB: %v", err)
	}
}
