// Package disktest holds the small helpers the format drivers' tests share:
// option lists, whole-disk reads and checked writes through a vdisk.Disk.
package disktest

import (
	"bytes"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/model"
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
