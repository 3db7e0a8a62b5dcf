package qed

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// qemuSeeds makes small images with qemu-img and qemu-io (4 KiB
// clusters): empty, written (data, zero clusters, partial clusters), a
// diff image over a raw file (no-probe), and a written one with the
// need-check flag and a leaked cluster.
func qemuSeeds(t testing.TB) map[string][]byte {
	qemutest.Require(t)
	dir := t.TempDir()
	out := map[string][]byte{}
	mk := func(name string, create []string, cmds ...string) {
		f := filepath.Join(dir, name+".qed")
		qemutest.Img(t, append(append([]string{"create", "-q", "-f", "qed"}, create...), f)...)
		if len(cmds) > 0 {
			// abort leaves the image as a crash would; qemu-io then exits
			// by a signal, so its status is not checked.
			args := []string{"-f", "qed"}
			for _, c := range cmds {
				args = append(args, "-c", c)
			}
			qemutest.RunCode("qemu-io", append(args, f)...)
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		out[name] = b
	}
	f := filepath.Join(dir, "qemu-empty.qed")
	qemutest.Create(t, "qed", f, "64k", "cluster_size=4k", "table_size=2")
	b, _ := os.ReadFile(f)
	out["qemu-empty"] = b
	f = filepath.Join(dir, "qemu-written.qed")
	qemutest.Create(t, "qed", f, "80k", "cluster_size=4k", "table_size=2")
	qemutest.IO(t, "qed", f, "write -P 0x11 1000 5000", "write -z 16k 8k", "write -P 0x22 40k 4k", "write -z 60k 1000")
	b, _ = os.ReadFile(f)
	out["qemu-written"] = b
	raw := filepath.Join(dir, "base.raw")
	disktest.WriteFile(t, raw, make([]byte, 64<<10))
	mk("qemu-diff-raw", []string{"-o", "cluster_size=4k,table_size=2", "-b", "base.raw", "-F", "raw"}, "write -P 0x33 4k 4k")
	// qemu clears the need-check flag when its requests drain, so even an
	// aborted qemu-io leaves a clean image: set the flag by hand on a
	// written image and leave a leaked cluster, as a crash would.
	mk("qemu-needcheck", []string{"-o", "cluster_size=4k,table_size=2", "-b", "base.raw", "-F", "raw"}, "write -P 0x44 8k 12k")
	nc := append(out["qemu-needcheck"], make([]byte, 4096)...)
	nc[16] |= featNeedCheck
	out["qemu-needcheck"] = nc
	return out
}

// TestFuzzSeeds keeps testdata/fuzz/FuzzOpen in step with qemuSeeds
// (QED_WRITE_SEEDS=1 rewrites them) and checks the need-check seed has
// the flag qemu left.
func TestFuzzSeeds(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzOpen")
	if os.Getenv("QED_WRITE_SEEDS") != "" {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for name, b := range qemuSeeds(t) {
			disktest.WriteFile(t, filepath.Join(dir, name), []byte(fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)))
		}
	}
	seeds := readSeeds(t)
	if len(seeds) < 4 {
		t.Fatalf("seed corpus missing in %s; run with QED_WRITE_SEEDS=1", dir)
	}
	if b := seeds["qemu-needcheck"]; len(b) < headerLen || b[16]&featNeedCheck == 0 {
		t.Fatal("the need-check seed has no need-check flag")
	}
}

// readSeeds reads testdata/fuzz/FuzzOpen.
func readSeeds(t testing.TB) map[string][]byte {
	dir := filepath.Join("testdata", "fuzz", "FuzzOpen")
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]byte{}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		s := strings.TrimSuffix(strings.TrimPrefix(string(b), "go test fuzz v1\n[]byte("), ")\n")
		u, err := strconv.Unquote(s)
		if err != nil {
			t.Fatalf("seed %s: %v", e.Name(), err)
		}
		out[e.Name()] = []byte(u)
	}
	return out
}

