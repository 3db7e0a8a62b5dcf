package qcow2_test

import (
	"os"

	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// FuzzOpen opens arbitrary bytes as a qcow2 image, walks and reads it,
// checks it and writes to it: nothing may panic, hang or allocate beyond
// the limits. Seeds are small valid images in testdata/fuzz/FuzzOpen
// (regenerate them with VDISK_QCOW2_FUZZ_SEEDS=1 go test -run TestFuzzSeeds).
func FuzzOpen(f *testing.F) {
	// Images qemu wrote, next to our own in testdata/fuzz/FuzzOpen.
	for _, b := range qemutest.Seeds(f, "qcow2",
		qemutest.Seed{Name: "v3", Size: "1M", Opts: []string{"cluster_size=512"}, IO: []string{"write -P 0x11 1k 3k", "write -z 64k 4k"}},
		qemutest.Seed{Name: "v2", Size: "1M", Opts: []string{"cluster_size=512", "compat=0.10"}, IO: []string{"write -P 0x12 0 1k"}},
		qemutest.Seed{Name: "extl2", Size: "1M", Opts: []string{"cluster_size=16k", "extended_l2=on"}, IO: []string{"write -P 0x13 512 1k", "write -z 32k 2k"}},
		qemutest.Seed{Name: "lazy", Size: "1M", Opts: []string{"cluster_size=4k", "lazy_refcounts=on", "refcount_bits=1"}, IO: []string{"write -P 0x14 0 8k"}},
		qemutest.Seed{Name: "overlay", Size: "1M", Opts: []string{"cluster_size=4k"}, Backing: true, IO: []string{"write -P 0x15 2k 4k"}},
		qemutest.Seed{Name: "compressed", Size: "256k", Convert: true, Flags: []string{"-c"}, Opts: []string{"cluster_size=4k"}, IO: []string{"write -P 0x16 0 64k"}},
		qemutest.Seed{Name: "zstd", Size: "256k", Convert: true, Flags: []string{"-c"}, Opts: []string{"cluster_size=4k,compression_type=zstd"}, IO: []string{"write -P 0x17 0 64k"}},
	) {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > 1<<20 {
			return
		}
		disktest.WalkBytes(t, "qcow2", b, 4<<20)
		openBytes(t, b, false)
		openBytes(t, b, true)
	})
}

// TestFuzzSeeds writes the seed corpus when asked to.
func TestFuzzSeeds(t *testing.T) {
	if os.Getenv("VDISK_QCOW2_FUZZ_SEEDS") == "" {
		// Without the variable: the committed corpus is there and every
		// seed in it is still a valid image.
		disktest.CheckCorpus(t, "qcow2")
		return
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
		content := qemutest.CorpusEntry(b)
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
