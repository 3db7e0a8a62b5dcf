package dmg

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// FuzzOpen opens arbitrary bytes as a DMG (trailer, XML plist or resource
// fork, mish tables, every chunk type): an image that opens must have
// Status runs tiling the disk and read without error or with a clear one
// (ErrCorrupt, ErrUnsupported); an image that does not open fails with a
// clear error. Seeds in testdata/fuzz/FuzzOpen are small images from the
// tests' own writer and from vdisk's (regenerate with
// VDISK_DMG_FUZZ_SEEDS=1 go test -run TestFuzzSeeds).
func FuzzOpen(f *testing.F) {
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > 1<<20 {
			return
		}
		disktest.WalkBytes(t, "dmg", b, 8<<20)
	})
}

// TestCorpus keeps the committed seeds valid: each opens and walks.
func TestCorpus(t *testing.T) {
	if n := disktest.CheckCorpus(t, "dmg"); n < 8 {
		t.Fatalf("%d seeds", n)
	}
}

// TestFuzzSeeds writes the seed corpus when asked to.
func TestFuzzSeeds(t *testing.T) {
	if os.Getenv("VDISK_DMG_FUZZ_SEEDS") == "" {
		t.Skip("set VDISK_DMG_FUZZ_SEEDS=1 to regenerate the seed corpus")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzOpen")
	os.MkdirAll(dir, 0o755)
	seeds := map[string][]byte{}
	for name, h := range foreignImages() {
		seeds["foreign-"+name] = h.build()
	}
	defer func(u int64) { unitSize = u }(unitSize)
	unitSize = 2048
	for _, sub := range subformats {
		data := append(append(textBytes(5000), make([]byte, 5000)...), pattern(2288, 9)...)
		seeds["vdisk-"+sub] = vdiskImage(t, sub, data)
	}
	for name, b := range seeds {
		content := qemutest.CorpusEntry(b)
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// vdiskImage writes data into a new DMG on memfs (in order, through
// WriteAt) and returns the file.
func vdiskImage(t testing.TB, sub string, data []byte) []byte {
	t.Helper()
	st := memfs.New()
	d := createDisk(t, st, "v.dmg", int64(len(data)), "subformat="+sub)
	disktest.MustWrite(t, d, nil, data, 0)
	disktest.MustClose(t, d)
	b, err := st.ReadFile("v.dmg")
	if err != nil {
		t.Fatal(err)
	}
	return b
}
