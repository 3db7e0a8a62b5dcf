package disktest

import (
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/osfs"
)

// SparseSource writes dir/src.raw: a sparse raw file of size bytes whose
// runs (offset, length) hold random bytes (never zero, so that no run
// reads as a hole) drawn from seed. It returns the file's path, its whole
// content and the number of data bytes. The offload tests of the formats
// that copy inside the kernel use it as their source.
func SparseSource(t testing.TB, dir string, size int64, runs [][2]int64, seed uint64) (string, []byte, int64) {
	t.Helper()
	data := make([]byte, size)
	rng := rand.New(rand.NewPCG(seed, seed^0x5a))
	f, err := os.Create(filepath.Join(dir, "src.raw"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	var total int64
	for _, r := range runs {
		for i := r[0]; i < r[0]+r[1]; i++ {
			data[i] = byte(rng.Uint32()) | 1
		}
		if _, err := f.WriteAt(data[r[0]:r[0]+r[1]], r[0]); err != nil {
			t.Fatal(err)
		}
		total += r[1]
	}
	return f.Name(), data, total
}

// ConvertStats converts src into dst with o and returns the statistics,
// failing the test when the convert fails or when the bytes it accounts
// for (written, offloaded, zeroed, skipped) do not add up to the size.
func ConvertStats(t testing.TB, ctx context.Context, dst, src *vdisk.Disk, o vdisk.ConvertOptions) vdisk.ConvertStats {
	t.Helper()
	var st vdisk.ConvertStats
	o.Stats = &st
	if err := vdisk.Convert(ctx, dst, src, &o); err != nil {
		t.Fatal(err)
	}
	if st.Written+st.Offloaded+st.Zero+st.Skipped != src.Size() {
		t.Fatalf("stats %+v do not add up to the size %d", st, src.Size())
	}
	return st
}

// RandomBytes returns n bytes drawn from a PCG seeded with (s1, s2).
func RandomBytes(n int, s1, s2 uint64) []byte {
	b := make([]byte, n)
	rng := rand.New(rand.NewPCG(s1, s2))
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// HostFile writes data to the host file path and returns it opened
// read-only through osfs (closed when the test ends): a source for the
// kernel-copy tests.
func HostFile(t testing.TB, path string, data []byte) driver.File {
	t.Helper()
	WriteFile(t, path, data)
	f, err := osfs.New().Open(path, driver.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}
