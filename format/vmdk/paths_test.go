package vmdk

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/memfs"
	"github.com/vdisk/vdisk/storage/osfs"
)

// flatDescriptor is a monolithicFlat descriptor with the given extent
// lines.
func flatDescriptor(extents ...string) string {
	return "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n" +
		strings.Join(extents, "\n") + "\n\nddb.virtualHWVersion = \"4\"\nddb.adapterType = \"ide\"\n"
}

func writeFile(t *testing.T, st driver.Storage, name string, b []byte) {
	t.Helper()
	f, err := st.Open(name, driver.ReadWrite|driver.Create|driver.Truncate)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(b, 0); err != nil {
		t.Fatal(err)
	}
	f.Close()
}

// TestExtentPathPolicy: extent names go through OpenReferenced: refused
// under the strict policy (with a *driver.PathError naming descriptor,
// field and name), followed when trusted or with allow_unsafe_extents=on,
// and, for an InfoOnly open, recorded as refused while the image still
// opens for Info.
func TestExtentPathPolicy(t *testing.T) {
	ctx := context.Background()
	st := memfs.New()
	writeFile(t, st, "/out/secret.raw", []byte(strings.Repeat("S", 2048*512)))
	writeFile(t, st, "/img/ok.raw", make([]byte, 2048*512))
	writeFile(t, st, "/img/d.vmdk", []byte(flatDescriptor(
		`RW 2048 FLAT "ok.raw" 0`,
		`RW 2048 FLAT "../out/secret.raw" 0`,
		`RW 2048 FLAT "/out/secret.raw" 0`,
	)))
	opts := func(kv ...driver.KV) driver.Values {
		v, err := driver.ParseOptions("vmdk", Format.OpenOptions, kv)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	p := &driver.OpenParams{Storage: st, Name: "/img/d.vmdk", ReadOnly: true, Options: opts()}
	_, err := open(ctx, p)
	var pe *driver.PathError
	if !errors.As(err, &pe) || pe.Field != "extent file" || pe.Name != "../out/secret.raw" || !strings.Contains(err.Error(), "/img/d.vmdk") {
		t.Fatalf("strict open: %v, want a refusal of ../out/secret.raw", err)
	}
	for _, q := range []*driver.OpenParams{
		{Storage: st, Name: "/img/d.vmdk", ReadOnly: true, Options: opts(), Paths: driver.PathTrusted},
		{Storage: st, Name: "/img/d.vmdk", ReadOnly: true, Options: opts(driver.KV{Key: "allow_unsafe_extents", Value: "on"})},
	} {
		img, err := open(ctx, q)
		if err != nil {
			t.Fatalf("trusted open: %v", err)
		}
		b := make([]byte, 4)
		if _, err := img.ReadAt(b, 2048*512); err != nil || string(b) != "SSSS" {
			t.Errorf("trusted read: %q %v", b, err)
		}
		img.Close()
	}
	refs := &driver.ReferenceLog{}
	img, err := open(ctx, &driver.OpenParams{Storage: st, Name: "/img/d.vmdk", ReadOnly: true, InfoOnly: true, Options: opts(), References: refs})
	if err != nil {
		t.Fatalf("InfoOnly strict open: %v", err)
	}
	defer img.Close()
	if img.Size() != 3*2048*512 {
		t.Errorf("size %d", img.Size())
	}
	got := refs.List()
	if len(got) != 3 || got[0].Refused != "" || got[1].Refused == "" || got[2].Refused == "" {
		t.Fatalf("references %+v: want ok.raw followed and the two others refused", got)
	}
	b := make([]byte, 4)
	if _, err := img.ReadAt(b, 2048*512); !errors.As(err, &pe) {
		t.Errorf("read of a refused extent: %q %v", b, err)
	}

	// A refused sparse extent: its header is never read, the image still
	// opens InfoOnly (vdisk info --untrusted) and reads fail with the
	// refusal.
	writeFile(t, st, "/img/s.vmdk", []byte(flatDescriptor(`RW 2048 SPARSE "../out/secret.raw"`)))
	refs = &driver.ReferenceLog{}
	simg, err := open(ctx, &driver.OpenParams{Storage: st, Name: "/img/s.vmdk", ReadOnly: true, InfoOnly: true, Options: opts(), References: refs})
	if err != nil {
		t.Fatalf("InfoOnly strict open with a refused sparse extent: %v", err)
	}
	defer simg.Close()
	if got := refs.List(); len(got) != 1 || got[0].Refused == "" {
		t.Errorf("references %+v: want the sparse extent refused", got)
	}
	if _, err := simg.ReadAt(b, 0); !errors.As(err, &pe) {
		t.Errorf("read of a refused sparse extent: %v", err)
	}
	simg.Info()
}

// TestExtentBeneath: on the local file system a sparse or flat extent
// reached through a symbolic link leading out, a FIFO or a device is
// refused under the strict policy (the FIFO open must not hang).
func TestExtentBeneath(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "img")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(root, "secret.raw"), make([]byte, 1<<20), 0o644)
	os.Symlink("../secret.raw", filepath.Join(dir, "link.raw"))
	os.Symlink("/dev/zero", filepath.Join(dir, "zero"))
	if err := unix.Mkfifo(filepath.Join(dir, "fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, ext := range []string{"link.raw", "zero", "fifo"} {
		desc := filepath.Join(dir, "d-"+ext+".vmdk")
		os.WriteFile(desc, []byte(flatDescriptor(`RW 2048 FLAT "`+ext+`" 0`)), 0o644)
		done := make(chan error, 1)
		go func() {
			img, err := open(context.Background(), &driver.OpenParams{Storage: osfs.New(), Name: desc, Options: driver.Values{}})
			if err == nil {
				img.Close()
			}
			done <- err
		}()
		select {
		case err := <-done:
			var pe *driver.PathError
			if !errors.As(err, &pe) || !strings.Contains(err.Error(), ext) {
				t.Errorf("%s: %v, want a refusal", ext, err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: the open hangs", ext)
		}
	}
}
