package dmg

import (
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	_ "github.com/vdisk/vdisk/format/raw"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/storage/memfs"
)

var ctx = context.Background()

func errorsIs(err, target error) bool { return errors.Is(err, target) }

func openDisk(t testing.TB, st driver.Storage, name string) *vdisk.Disk {
	t.Helper()
	d, err := vdisk.Open(ctx, name, &vdisk.OpenOptions{Storage: st, ReadOnly: true, Format: "dmg"})
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	return d
}

func createDisk(t testing.TB, st driver.Storage, name string, size int64, opts ...string) *vdisk.Disk {
	t.Helper()
	d, err := vdisk.Create(ctx, name, &vdisk.CreateOptions{Format: "dmg", Size: size, Options: disktest.KVs(opts...), Storage: st})
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	return d
}

// convertFile converts the raw file src into a new DMG dst with the given
// options, through the container's convert path.
func convertFile(t testing.TB, src, dst string, opts ...string) {
	t.Helper()
	s, err := vdisk.Open(ctx, src, &vdisk.OpenOptions{Format: "raw", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	os.Remove(dst)
	d := createDisk(t, nil, dst, s.Size(), opts...)
	if so, ok := vdisk.As[driver.StreamOnly](d.Top()); !ok || !so.StreamOnly() {
		t.Fatal("a new DMG is not StreamOnly")
	}
	if err := vdisk.Convert(ctx, d, s, nil); err != nil {
		t.Fatalf("convert: %v", err)
	}
	disktest.MustClose(t, d)
}

// source builds size bytes of test content: kind "mixed" (text-like
// runs, random runs and zero runs), "dense" (random, no zero sector),
// "sparse" (all zero) or "half" (alternate 1 MiB pieces of text and holes).
func source(kind string, size int64, seed uint64) []byte {
	b := make([]byte, size)
	rng := rand.New(rand.NewPCG(seed, 7))
	words := []string{"dmg ", "koly ", "mish ", "blkx ", "vdisk ", "zlib ", "\n"}
	text := func(from, to int64) {
		for i := from; i < to; {
			i += int64(copy(b[i:to], words[rng.IntN(len(words))]))
		}
	}
	switch kind {
	case "dense":
		for i := range b {
			b[i] = byte(rng.Uint32() | 1)
		}
	case "half":
		for off := int64(0); off < size; off += 2 << 20 {
			text(off, min(size, off+1<<20))
		}
	case "mixed":
		for off := int64(0); off < size; {
			end := min(size, off+int64(rng.IntN(700<<10)+512))
			switch rng.IntN(4) {
			case 0:
			case 1:
				for i := off; i < end; i++ {
					b[i] = byte(rng.Uint32())
				}
			default:
				text(off, end)
			}
			off = end
		}
	}
	return b
}

// writeSparse writes b to path leaving its zero MiBs as holes.
func writeSparse(t testing.TB, path string, b []byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for off := 0; off < len(b); off += 1 << 20 {
		end := min(len(b), off+1<<20)
		if !driver.IsZero(b[off:end]) {
			if _, err := f.WriteAt(b[off:end], int64(off)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := f.Truncate(int64(len(b))); err != nil {
		t.Fatal(err)
	}
}

func writeMem(t testing.TB, st *memfs.FS, name string, b []byte) {
	t.Helper()
	f, err := st.Open(name, driver.ReadWrite|driver.Create|driver.Truncate)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(b, 0); err != nil {
		t.Fatal(err)
	}
	f.Close()
}

// openImage opens name with the driver directly.
func openImage(t testing.TB, st driver.Storage, name string) *image {
	t.Helper()
	img, err := open(ctx, &driver.OpenParams{Storage: st, Name: name, ReadOnly: true})
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	return img.(*image)
}
