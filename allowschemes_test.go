package vdisk_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

// TestAllowSchemes: under the strict path policy a backing file that is a
// URL is refused with an error naming the image, the field and the name,
// unless OpenOptions.AllowSchemes lists its scheme; local names that climb
// out or are absolute outside the image's directory stay refused whatever
// the list says.
func TestAllowSchemes(t *testing.T) {
	base := mustCreate(t, remoteStore, "/allow/base.raw", "raw", 1<<20, "")
	pat := bytes.Repeat([]byte{0x5c}, 64<<10)
	if _, err := base.WriteAt(pat, 128<<10); err != nil {
		t.Fatal(err)
	}
	base.Close()
	dir := t.TempDir()
	const url = "vdtest://host/allow/base.raw"
	top := filepath.Join(dir, "vm1.qcow2")

	// Create itself follows the caller's URL under Strict only when allowed.
	_, err := vdisk.Create(ctx, top, &vdisk.CreateOptions{Format: "qcow2", Backing: url, BackingFormat: "raw"})
	if !errors.Is(err, vdisk.ErrInvalidOption) || !strings.Contains(err.Error(), url) {
		t.Fatalf("strict create on a URL backing without AllowSchemes: %v", err)
	}
	d, err := vdisk.Create(ctx, top, &vdisk.CreateOptions{Format: "qcow2", Backing: url, BackingFormat: "raw", AllowSchemes: []string{"vdtest"}})
	if err != nil {
		t.Fatal(err)
	}
	d.Close()

	for _, c := range []struct {
		name  string
		allow []string
		ok    bool
	}{
		{"none", nil, false},
		{"other scheme", []string{"nbd", "s3"}, false},
		{"listed", []string{"s3", "vdtest"}, true},
		{"case and space", []string{" VDTest "}, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			d, err := vdisk.Open(ctx, top, &vdisk.OpenOptions{ReadOnly: true, AllowSchemes: c.allow})
			if !c.ok {
				if err == nil {
					d.Close()
					t.Fatal("strict open followed a URL backing file")
				}
				var pe *driver.PathError
				if !errors.Is(err, vdisk.ErrInvalidOption) || !errors.As(err, &pe) || pe.Image != top || pe.Field != "backing file" || pe.Name != url {
					t.Fatalf("refusal %v (%+v)", err, pe)
				}
				for _, want := range []string{top, "backing file", url, "scheme vdtest"} {
					if !strings.Contains(err.Error(), want) {
						t.Errorf("refusal %q does not say %q", err, want)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			if n := len(d.Layers()); n != 2 {
				t.Fatalf("%d layers", n)
			}
			got := make([]byte, 256<<10)
			if _, err := d.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got[128<<10:192<<10], pat) || !driver.IsZero(got[:128<<10]) || !driver.IsZero(got[192<<10:]) {
				t.Fatal("the URL base reads wrong through the overlay")
			}
		})
	}

	// Local names keep the strict rules with a scheme allowed.
	outside := filepath.Join(t.TempDir(), "outside.raw")
	if err := os.WriteFile(outside, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	sub := filepath.Join(dir, "sub")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "up.raw"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ name, image, backing, reason string }{
		{"dotdot", filepath.Join(sub, "dotdot.qcow2"), "../up.raw", "leaves the image's directory"},
		{"absolute", filepath.Join(dir, "abs.qcow2"), outside, "absolute path"},
	} {
		t.Run(c.name, func(t *testing.T) {
			d, err := vdisk.Create(ctx, c.image, &vdisk.CreateOptions{Format: "qcow2", Backing: c.backing, BackingFormat: "raw", Paths: driver.PathTrusted})
			if err != nil {
				t.Fatal(err)
			}
			d.Close()
			d, err = vdisk.Open(ctx, c.image, &vdisk.OpenOptions{ReadOnly: true, AllowSchemes: []string{"vdtest", "file"}})
			if err == nil {
				d.Close()
				t.Fatalf("strict open with AllowSchemes followed %s", c.backing)
			}
			if !errors.Is(err, vdisk.ErrInvalidOption) || !strings.Contains(err.Error(), c.reason) {
				t.Fatalf("refusal %v", err)
			}
		})
	}
}

// closingStore is the storage behind the test scheme "vdclose://": the
// memory of remoteStore, counting how many storages the scheme built and
// how many of them were closed (driver.StorageCloser).
var closingBuilt, closingClosed atomic.Int64

type closingStorage struct {
	driver.Storage
	closed atomic.Bool
}

func (s *closingStorage) CloseStorage() error {
	if !s.closed.Swap(true) {
		closingClosed.Add(1)
	}
	return nil
}

func init() {
	driver.RegisterScheme("vdclose", func(_ context.Context, name string, _ *driver.SchemeEnv) (driver.Storage, string, error) {
		closingBuilt.Add(1)
		return &closingStorage{Storage: remoteStore}, strings.TrimPrefix(name, "vdclose://host"), nil
	})
}

// TestStorageClosed: a storage the container built for a URL name is
// closed when the last image on it closes: after Close of the disk, after
// an open that fails, after Remove, and after a create on it.
func TestStorageClosed(t *testing.T) {
	base := mustCreate(t, remoteStore, "/close/base.raw", "raw", 1<<20, "")
	base.Close()
	dir := t.TempDir()
	top := filepath.Join(dir, "top.qcow2")
	open := func() int64 { return closingBuilt.Load() - closingClosed.Load() }
	for _, c := range []struct {
		name string
		run  func() error
	}{
		{"create overlay", func() error {
			d, err := vdisk.Create(ctx, top, &vdisk.CreateOptions{Format: "qcow2", Backing: "vdclose://host/close/base.raw", BackingFormat: "raw", Paths: driver.PathTrusted})
			if err != nil {
				return err
			}
			return d.Close()
		}},
		{"open chain", func() error {
			d, err := vdisk.Open(ctx, top, &vdisk.OpenOptions{ReadOnly: true, AllowSchemes: []string{"vdclose"}})
			if err != nil {
				return err
			}
			if open() == 0 {
				return errors.New("no storage is open while the disk is")
			}
			return d.Close()
		}},
		{"open top", func() error {
			d, err := vdisk.Open(ctx, "vdclose://host/close/base.raw", &vdisk.OpenOptions{Format: "raw", ReadOnly: true})
			if err != nil {
				return err
			}
			return d.Close()
		}},
		{"failed open", func() error {
			d, err := vdisk.Open(ctx, "vdclose://host/close/base.raw", &vdisk.OpenOptions{Format: "qcow2", ReadOnly: true})
			if err == nil {
				d.Close()
				return errors.New("a raw file opened as qcow2")
			}
			return nil
		}},
		{"create on it", func() error {
			d, err := vdisk.Create(ctx, "vdclose://host/close/new.raw", &vdisk.CreateOptions{Format: "raw", Size: 1 << 20})
			if err != nil {
				return err
			}
			return d.Close()
		}},
		{"remove", func() error {
			return vdisk.Remove(ctx, "vdclose://host/close/new.raw", nil)
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			built := closingBuilt.Load()
			if err := c.run(); err != nil {
				t.Fatal(err)
			}
			if closingBuilt.Load() == built {
				t.Fatal("no storage was built")
			}
			if n := open(); n != 0 {
				t.Fatalf("%d storages left open", n)
			}
		})
	}
}
