package prealloc_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/prealloc"
	"github.com/vdisk/vdisk/storage/memfs"
)

// noAlloc hides the file's Allocator.
type noAlloc struct{ driver.File }

func TestCheck(t *testing.T) {
	for _, m := range []string{"", "off", "falloc", "full"} {
		if err := prealloc.Check("raw", m, prealloc.Falloc, prealloc.Full); err != nil {
			t.Errorf("%q: %v", m, err)
		}
	}
	err := prealloc.Check("raw", "metadata", prealloc.Falloc, prealloc.Full)
	if !errors.Is(err, driver.ErrInvalidOption) || !containsMsg(err, `invalid preallocation mode "metadata" for raw (off, falloc, full)`) {
		t.Errorf("metadata for raw: %v", err)
	}
	if err := prealloc.Check("", "x", prealloc.Metadata, prealloc.Falloc, prealloc.Full); !containsMsg(err, `invalid preallocation mode "x" (off, metadata, falloc, full)`) {
		t.Errorf("x: %v", err)
	}
	if prealloc.Active("") || prealloc.Active("off") || !prealloc.Active("metadata") {
		t.Error("Active")
	}
}

func containsMsg(err error, msg string) bool {
	return err != nil && strings.Contains(err.Error(), msg)
}

func TestFile(t *testing.T) {
	ctx := context.Background()
	st := memfs.New()
	f, err := st.Open("/f", driver.ReadWrite|driver.Create)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, m := range []string{"", "off", "metadata"} {
		if err := prealloc.File(ctx, f, "/f", m, 0, 1<<20); err != nil {
			t.Fatalf("%q: %v", m, err)
		}
		if sz, _ := f.Size(); sz != 0 {
			t.Fatalf("%q changed the file to %d bytes", m, sz)
		}
	}
	if err := prealloc.File(ctx, f, "/f", "full", 512, 3<<20); err != nil {
		t.Fatal(err)
	}
	if sz, _ := f.Size(); sz != 512+3<<20 {
		t.Fatalf("full: size %d", sz)
	}
	if err := prealloc.File(ctx, f, "/f", "falloc", 0, 8<<20); err != nil {
		t.Fatal(err)
	}
	if sz, _ := f.Size(); sz != 8<<20 {
		t.Fatalf("falloc: size %d", sz)
	}
	if err := prealloc.File(ctx, noAlloc{f}, "/f", "falloc", 0, 512); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("falloc without an Allocator: %v", err)
	}
	if err := prealloc.Usable(noAlloc{f}, "/f", "falloc"); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("Usable: %v", err)
	}
	if err := prealloc.Usable(noAlloc{f}, "/f", "full"); err != nil {
		t.Fatalf("Usable full: %v", err)
	}
	if err := prealloc.File(ctx, f, "/f", "bogus", 0, 512); !errors.Is(err, driver.ErrInvalidOption) {
		t.Fatalf("bogus: %v", err)
	}
}
