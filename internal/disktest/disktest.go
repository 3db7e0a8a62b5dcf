// Package disktest holds the small helpers the format drivers' tests share:
// option lists, whole-disk reads and checked writes through a vdisk.Disk.
package disktest

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/storage/memfs"
)

// KVs turns "key=value" strings (each may hold several, comma-separated,
// as -o does) into options. It panics on a malformed string: the strings
// are the test's own.
func KVs(opts ...string) []driver.KV {
	var out []driver.KV
	for _, o := range opts {
		kv, err := driver.SplitOptions(o)
		if err != nil {
			panic(err)
		}
		out = append(out, kv...)
	}
	return out
}

// ReadAll reads the whole disk, in odd-sized pieces so that the reads
// cross cluster and table boundaries.
func ReadAll(t testing.TB, d *vdisk.Disk) []byte {
	t.Helper()
	got := make([]byte, d.Size())
	for off := int64(0); off < d.Size(); {
		n := min(int64(777777), d.Size()-off)
		if _, err := d.ReadAt(got[off:off+n], off); err != nil {
			t.Fatalf("read at %d: %v", off, err)
		}
		off += n
	}
	return got
}

// MustWrite writes p at off and records it in m (when not nil).
func MustWrite(t testing.TB, d *vdisk.Disk, m *model.Model, p []byte, off int64) {
	t.Helper()
	if _, err := d.WriteAt(p, off); err != nil {
		t.Fatalf("write %d+%d: %v", off, len(p), err)
	}
	if m != nil {
		m.Write(p, off)
	}
}

// MustClose closes d.
func MustClose(t testing.TB, d *vdisk.Disk) {
	t.Helper()
	if err := d.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
}

// Fill returns n bytes of c.
func Fill(n int, c byte) []byte { return bytes.Repeat([]byte{c}, n) }

// WriteFile writes data to the host file path.
func WriteFile(t testing.TB, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// SaveTo copies the memfs file name out to the host directory dir, for
// qemu to read, and returns the host path.
func SaveTo(t testing.TB, st *memfs.FS, name, dir string) string {
	t.Helper()
	b, err := st.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, filepath.Base(name))
	WriteFile(t, p, b)
	return p
}

// FileSize returns the size of the file name in st.
func FileSize(t testing.TB, st driver.Storage, name string) int64 {
	t.Helper()
	fi, err := st.Stat(name)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size
}

// Narrowed reports whether -run picks subtests (a pattern with a '/'): a
// test that counts its subtests (crash points, say) then sees only some
// of them and must not hold the count against the code.
func Narrowed() bool {
	f := flag.Lookup("test.run")
	return f != nil && strings.Contains(f.Value.String(), "/")
}
