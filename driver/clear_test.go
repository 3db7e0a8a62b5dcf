package driver_test

import (
	"slices"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/memfs"
)

// truncRecorder records the sizes a file is truncated to.
type truncRecorder struct {
	driver.File
	sizes []int64
}

func (r *truncRecorder) Truncate(n int64) error {
	r.sizes = append(r.sizes, n)
	return r.File.Truncate(n)
}

// TestClearForCreate: a file with content keeps only its first byte, an
// empty one is not touched, and nothing is ever truncated to zero.
func TestClearForCreate(t *testing.T) {
	st := memfs.New()
	for _, c := range []struct {
		content []byte
		size    int64
		calls   int
	}{{nil, 0, 0}, {[]byte{9}, 1, 0}, {[]byte("old image"), 1, 1}} {
		if err := st.WriteFile("/f", c.content); err != nil {
			t.Fatal(err)
		}
		f, err := st.Open("/f", driver.ReadWrite)
		if err != nil {
			t.Fatal(err)
		}
		r := &truncRecorder{File: f}
		if err := driver.ClearForCreate(r); err != nil {
			t.Fatal(err)
		}
		if n, _ := f.Size(); n != c.size || len(r.sizes) != c.calls || slices.Contains(r.sizes, 0) {
			t.Fatalf("%q: size %d, truncated to %v; want size %d, %d calls", c.content, n, r.sizes, c.size, c.calls)
		}
		f.Close()
	}
}
