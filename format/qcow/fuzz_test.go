package qcow

import (
	"errors"
	"fmt"
	"github.com/vdisk/vdisk/internal/disktest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// qemuSeeds makes small images with qemu: plain, odd-sized, with a
// backing file name, compressed (then partly rewritten), and with a
// second L2 table.
func qemuSeeds(t *testing.T) map[string][]byte {
	qemutest.Require(t)
	dir := t.TempDir()
	out := map[string][]byte{}
	mk := func(name, size string, opts []string, cmds ...string) {
		f := filepath.Join(dir, name+".qcow")
		qemutest.Create(t, "qcow", f, size, opts...)
		if len(cmds) > 0 {
			qemuIO(t, f, cmds...)
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		out[name] = b
	}
	mk("plain", "64k", nil, "write -P 0x11 0 4k", "write -P 0x22 20000 100")
	mk("odd", "5000", nil, "write -P 0x33 4096 512")
	mk("two-tables", "3M", nil, "write -P 0x44 2M 512", "write -P 0x45 0 512")
	qemutest.Create(t, "raw", filepath.Join(dir, "b.raw"), "8k")
	mk("backing", "8k", []string{"backing_file=b.raw", "backing_fmt=raw"}, "write -P 0x55 512 1024")
	src := filepath.Join(dir, "src.raw")
	data := make([]byte, 24<<10)
	for i := range data {
		data[i] = byte(i / 100)
	}
	disktest.WriteFile(t, src, data)
	c := filepath.Join(dir, "c.qcow")
	qemuCompress(t, src, c)
	qemuIO(t, c, "write -P 0x66 4096 512")
	b, err := os.ReadFile(c)
	if err != nil {
		t.Fatal(err)
	}
	out["compressed"] = b
	return out
}

// TestFuzzSeeds keeps testdata/fuzz/FuzzOpen (images qemu made) present;
// QCOW_WRITE_SEEDS=1 rewrites it with qemu.
func TestFuzzSeeds(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzOpen")
	if os.Getenv("QCOW_WRITE_SEEDS") == "" {
		ents, err := os.ReadDir(dir)
		if err != nil || len(ents) < 5 {
			t.Fatalf("seed corpus missing in %s (%v); run with QCOW_WRITE_SEEDS=1", dir, err)
		}
		return
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, b := range qemuSeeds(t) {
		disktest.WriteFile(t, filepath.Join(dir, name), []byte(fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)))
	}
}

// FuzzOpen opens arbitrary bytes as a qcow image: errors must be
// ErrCorrupt or ErrUnsupported, never a panic. An image that opens must
// tile its whole size with status runs, read every run (errors only
// ErrCorrupt), take writes (copy-on-write fills, writes into compressed
// clusters, compressed writes, make-empty) without panicking, and open
// again afterwards. Seeds: images qemu made (testdata/fuzz/FuzzOpen).
func FuzzOpen(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 1<<20 {
			return
		}
		if os.Getenv("QCOW_FUZZ_SLOW") != "" { // report inputs that take long
			start := time.Now()
			defer func() {
				if d := time.Since(start); d > 300*time.Millisecond {
					t.Fatalf("slow input: %v", d)
				}
			}()
		}
		st := memfs.New()
		st.WriteFile("/f.qcow", data)
		img, err := Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/f.qcow", ReadOnly: true})
		if err != nil {
			if !errors.Is(err, driver.ErrCorrupt) && !errors.Is(err, driver.ErrUnsupported) {
				t.Fatalf("open: unexpected error kind: %v", err)
			}
			return
		}
		walk(t, img)
		img.Info()
		img.Parent()
		img.Close()

		img, err = Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/f.qcow"})
		if err != nil {
			t.Fatalf("opens read-only but not read-write: %v", err)
		}
		im := img.(*image)
		if size := img.Size(); size > 0 {
			for _, w := range [][2]int64{{0, 3}, {size - 1, 1}, {size / 2, min(size/2, 5000)}} {
				_, err := img.WriteAt(make([]byte, w[1]), w[0])
				if fe, ok := driver.AsFill(err); ok {
					_, err = img.WriteAt(make([]byte, fe.Len), fe.Off)
				}
				if err != nil && !errors.Is(err, driver.ErrCorrupt) && !errors.Is(err, driver.ErrUnsupported) {
					t.Fatalf("write %v: %v", w, err)
				}
			}
			cs := im.CompressedUnit()
			if size >= 2*cs {
				p := make([]byte, cs)
				copy(p, "compress me compress me compress me")
				im.WriteCompressed(p, cs)
			}
		}
		if err := img.Flush(); err != nil && !errors.Is(err, driver.ErrCorrupt) && !errors.Is(err, driver.ErrUnsupported) {
			t.Fatalf("flush: %v", err)
		}
		walk(t, img)
		im.MakeEmpty()
		if err := img.Close(); err != nil {
			return
		}
		img, err = Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/f.qcow", ReadOnly: true})
		if err != nil {
			t.Fatalf("our own changes left an image that does not open: %v", err)
		}
		walk(t, img)
		img.Close()
	})
}

// walk checks that the status runs tile the whole disk and reads each
// run (all of it for disks up to 16 MiB, the first 64 KiB of each run
// beyond): errors only ErrCorrupt, and an unallocated run reads zeros.
// Disks over 64 MiB (hostile sizes: a few tables repeated over a huge
// disk) are walked for their first 4096 runs only, to bound the time.
func walk(t *testing.T, img driver.Image) {
	size := img.Size()
	whole := size <= 16<<20
	maxRuns := 1 << 16
	if size > 64<<20 {
		maxRuns = 4096
	}
	buf := make([]byte, 64<<10)
	runs := 0
	for off := int64(0); off < size; {
		e, err := img.Status(off, size-off)
		if err != nil {
			if !errors.Is(err, driver.ErrCorrupt) {
				t.Fatalf("status at %d: %v", off, err)
			}
			return
		}
		if err := driver.CheckExtent("qcow", "image", off, size-off, e); err != nil {
			t.Fatal(err)
		}
		if runs++; runs > maxRuns {
			return
		}
		for pos := off; pos < off+e.Length; pos += int64(len(buf)) {
			n := min(off+e.Length-pos, int64(len(buf)))
			if _, err := img.ReadAt(buf[:n], pos); err != nil && !errors.Is(err, driver.ErrCorrupt) {
				t.Fatalf("read at %d: %v", pos, err)
			} else if err == nil && e.State == driver.Unallocated && !driver.IsZero(buf[:n]) {
				t.Fatalf("unallocated run at %d reads data", pos)
			}
			if !whole {
				break
			}
		}
		off += e.Length
	}
}
