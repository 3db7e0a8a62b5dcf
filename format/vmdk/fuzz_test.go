package vmdk

import (
	"os"

	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// FuzzOpen opens arbitrary bytes as a VMDK (sparse header, embedded or
// separate descriptor, grain directory and tables, stream footer), walks
// the status, reads, checks and writes: nothing may panic, hang or
// allocate beyond the limits. Seeds are small valid images in
// testdata/fuzz/FuzzOpen (regenerate with VDISK_VMDK_FUZZ_SEEDS=1 go test
// -run TestFuzzSeeds).
func FuzzOpen(f *testing.F) {
	// Images qemu wrote, next to our own in testdata/fuzz/FuzzOpen.
	for _, b := range qemutest.Seeds(f, "vmdk",
		qemutest.Seed{Name: "sparse", Size: "1M", IO: []string{"write -P 0x11 4k 4k", "write -z 512k 64k"}},
		qemutest.Seed{Name: "zeroed", Size: "1M", Opts: []string{"zeroed_grain=on"}, IO: []string{"write -P 0x12 0 1k", "write -z 128k 64k"}},
		qemutest.Seed{Name: "stream", Size: "1M", Convert: true, Opts: []string{"subformat=streamOptimized"}, IO: []string{"write -P 0x13 64k 8k"}},
		qemutest.Seed{Name: "overlay", Size: "1M", Backing: true, IO: []string{"write -P 0x14 2k 4k"}},
		qemutest.Seed{Name: "empty", Size: "64M"},
	) {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > 1<<20 {
			return
		}
		disktest.WalkBytes(t, "vmdk", b, 4<<20)
		openBytes(t, b, false)
		openBytes(t, b, true)
	})
}

// TestFuzzSeeds writes the seed corpus when asked to.
func TestFuzzSeeds(t *testing.T) {
	if os.Getenv("VDISK_VMDK_FUZZ_SEEDS") == "" {
		// Without the variable: the committed corpus is there and every
		// seed in it is still a valid image.
		disktest.CheckCorpus(t, "vmdk")
		return
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzOpen")
	os.MkdirAll(dir, 0o755)
	// Tiny grains keep the seeds small (the fuzzer minimizes slowly).
	defer func(g, n, d int64) { defaultGrain, createGTEs, createDescSectors = g, n, d }(defaultGrain, createGTEs, createDescSectors)
	defaultGrain, createGTEs, createDescSectors = 512, 16, 1
	seeds := map[string][]byte{
		"sparse":  sparseImage(t, 16<<10),
		"zeroed":  sparseImage(t, 16<<10, "zeroed_grain=on"),
		"stream":  streamImage(t, 8<<10),
		"flatdsc": []byte(flatDesc),
	}
	for name, b := range seeds {
		content := qemutest.CorpusEntry(b)
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
