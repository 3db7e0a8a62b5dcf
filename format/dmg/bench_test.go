package dmg

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
)

// BenchmarkConvertUDZO converts a raw image into UDZO through the
// container's convert path, as `convert -O dmg` does. The source is
// $VDISK_DMG_BENCH_SRC, or a generated 64 MiB half-filled image.
// Compare with: time qemu-img convert -c -O qcow2 SRC out.qcow2
func BenchmarkConvertUDZO(b *testing.B) {
	src := os.Getenv("VDISK_DMG_BENCH_SRC")
	dir := b.TempDir()
	if src == "" {
		src = filepath.Join(dir, "src.raw")
		writeSparse(b, src, halfFilled(64<<20))
	}
	fi, err := os.Stat(src)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(fi.Size())
	out := filepath.Join(dir, "out.dmg")
	if o := os.Getenv("VDISK_DMG_BENCH_DST"); o != "" {
		out = o
	}
	for b.Loop() {
		convertFile(b, src, out, "subformat=UDZO")
	}
	if fo, err := os.Stat(out); err == nil {
		b.ReportMetric(float64(fo.Size()), "out-bytes")
	}
}

// BenchmarkReadUDZO converts $VDISK_DMG_BENCH_DMG (or a generated 64 MiB
// UDZO image) to raw through the container's convert (parallel reads,
// each decompressing its own chunks). Compare with:
// time qemu-img convert -f dmg -O raw SRC out.raw
func BenchmarkReadUDZO(b *testing.B) {
	dir := b.TempDir()
	src := os.Getenv("VDISK_DMG_BENCH_DMG")
	if src == "" {
		raw := filepath.Join(dir, "src.raw")
		writeSparse(b, raw, halfFilled(64<<20))
		src = filepath.Join(dir, "src.dmg")
		convertFile(b, raw, src)
	}
	s := openDisk(b, nil, src)
	defer s.Close()
	b.SetBytes(s.Size())
	out := filepath.Join(dir, "out.raw")
	for b.Loop() {
		os.Remove(out)
		d, err := vdisk.Create(ctx, out, &vdisk.CreateOptions{Format: "raw", Size: s.Size()})
		if err != nil {
			b.Fatal(err)
		}
		if err := vdisk.Convert(ctx, d, s, nil); err != nil {
			b.Fatal(err)
		}
		d.Close()
	}
}

// halfFilled is size bytes whose even MiBs hold data (text-like,
// random and patterned thirds) and odd MiBs are zero.
func halfFilled(size int64) []byte {
	b := source("sparse", size, 0)
	mixed := source("mixed", 1<<20, 5)
	for off := int64(0); off < size; off += 2 << 20 {
		copy(b[off:min(size, off+1<<20)], mixed)
		if off+8 < size {
			b[off] = byte(off >> 21) // no two data MiBs alike
			b[off+1] = byte(off >> 29)
		}
	}
	return b
}

// TestWriteBenchSource writes the 1 GiB benchmark source when asked to
// (VDISK_DMG_BENCH_OUT=path).
func TestWriteBenchSource(t *testing.T) {
	out := os.Getenv("VDISK_DMG_BENCH_OUT")
	if out == "" {
		t.Skip("set VDISK_DMG_BENCH_OUT=path to write the benchmark source")
	}
	writeSparse(t, out, halfFilled(1<<30))
}
