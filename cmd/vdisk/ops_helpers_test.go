package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
)

// Helpers of the image-operation tests: chains of the test-only vdtest
// format over a raw base, written through the library, with the expected
// content kept alongside.

const chainSize = 4 << 20

// testChain is base.raw <- mid.vdtest <- top.vdtest in dir.
type testChain struct {
	dir            string
	base, mid, top string
	wantTop        []byte // content of the chain read from top
	wantMid        []byte // from mid
	wantBase       []byte
	topW, midW     map[int64][]byte
	baseW          map[int64][]byte
	topZ           map[int64]int64 // zeroed ranges of top
}

// apply writes w (and zero ranges z) into a copy of b.
func apply(b []byte, w map[int64][]byte, z map[int64]int64) []byte {
	out := bytes.Clone(b)
	for off, p := range w {
		copy(out[off:], p)
	}
	for off, n := range z {
		clear(out[off : off+n])
	}
	return out
}

// writeImage writes into the top image of name (opened read-write with its
// chain) through the library.
func writeImage(t *testing.T, name string, w map[int64][]byte, z map[int64]int64) {
	t.Helper()
	d, err := vdisk.Open(context.Background(), name, &vdisk.OpenOptions{AllowUnsafeBacking: true})
	if err != nil {
		t.Fatal(err)
	}
	for off, p := range w {
		if _, err := d.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
	}
	for off, n := range z {
		if err := d.WriteZeroes(off, n, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
}

func newTestChain(t *testing.T) *testChain {
	t.Helper()
	dir := t.TempDir()
	c := &testChain{
		dir:  dir,
		base: filepath.Join(dir, "base.raw"),
		mid:  filepath.Join(dir, "mid.vdtest"),
		top:  filepath.Join(dir, "top.vdtest"),
		baseW: map[int64][]byte{
			0:       pattern(1, 64<<10),
			1 << 20: pattern(2, 128<<10),
			3 << 20: pattern(3, 64<<10),
		},
		midW: map[int64][]byte{
			64 << 10:            pattern(4, 64<<10),
			1<<20 + 64<<10:      pattern(5, 128<<10),
			3<<20 + 4096:        pattern(6, 4096), // partial cluster: copy on write
			chainSize - 64<<10:  pattern(9, 64<<10),
			2<<20 + 256<<10 + 1: pattern(10, 100),
		},
		topW: map[int64][]byte{
			0:            pattern(7, 4096),
			2 << 20:      pattern(8, 64<<10),
			1<<20 + 8192: pattern(11, 8192),
		},
		// Zeros over data of the layers below.
		topZ: map[int64]int64{3 << 20: 64 << 10},
	}
	sparseRaw(t, c.base, chainSize, c.baseW)
	c.wantBase = apply(make([]byte, chainSize), c.baseW, nil)
	mustRun(t, "create", "-q", "-f", "vdtest", "-b", "base.raw", "-F", "raw", c.mid)
	writeImage(t, c.mid, c.midW, nil)
	c.wantMid = apply(c.wantBase, c.midW, nil)
	mustRun(t, "create", "-q", "-f", "vdtest", "-b", "mid.vdtest", "-F", "vdtest", c.top)
	writeImage(t, c.top, c.topW, c.topZ)
	c.wantTop = apply(c.wantMid, c.topW, c.topZ)
	return c
}

// flatten converts name (its whole chain) to a raw file and returns the
// file's name.
func flatten(t *testing.T, name, out string) string {
	t.Helper()
	mustRun(t, "convert", "-O", "raw", name, out)
	return out
}

// content reads a whole chain through the library.
func content(t *testing.T, name string) []byte {
	t.Helper()
	d, err := vdisk.Open(context.Background(), name, &vdisk.OpenOptions{ReadOnly: true, AllowUnsafeBacking: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	b := make([]byte, d.Size())
	if _, err := d.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// sameContent fails the test unless name's chain reads want.
func sameContent(t *testing.T, name string, want []byte) {
	t.Helper()
	got := content(t, name)
	if len(got) != len(want) {
		t.Fatalf("%s: size %d, want %d", name, len(got), len(want))
	}
	if !bytes.Equal(got, want) {
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("%s: content differs at offset %d (%#x): got %#x, want %#x", filepath.Base(name), i, i, got[i], want[i])
			}
		}
	}
}

// layerNames lists the chain of name, top first.
func layerNames(t *testing.T, name string) []string {
	t.Helper()
	d, err := vdisk.Open(context.Background(), name, &vdisk.OpenOptions{InfoOnly: true, AllowUnsafeBacking: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	var out []string
	for _, l := range d.Layers() {
		out = append(out, filepath.Base(l.Name))
	}
	return out
}

// vdtMetaOf reads the header of a vdtest image.
func vdtMetaOf(t *testing.T, name string) vdtMeta {
	t.Helper()
	f := mustOpenFile(t, name)
	defer f.Close()
	im, err := vdtLoad(f)
	if err != nil {
		t.Fatal(err)
	}
	return im.meta
}

// setVdtMeta changes the header of a vdtest image (fault injection).
func setVdtMeta(t *testing.T, name string, fn func(im *vdtImage)) {
	t.Helper()
	f := mustOpenFile(t, name)
	defer f.Close()
	im, err := vdtLoad(f)
	if err != nil {
		t.Fatal(err)
	}
	fn(im)
	if err := im.writeHeader(); err != nil {
		t.Fatal(err)
	}
}

func fileSize(t *testing.T, name string) int64 {
	t.Helper()
	fi, err := os.Stat(name)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

// linksConsistent fails the test when opening the chain of name warns
// (a child recording a stale parent modification UUID).
func linksConsistent(t *testing.T, name string) {
	t.Helper()
	r := mustRun(t, "info", "--backing-chain", name)
	if r.stderr != "" {
		t.Errorf("opening the chain of %s warns: %s", filepath.Base(name), r.stderr)
	}
}
