package disktest

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/memfs"
)

// Walk is what every FuzzOpen asserts about an image that opened: its
// Status runs tile the disk from 0 to Size (each run valid by
// driver.CheckExtent), and every Data run reads without error or with a
// clear one (ErrCorrupt, ErrUnsupported). At most budget bytes are read and
// maxRuns runs walked, so a hostile header claiming an exabyte disk made of
// tiny runs still ends quickly; what is walked must hold.
func Walk(t testing.TB, format string, img driver.Image, budget int64) {
	t.Helper()
	const maxRuns = 1 << 15
	size := img.Size()
	if size < 0 {
		t.Fatalf("%s: negative size %d", format, size)
	}
	buf := make([]byte, 64<<10)
	var off int64
	for runs := 0; off < size && runs < maxRuns; runs++ {
		e, err := img.Status(off, size-off)
		if err != nil {
			if errors.Is(err, driver.ErrCorrupt) || errors.Is(err, driver.ErrUnsupported) {
				return
			}
			t.Fatalf("%s: status at %d: unclear error %v", format, off, err)
		}
		if err := driver.CheckExtent(format, "fuzz", off, size-off, e); err != nil {
			t.Fatalf("%s: status runs do not tile the disk: %v", format, err)
		}
		if e.State == driver.Data {
			for pos := off; pos < off+e.Length && budget > 0; {
				n := min(off+e.Length-pos, int64(len(buf)), budget)
				if _, err := img.ReadAt(buf[:n], pos); err != nil {
					if errors.Is(err, driver.ErrCorrupt) || errors.Is(err, driver.ErrUnsupported) {
						return
					}
					t.Fatalf("%s: read %d bytes at %d: unclear error %v", format, n, pos, err)
				}
				pos += n
				budget -= n
			}
		}
		off += e.Length
	}
}

// WalkBytes opens b read-only as an image of format (registered by the
// calling test's package) on memory storage and, when it opens, Walks it.
// An open that fails must fail with a clear error: corrupt, unsupported,
// an invalid option or a missing file the image names.
func WalkBytes(t testing.TB, format string, b []byte, budget int64) {
	t.Helper()
	f, err := driver.Lookup(format)
	if err != nil {
		t.Fatal(err)
	}
	st := memfs.New()
	if err := st.WriteFile("/fuzz."+format, b); err != nil {
		t.Fatal(err)
	}
	img, err := f.Open(context.Background(), &driver.OpenParams{Storage: st, Name: "/fuzz." + format, ReadOnly: true, Options: driver.Values{}})
	if err != nil {
		for _, clear := range []error{driver.ErrCorrupt, driver.ErrUnsupported, driver.ErrInvalidOption, driver.ErrNotFound} {
			if errors.Is(err, clear) {
				return
			}
		}
		t.Fatalf("%s: open: unclear error %v", format, err)
	}
	defer img.Close()
	img.Info()
	img.Parent()
	Walk(t, format, img, budget)
}

// CheckCorpus makes sure the committed seed corpus of a package's FuzzOpen
// (testdata/fuzz/FuzzOpen) is there and that every seed that is a valid
// image of format opens and walks cleanly; failing seeds found by the
// fuzzer (hostile files kept as regression inputs) only have to fail
// clearly. It returns how many seeds opened.
func CheckCorpus(t testing.TB, format string) int {
	t.Helper()
	dir := filepath.Join("testdata", "fuzz", "FuzzOpen")
	ents, err := os.ReadDir(dir)
	if err != nil || len(ents) == 0 {
		t.Fatalf("seed corpus missing in %s: %v", dir, err)
	}
	opened := 0
	for _, e := range ents {
		raw, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		b, err := corpusBytes(raw)
		if err != nil {
			t.Fatalf("%s: %v", e.Name(), err)
		}
		WalkBytes(t, format, b, 4<<20)
		opened++
	}
	return opened
}

// corpusBytes decodes a "go test fuzz v1" file holding one []byte value.
func corpusBytes(raw []byte) ([]byte, error) {
	s := strings.TrimSpace(string(raw))
	const head = "go test fuzz v1\n[]byte("
	if !strings.HasPrefix(s, head) || !strings.HasSuffix(s, ")") {
		return nil, errors.New("not a go test fuzz v1 file with one []byte")
	}
	v, err := strconv.Unquote(s[len(head) : len(s)-1])
	if err != nil {
		return nil, err
	}
	return []byte(v), nil
}
