package main

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/vdisk/vdisk/internal/qemutest"
)

// TestConvertCompressed: convert -c writes compressed qcow2 clusters (zlib
// and zstd) that qemu-img checks clean and compares equal to the source,
// and the output is no larger than qemu-img's own -c output.
func TestConvertCompressed(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	src := qemuSparseRaw(t, dir)
	for _, ct := range []string{"zlib", "zstd"} {
		t.Run(ct, func(t *testing.T) {
			ours := filepath.Join(dir, "ours-"+ct+".qcow2")
			theirs := filepath.Join(dir, "qemu-"+ct+".qcow2")
			mustRun(t, "convert", "-c", "-o", "compression_type="+ct, "-f", "raw", "-O", "qcow2", src, ours)
			qemutest.Img(t, "convert", "-c", "-o", "compression_type="+ct, "-f", "raw", "-O", "qcow2", src, theirs)
			r := qemutest.Check(t, "qcow2", ours)
			if !qemutest.Compare(t, "raw", src, "qcow2", ours) {
				t.Fatal("compressed image differs from the source")
			}
			oi, _ := os.Stat(ours)
			ti, _ := os.Stat(theirs)
			if oi.Size() > ti.Size() {
				t.Errorf("our -c output is %d bytes, qemu-img's %d", oi.Size(), ti.Size())
			}
			if r.AllocatedClusters == 0 {
				t.Error("no clusters allocated")
			}
		})
	}
	// -c on a format without compression is a one-line error.
	res := vdiskRun(t, "convert", "-c", "-f", "raw", "-O", "raw", src, filepath.Join(dir, "x.raw"))
	if res.code == 0 {
		t.Fatal("convert -c -O raw succeeded")
	}
}

// TestConvertPeakRSS runs the built vdisk (no race detector: its memory is
// measured) on a 256 MiB source holding 160 MiB of data: log-like text,
// random bytes and a binary (the qemu-img executable) in turn, so that
// every zstd level the compressor picks is used. The compressed and
// stream-optimized converts, which hold the most in flight, and a plain
// one keep the child's peak RSS within 64 MiB on 2 cores, and qemu-img
// finds each output equal to the source.
func TestConvertPeakRSS(t *testing.T) {
	qemutest.Require(t)
	const limit = 64 << 20
	dir := t.TempDir()
	bin := buildVdisk(t, dir)
	// The child's peak RSS is taken by a small wrapper (see its comment).
	wrap := filepath.Join(dir, "rsswrap")
	build := exec.Command("go", "build", "-o", wrap, "./testdata/rsswrap")
	build.Env = append(os.Environ(), "GOFLAGS=")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build rsswrap: %v\n%s", err, out)
	}
	exe, err := exec.LookPath("qemu-img")
	if err != nil {
		t.Fatal(err)
	}
	binary, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	var txt bytes.Buffer
	for i := 0; txt.Len() < 1<<20; i++ {
		fmt.Fprintf(&txt, "%09d some log line of a disk image, compressible text\n", i)
	}
	random := make([]byte, 1<<20)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	src := filepath.Join(dir, "src.raw")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(256 << 20); err != nil {
		t.Fatal(err)
	}
	// 1 MiB chunks; every eighth MiB and every third of the rest is a hole.
	for i := 0; i < 256; i++ {
		var chunk []byte
		switch {
		case i%8 == 7:
			continue
		case i%3 == 0:
			chunk = txt.Bytes()[:1<<20]
		case i%3 == 1:
			chunk = random
		default:
			off := (i * 1 << 20) % max(len(binary)-1<<20, 1)
			chunk = binary[off:min(off+1<<20, len(binary))]
		}
		if _, err := f.WriteAt(chunk, int64(i)<<20); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, format string
		args         []string
	}{
		{"qcow2-zstd", "qcow2", []string{"-c", "-o", "compression_type=zstd"}},
		{"qcow2-zlib", "qcow2", []string{"-c"}},
		{"vmdk-stream", "vmdk", []string{"-o", "subformat=streamOptimized"}},
		{"qcow2", "qcow2", nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			out := filepath.Join(dir, c.name)
			args := append([]string{"convert", "-f", "raw", "-O", c.format}, c.args...)
			rss := filepath.Join(dir, "rss")
			cmd := exec.Command(wrap, append([]string{rss, bin}, append(args, src, out)...)...)
			// The bound is for 2 cores (the compressor keeps every core
			// busy, with a set of encoders each).
			cmd.Env = append(os.Environ(), "GOMAXPROCS=2")
			if b, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("vdisk %v: %v\n%s", args, err, b)
			}
			b, err := os.ReadFile(rss)
			if err != nil {
				t.Fatal(err)
			}
			kib, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
			if err != nil {
				t.Fatalf("rsswrap wrote %q: %v", b, err)
			}
			peak := kib << 10
			t.Logf("peak RSS %.1f MiB", float64(peak)/(1<<20))
			if peak > limit {
				t.Errorf("peak RSS %d MiB; want at most %d MiB", peak>>20, limit>>20)
			}
			if !qemutest.Compare(t, "raw", src, c.format, out) {
				t.Fatal("qemu-img compare: the output differs from the source")
			}
			os.Remove(out)
		})
	}
}
