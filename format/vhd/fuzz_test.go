package vhd_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/format/vhd"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// fuzzSeeds are small images of every kind; TestWriteFuzzCorpus writes
// them to testdata/fuzz/FuzzOpen (VHD_WRITE_CORPUS=1).
func fuzzSeeds(t testing.TB) map[string][]byte {
	st := memfs.New()
	out := map[string][]byte{}
	mk := func(name string, size int64, backing string, opts ...string) {
		d := create(t, st, "/"+name, size, backing, opts...)
		d.WriteAt(bytes.Repeat([]byte{0xa5}, 700), 300)
		d.WriteAt([]byte{1, 2, 3}, d.Size()-5000)
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		b, err := st.ReadFile("/" + name)
		if err != nil {
			t.Fatal(err)
		}
		out[name] = b
	}
	mk("dynamic.vhd", 32<<10, "", "block_size=4K", "force_size=on")
	mk("dynamic512.vhd", 8<<10, "", "block_size=512", "force_size=on")
	mk("dynamic-chs.vhd", 30<<10, "", "block_size=16K")
	mk("fixed.vhd", 6<<10, "", "subformat=fixed", "force_size=on")
	mk("diff.vhd", 0, "dynamic.vhd", "block_size=4K")
	return out
}

func TestWriteFuzzCorpus(t *testing.T) {
	if os.Getenv("VHD_WRITE_CORPUS") == "" {
		// Without the variable: the committed corpus is there and every
		// seed in it is still a valid image.
		disktest.CheckCorpus(t, "vpc")
		return
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzOpen")
	os.MkdirAll(dir, 0o755)
	for name, b := range fuzzSeeds(t) {
		s := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)
		if err := os.WriteFile(filepath.Join(dir, "seed-"+name[:len(name)-4]), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// FuzzOpen: any file opens or fails with ErrCorrupt/ErrUnsupported; an
// opened image can be walked, read, checked, repaired and written without
// a panic.
func FuzzOpen(f *testing.F) {
	for _, b := range qemutest.Seeds(f, "vpc",
		qemutest.Seed{Name: "dynamic", Size: "1M", IO: []string{"write -P 0x11 4k 4k", "write -z 64k 4k"}},
		qemutest.Seed{Name: "empty", Size: "3M"},
		qemutest.Seed{Name: "fixed", Size: "256k", Opts: []string{"subformat=fixed"}, IO: []string{"write -P 0x22 0 1k"}},
		qemutest.Seed{Name: "forced", Size: "1M", Opts: []string{"force_size=on"}},
	) {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 4<<20 {
			return
		}
		st := memfs.New()
		st.WriteFile("/f.vhd", data)
		open := func() (driver.Image, error) {
			return vhd.Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/f.vhd", Options: driver.Values{}})
		}
		im, err := open()
		if err != nil {
			if !errors.Is(err, driver.ErrCorrupt) && !errors.Is(err, driver.ErrUnsupported) {
				t.Fatalf("open: unexpected error %v", err)
			}
			return
		}
		_ = im.Info()
		_ = im.Parent()
		disktest.Walk(t, "vpc", im, 4<<20)
		size := im.Size()
		limit := min(size, 1<<20)
		buf := make([]byte, 8192)
		for off := int64(0); off < limit; {
			e, err := im.Status(off, limit-off)
			if err != nil {
				if !errors.Is(err, driver.ErrCorrupt) {
					t.Fatalf("status: %v", err)
				}
				off += 512
				continue
			}
			if err := driver.CheckExtent("vpc", "/f.vhd", off, limit-off, e); err != nil {
				t.Fatal(err)
			}
			n := min(e.Length, int64(len(buf)))
			if _, err := im.ReadAt(buf[:n], off); err != nil && !errors.Is(err, driver.ErrCorrupt) {
				t.Fatalf("read: %v", err)
			}
			off += e.Length
		}
		c := im.(driver.Checker)
		if _, err := c.Check(ctx, driver.RepairNone); err != nil && !errors.Is(err, driver.ErrCorrupt) {
			t.Fatalf("check: %v", err)
		}
		if im.Info().ClusterSize > 1<<20 || size == 0 {
			im.Close()
			return
		}
		if _, err := c.Check(ctx, driver.RepairAll); err != nil {
			im.Close()
			return
		}
		w := []byte("fuzz")
		for _, off := range []int64{0, size / 2, size - int64(len(w))} {
			if off < 0 {
				continue
			}
			p := w[:min(int64(len(w)), size-off)]
			_, err := im.WriteAt(p, off)
			if fe, ok := driver.AsFill(err); ok {
				// Copy-on-write in a differencing image: what the
				// container does, with a parent of zeros.
				end := off + int64(len(p))
				if fe.Off != off && fe.Off != off/512*512 || fe.Off+fe.Len != end && fe.Off+fe.Len != (end+511)/512*512 {
					t.Fatalf("fill [%d, +%d) for a write of %d at %d", fe.Off, fe.Len, len(p), off)
				}
				ext := make([]byte, fe.Len)
				copy(ext[off-fe.Off:], p)
				if _, err := im.WriteAt(ext, fe.Off); err != nil {
					if _, again := driver.AsFill(err); again {
						t.Fatalf("the filled write asks for a fill again: %v", err)
					}
					continue
				}
			} else if err != nil {
				continue // a block that is still bad
			}
			got := make([]byte, len(p))
			if _, err := im.ReadAt(got, off); err != nil || !bytes.Equal(got, p) {
				t.Fatalf("read back at %d: %q %v", off, got, err)
			}
		}
		if err := im.Close(); err != nil {
			t.Fatalf("close: %v", err)
		}
		im, err = open()
		if err != nil {
			t.Fatalf("reopen after repair and writes: %v", err)
		}
		im.Close()
	})
}