// TestMutatedSeeds runs the fuzz body over deterministic mutations of the
// seeds (header fields set to powers of two, all ones, random bytes in
// the header and anywhere), so hostile variants run in every test run,
// not only when fuzzing.
func TestMutatedSeeds(t *testing.T) {
	var seeds [][]byte
	for _, b := range readSeeds(t) {
		seeds = append(seeds, b)
	}
	for _, b := range ownSeeds(t) {
		seeds = append(seeds, b)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for range 1000 {
		b := bytes.Clone(seeds[rng.IntN(len(seeds))])
		for k := rng.IntN(4) + 1; k > 0; k-- {
			p := rng.IntN(64)
			if rng.IntN(2) == 0 {
				p = rng.IntN(len(b))
			}
			switch rng.IntN(3) {
			case 0:
				b[p] = byte(rng.Uint32())
			case 1:
				p &^= 7
				v := uint64(1) << rng.IntN(64)
				for j := 0; j < 8 && p+j < len(b); j++ {
					b[p+j] = byte(v >> (8 * j))
				}
			case 2:
				p &^= 3
				for j := 0; j < 4 && p+j < len(b); j++ {
					b[p+j] = 0xff
				}
			}
		}
		fuzzBody(t, b)
	}
}

// ownSeeds are small images vdisk makes (no qemu needed).
func ownSeeds(t testing.TB) map[string][]byte {
	st := memfs.New()
	d := createQED(t, st, "/a.qed", 40<<10, "", "", disktest.KVs("cluster_size=4k", "table_size=1")...)
	disktest.MustWrite(t, d, nil, disktest.Fill(6000, 0x55), 3000)
	if err := d.WriteZeroes(20<<10, 8<<10, true); err != nil {
		t.Fatal(err)
	}
	disktest.MustClose(t, d)
	d = createQED(t, st, "/b.qed", 0, "a.qed", "", disktest.KVs("cluster_size=4k", "table_size=1")...)
	disktest.MustWrite(t, d, nil, disktest.Fill(100, 0x66), 9000)
	disktest.MustClose(t, d)
	out := map[string][]byte{}
	for _, n := range []string{"a", "b"} {
		b, err := st.ReadFile("/" + n + ".qed")
		if err != nil {
			t.Fatal(err)
		}
		out[n] = b
	}
	return out
}

// FuzzOpen opens arbitrary bytes as a QED image: errors must be
// ErrCorrupt or ErrUnsupported, never a panic. An image that opens has
// status runs that tile the disk, and reads its whole size without error
// unless check finds corruption; after a read-write open and a repair it
// reads without error, takes writes, and opens again.
func FuzzOpen(f *testing.F) {
	for _, b := range ownSeeds(f) {
		f.Add(b)
	}
	f.Fuzz(fuzzBody)
}

func fuzzBody(t *testing.T, data []byte) {
	{
		if len(data) > 1<<20 {
			return
		}
		st := memfs.New()
		st.WriteFile("/f.qed", data)
		img, err := Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/f.qed", ReadOnly: true})
		if err != nil {
			if !errors.Is(err, driver.ErrCorrupt) && !errors.Is(err, driver.ErrUnsupported) {
				t.Fatalf("open: unexpected error kind: %v", err)
			}
			return
		}
		img.Info()
		img.Parent()
		res, err := img.(driver.Checker).Check(ctx, driver.RepairNone)
		if err != nil {
			t.Fatalf("check: %v", err)
		}
		if err := walk(img); err != nil && (res.Corruptions == 0 || !errors.Is(err, driver.ErrCorrupt)) {
			t.Fatalf("an image that checks %+v does not read: %v", res, err)
		}
		img.Close()

		img, err = Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/f.qed"})
		if err != nil {
			t.Fatalf("opens read-only but not read-write: %v", err)
		}
		res, err = img.(driver.Checker).Check(ctx, driver.RepairAll)
		if err != nil {
			t.Fatalf("repair: %v", err)
		}
		if res.Corruptions != 0 {
			t.Fatalf("repair left corruptions: %+v", res)
		}
		if err := walk(img); err != nil {
			t.Fatalf("the repaired image does not read: %v", err)
		}
		if size := img.Size(); size > 0 {
			for _, err := range []error{
				ignoreFill(img.WriteAt([]byte{1, 2, 3}, 0)),
				ignoreFill(img.WriteAt([]byte{4}, size-1)),
				img.(driver.Discarder).Discard(0, min(size, 1<<20)),
				ignoreFill(0, img.(driver.Zeroer).WriteZeroes(size/2, min(size/2, 5000), true)),
			} {
				if err != nil {
					t.Fatalf("write to the repaired image: %v", err)
				}
			}
		}
		img.(driver.Resizer).Resize(ctx, img.Size()+4096, "")
		if err := img.Flush(); err != nil {
			t.Fatalf("flush: %v", err)
		}
		if res, err := img.(driver.Checker).Check(ctx, driver.RepairNone); err != nil || res.Corruptions != 0 {
			t.Fatalf("check after our writes: %+v %v", res, err)
		}
		if err := img.Close(); err != nil {
			t.Fatalf("close: %v", err)
		}
		img, err = Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/f.qed", ReadOnly: true})
		if err != nil {
			t.Fatalf("our own changes left an image that does not open: %v", err)
		}
		if err := walk(img); err != nil {
			t.Fatalf("our own changes left an image that does not read: %v", err)
		}
		img.Close()
	}
}

// ignoreFill drops a FillError (the driver alone cannot fill from a
// backing file).
func ignoreFill(_ int, err error) error {
	if _, ok := driver.AsFill(err); ok {
		return nil
	}
	return err
}

// walk checks that the status runs tile the disk and reads the data runs
// (whole, up to a budget; then their first bytes).
func walk(img driver.Image) error {
	size := img.Size()
	buf := make([]byte, 64<<10)
	budget := int64(16 << 20)
	for off := int64(0); off < size; {
		e, err := img.Status(off, size-off)
		if err != nil {
			return err
		}
		if err := driver.CheckExtent("qed", "image", off, size-off, e); err != nil {
			return err
		}
		if e.State == driver.Data {
			for pos := off; pos < off+e.Length; {
				n := min(off+e.Length-pos, int64(len(buf)))
				if budget <= 0 {
					n = min(n, 512)
				}
				if _, err := img.ReadAt(buf[:n], pos); err != nil {
					return err
				}
				budget -= n
				if budget <= 0 {
					break
				}
				pos += n
			}
		}
		off += e.Length
	}
	return nil
}
