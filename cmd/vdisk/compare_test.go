package main

import (
	"path/filepath"
	"testing"
)

// TestCompareMatchesQemu: same message and exit code as qemu-img compare.
func TestCompareMatchesQemu(t *testing.T) {
	dir := t.TempDir()
	mk := func(name string, size int64, writes map[int64][]byte) string {
		p := filepath.Join(dir, name)
		sparseRaw(t, p, size, writes)
		return p
	}
	a := mk("a.raw", 1<<20, map[int64][]byte{64 << 10: pattern(7, 4096)})
	same := mk("same.raw", 1<<20, map[int64][]byte{64 << 10: pattern(7, 4096)})
	diff := mk("diff.raw", 1<<20, map[int64][]byte{64 << 10: pattern(7, 4096), 1536 + 100: {1}})
	bigger := mk("bigger.raw", 2<<20, map[int64][]byte{64 << 10: pattern(7, 4096)})
	biggerDirty := mk("bigger-dirty.raw", 2<<20, map[int64][]byte{64 << 10: pattern(7, 4096), 1<<20 + 4096: {1}})
	zeros := mk("zeros.raw", 1<<20, map[int64][]byte{64 << 10: make([]byte, 4096)})
	empty := mk("empty.raw", 1<<20, nil)

	tests := []struct {
		name string
		args []string
		code int
	}{
		{"identical", []string{a, same}, 0},
		{"mismatch", []string{a, diff}, 1},
		{"size-differs", []string{a, bigger}, 0},
		{"size-differs-tail-data", []string{a, biggerDirty}, 1},
		{"strict-size", []string{"-s", a, bigger}, 1},
		{"allocated-zeros", []string{zeros, empty}, 0},
		{"quiet-mismatch", []string{"-q", a, diff}, 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"compare", "-f", "raw", "-F", "raw"}, tc.args...)
			r := vdiskRun(t, args...)
			q, qcode := runQemu(t, "qemu-img", args...)
			if r.code != tc.code || qcode != tc.code {
				t.Errorf("exit: vdisk %d, qemu-img %d, want %d (stderr %q)", r.code, qcode, tc.code, r.stderr)
			}
			if r.stdout != q {
				t.Errorf("stdout: vdisk %q, qemu-img %q", r.stdout, q)
			}
			if r.stderr != "" {
				t.Errorf("stderr %q", r.stderr)
			}
		})
	}
	// Errors exit with 2.
	r := vdiskRun(t, "compare", "-f", "raw", "-F", "raw", a, filepath.Join(dir, "nosuch.raw"))
	oneErrorLine(t, r, "vdisk compare")
	if r.code != 2 {
		t.Errorf("compare with a missing file: exit %d, want 2", r.code)
	}
}
