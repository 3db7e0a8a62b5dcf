package vmdk

import (
	"os"
	"path/filepath"
	"testing"
)

// FuzzOpen opens arbitrary bytes as a VMDK (sparse header, embedded or
// separate descriptor, grain directory and tables, stream footer), walks
// the status, reads, checks and writes: nothing may panic, hang or
// allocate beyond the limits. Seeds are small valid images in
// testdata/fuzz/FuzzOpen (regenerate with VDISK_VMDK_FUZZ_SEEDS=1 go test
// -run TestFuzzSeeds).
func FuzzOpen(f *testing.F) {
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > 1<<20 {
			return
		}
		openBytes(t, b, false)
		openBytes(t, b, true)
	})
}

// TestFuzzSeeds writes the seed corpus when asked to.
func TestFuzzSeeds(t *testing.T) {
	if os.Getenv("VDISK_VMDK_FUZZ_SEEDS") == "" {
		t.Skip("set VDISK_VMDK_FUZZ_SEEDS=1 to regenerate the seed corpus")
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
		content := "go test fuzz v1\n[]byte(" + quoteBytes(b) + ")\n"
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func quoteBytes(b []byte) string {
	const hex = "0123456789abcdef"
	out := make([]byte, 0, len(b)*4+2)
	out = append(out, '"')
	for _, c := range b {
		switch {
		case c == '"' || c == '\\':
			out = append(out, '\\', c)
		case c >= 0x20 && c < 0x7f:
			out = append(out, c)
		default:
			out = append(out, '\\', 'x', hex[c>>4], hex[c&15])
		}
	}
	return string(append(out, '"'))
}
