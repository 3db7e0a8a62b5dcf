package vhdx

import (
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// BenchmarkConvert1G times raw->vhdx and vhdx->raw conversions of a 1 GiB
// disk (half of its 4 MiB pieces random data, the rest holes) with
// vdisk.Convert and with qemu-img convert, both with the target left to
// the kernel's writeback (qemu-img's default cache mode). Run it with
// go test -run XXX -bench Convert1G -benchtime 1x ./format/vhdx/
func BenchmarkConvert1G(b *testing.B) {
	qemutest.Require(b)
	dir := b.TempDir()
	const size = 1 << 30
	src := filepath.Join(dir, "src.raw")
	f, err := os.Create(src)
	if err != nil {
		b.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	piece := make([]byte, 4<<20)
	for off := int64(0); off < size; off += int64(len(piece)) {
		if rng.IntN(2) == 0 {
			for i := range piece {
				piece[i] = byte(rng.Uint32())
			}
			f.WriteAt(piece, off)
		}
	}
	f.Truncate(size)
	f.Close()
	conv := func(in, inFmt, out, outFmt string) time.Duration {
		os.Remove(out)
		start := time.Now()
		s, err := vdisk.Open(ctx, in, &vdisk.OpenOptions{Format: inFmt, ReadOnly: true})
		if err != nil {
			b.Fatal(err)
		}
		d, err := vdisk.Create(ctx, out, &vdisk.CreateOptions{Format: outFmt, Size: s.Size()})
		if err != nil {
			b.Fatal(err)
		}
		if err := vdisk.Convert(ctx, d, s, nil); err != nil {
			b.Fatal(err)
		}
		if err := d.CloseUnsynced(); err != nil {
			b.Fatal(err)
		}
		s.Close()
		return time.Since(start)
	}
	qconv := func(in, inFmt, out, outFmt string) time.Duration {
		os.Remove(out)
		start := time.Now()
		if o, err := exec.Command("qemu-img", "convert", "-f", inFmt, "-O", outFmt, in, out).CombinedOutput(); err != nil {
			b.Fatalf("%v: %s", err, o)
		}
		return time.Since(start)
	}
	exec.Command("sync").Run()
	for i := 0; i < b.N; i++ {
		ours := conv(src, "raw", filepath.Join(dir, "v.vhdx"), "vhdx")
		theirs := qconv(src, "raw", filepath.Join(dir, "q.vhdx"), "vhdx")
		b.Logf("raw->vhdx: vdisk %v, qemu-img %v (ratio %.2f)", ours, theirs, ours.Seconds()/theirs.Seconds())
		exec.Command("sync").Run()
		ours = conv(filepath.Join(dir, "q.vhdx"), "vhdx", filepath.Join(dir, "o.raw"), "raw")
		theirs = qconv(filepath.Join(dir, "q.vhdx"), "vhdx", filepath.Join(dir, "q.raw"), "raw")
		b.Logf("vhdx->raw: vdisk %v, qemu-img %v (ratio %.2f)", ours, theirs, ours.Seconds()/theirs.Seconds())
		if !qemutest.Compare(b, "vhdx", filepath.Join(dir, "v.vhdx"), "raw", src) {
			b.Fatal("the converted image differs")
		}
		exec.Command("sync").Run()
	}
}
