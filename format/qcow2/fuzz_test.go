package qcow2_test

import (
	"os"
	"path/filepath"
	"testing"
)

// FuzzOpen opens arbitrary bytes as a qcow2 image, walks and reads it,
// checks it and writes to it: nothing may panic, hang or allocate beyond
// the limits. Seeds are small valid images in testdata/fuzz/FuzzOpen
// (regenerate them with VDISK_QCOW2_FUZZ_SEEDS=1 go test -run TestFuzzSeeds).
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
	if os.Getenv("VDISK_QCOW2_FUZZ_SEEDS") == "" {
		t.Skip("set VDISK_QCOW2_FUZZ_SEEDS=1 to regenerate the seed corpus")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzOpen")
	os.MkdirAll(dir, 0o755)
	seeds := map[string][]byte{
		"v3":         smallImage(t),
		"v2":         smallImage(t, "compat=0.10"),
		"refbits1":   smallImage(t, "refcount_bits=1"),
		"refbits64":  smallImage(t, "refcount_bits=64"),
		"lazy":       smallImage(t, "lazy_refcounts=on"),
		"zstd":       smallImage(t, "compression_type=zstd"),
		"extl2-16k":  smallImage(t, "cluster_size=16k", "extended_l2=on"),
		"compressed": compressedSeed(t),
		"snapshot":   snapshotSeed(t),
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
