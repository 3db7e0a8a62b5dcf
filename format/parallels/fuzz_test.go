package parallels

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// tinyImages makes small valid images: 512-byte and 1 KiB clusters, a few
// KiB each, in both magics.
func tinyImages(t testing.TB) map[string][]byte {
	st := memfs.New()
	d := createPrl(t, st, "/ext.hds", 8192, driver.KV{Key: "cluster_size", Value: "512"}, driver.KV{Key: "prealloc-size", Value: "0"})
	disktest.MustWrite(t, d, nil, disktest.Fill(700, 0x11), 300)
	disktest.MustWrite(t, d, nil, disktest.Fill(512, 0x22), 4096)
	disktest.MustWrite(t, d, nil, disktest.Fill(100, 0x23), 7000)
	if err := d.Discard(1024, 512); err != nil {
		t.Fatal(err)
	}
	disktest.MustClose(t, d)
	d = createPrl(t, st, "/1k.hds", 5000, driver.KV{Key: "cluster_size", Value: "1k"}, driver.KV{Key: "prealloc-size", Value: "0"})
	disktest.MustWrite(t, d, nil, disktest.Fill(3000, 0x33), 1000)
	disktest.MustClose(t, d)
	out := map[string][]byte{"old": oldMagicImage(), "extun": unalignedExtImage()}
	for _, n := range []string{"ext", "1k"} {
		b, err := st.ReadFile("/" + n + ".hds")
		if err != nil {
			t.Fatal(err)
		}
		out[n] = b
	}
	return out
}

// TestFuzzSeeds keeps testdata/fuzz/FuzzOpen in step with tinyImages
// (PRL_WRITE_SEEDS=1 rewrites them).
func TestFuzzSeeds(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzOpen")
	if os.Getenv("PRL_WRITE_SEEDS") == "" {
		ents, err := os.ReadDir(dir)
		if err != nil || len(ents) < 3 {
			t.Fatalf("seed corpus missing in %s (%v); run with PRL_WRITE_SEEDS=1", dir, err)
		}
		return
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, b := range tinyImages(t) {
		disktest.WriteFile(t, filepath.Join(dir, name), []byte(fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)))
	}
}

// clearErr reports whether err is one of the errors a hostile image may
// give.
func clearErr(err error) bool {
	return errors.Is(err, driver.ErrCorrupt) || errors.Is(err, driver.ErrUnsupported)
}

// FuzzOpen opens arbitrary bytes as a Parallels image: errors are
// ErrCorrupt or ErrUnsupported, never a panic; an image that opens reads
// its whole size (bounded) with status runs tiling it; read-write it is
// repaired on open, takes writes, discards, zeroes and a grow, and opens
// again checking clean.
func FuzzOpen(f *testing.F) {
	for _, b := range tinyImages(f) {
		f.Add(b)
	}
	for _, b := range qemutest.Seeds(f, "parallels",
		qemutest.Seed{Name: "written", Size: "64k", Opts: []string{"cluster_size=512"}, IO: []string{"write -P 0x11 4k 4k", "write -P 0x12 0 1k"}},
		qemutest.Seed{Name: "empty", Size: "1M", Opts: []string{"cluster_size=1k"}},
		qemutest.Seed{Name: "odd", Size: "10000", Opts: []string{"cluster_size=1536"}, IO: []string{"write -P 0x22 9000 1000"}},
	) {
		f.Add(b)
	}
	f.Fuzz(fuzzOpen)
}

func fuzzOpen(t *testing.T, data []byte) {
	{
		if len(data) > 1<<20 {
			return
		}
		if os.Getenv("PRL_FUZZ_SLOW") != "" { // report inputs that take long
			start := time.Now()
			defer func() {
				if d := time.Since(start); d > 500*time.Millisecond {
					t.Fatalf("slow input: %v", d)
				}
			}()
		}
		st := memfs.New()
		st.WriteFile("/f.hds", data)
		opts := driver.Values{"prealloc-mode": "truncate", "prealloc-size": int64(0)}
		img, err := Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/f.hds", ReadOnly: true, Options: opts})
		if err != nil {
			if !clearErr(err) {
				t.Fatalf("open: unexpected error kind: %v", err)
			}
			return
		}
		readWhole(t, img)
		img.Info()
		if _, err := img.(driver.Checker).Check(ctx, driver.RepairNone); err != nil {
			t.Fatalf("check: %v", err)
		}
		img.Close()

		img, err = Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/f.hds", Options: opts})
		if err != nil {
			t.Fatalf("opens read-only but not read-write (with repair): %v", err)
		}
		res, err := img.(driver.Checker).Check(ctx, driver.RepairNone)
		if err != nil || res.Corruptions != 0 {
			t.Fatalf("not clean after the repair on open: %+v %v %q", res, err, res.Messages)
		}
		size := img.Size()
		if size > 0 {
			img.WriteAt([]byte{1, 2, 3}, 0)
			img.WriteAt([]byte{4}, size-1)
			img.(driver.Discarder).Discard(0, min(size, 1<<20))
			img.(driver.Zeroer).WriteZeroes(size/2, min(size/2, 5000), true)
		}
		img.(driver.Resizer).Resize(ctx, size+4096, "")
		if err := img.Close(); err != nil {
			return
		}
		img, err = Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/f.hds", ReadOnly: true, Options: opts})
		if err != nil {
			t.Fatalf("our own changes left an image that does not open: %v", err)
		}
		readWhole(t, img)
		res, err = img.(driver.Checker).Check(ctx, driver.RepairNone)
		if err != nil || res.Corruptions+res.Leaks != 0 {
			t.Fatalf("our own changes left an unclean image: %+v %v %q", res, err, res.Messages)
		}
		img.Close()
	}
}

// readWhole walks the status runs over the whole disk (they must tile it)
// and reads every byte of disks up to 16 MiB (larger ones within a budget).
func readWhole(t *testing.T, img driver.Image) {
	t.Helper()
	size := img.Size()
	if size > 16<<20 {
		disktest.Walk(t, "parallels", img, 16<<20)
		return
	}
	buf := make([]byte, 64<<10)
	for off := int64(0); off < size; {
		e, err := img.Status(off, size-off)
		if err != nil {
			t.Fatalf("status at %d: %v", off, err)
		}
		if err := driver.CheckExtent("parallels", "fuzz", off, size-off, e); err != nil {
			t.Fatal(err)
		}
		for pos := off; pos < off+e.Length; {
			n := min(off+e.Length-pos, int64(len(buf)))
			if _, err := img.ReadAt(buf[:n], pos); err != nil {
				t.Fatalf("read at %d: %v", pos, err)
			}
			if e.State != driver.Data && !driver.IsZero(buf[:n]) {
				t.Fatalf("run at %d is %v but reads data", off, e.State)
			}
			pos += n
		}
		off += e.Length
	}
}
