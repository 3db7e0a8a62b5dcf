package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestConvertKeepsHoles converts the qemu-made sparse image and checks that
// the copy is no larger on disk and that qemu-img finds it identical.
func TestConvertKeepsHoles(t *testing.T) {
	dir := t.TempDir()
	ref := qemuSparseRaw(t, dir)
	tests := []struct {
		name string
		args []string
	}{
		{"default", nil},
		{"one-worker", []string{"-m", "1"}},
		{"out-of-order", []string{"-W", "-m", "16"}},
		{"sparse-64k", []string{"-S", "64k"}},
		{"progress", []string{"-p"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(dir, tc.name+".raw")
			args := append(append([]string{"convert", "-f", "raw", "-O", "raw"}, tc.args...), ref, out)
			r := mustRun(t, args...)
			if r.stdout != "" {
				t.Errorf("stdout %q", r.stdout)
			}
			if tc.name == "progress" {
				if !strings.Contains(r.stderr, "    (100.00/100%)\r") || !strings.HasSuffix(r.stderr, "\n") {
					t.Errorf("progress output %q", r.stderr)
				}
			} else if r.stderr != "" {
				t.Errorf("stderr %q", r.stderr)
			}
			if a, b := allocated(t, out), allocated(t, ref); a > b {
				t.Errorf("output allocates %d bytes, more than the input's %d", a, b)
			}
			if got, code := runQemu(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", ref, out); code != 0 || got != "Images are identical.\n" {
				t.Errorf("qemu-img compare: exit %d, %q", code, got)
			}
		})
	}
}

func TestConvertFullyAllocated(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	sparseRaw(t, src, 1<<20, map[int64][]byte{4096: pattern(9, 4096)})
	dst := filepath.Join(dir, "dst.raw")
	mustRun(t, "convert", "-q", "-S", "0", "-f", "raw", src, dst)
	if a := allocated(t, dst); a < 1<<20 {
		t.Errorf("-S 0: %d bytes allocated, want the whole 1 MiB", a)
	}
	a, _ := os.ReadFile(src)
	b, _ := os.ReadFile(dst)
	if !bytes.Equal(a, b) {
		t.Error("content differs")
	}
}

// TestConvertNoCreate writes over an existing, dirty image with -n: zero
// runs of the source must be written as zeros, and the file must stay.
func TestConvertNoCreate(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	sparseRaw(t, src, 1<<20, map[int64][]byte{8192: pattern(3, 4096)})
	dst := filepath.Join(dir, "dst.raw")
	if err := os.WriteFile(dst, pattern(0xff, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	mustRun(t, "convert", "-n", "-f", "raw", "-O", "raw", src, dst)
	a, _ := os.ReadFile(src)
	b, _ := os.ReadFile(dst)
	if !bytes.Equal(a, b) {
		t.Error("-n: target content differs from the source")
	}
	// A failing -n run never removes the target.
	small := filepath.Join(dir, "small.raw")
	if err := os.WriteFile(small, pattern(0xff, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	r := vdiskRun(t, "convert", "-n", "-f", "raw", "-O", "raw", src, small)
	oneErrorLine(t, r, "vdisk convert")
	if !exists(small) {
		t.Error("-n: failed convert removed the existing target")
	}
}

// TestConvertInterrupted cancels a conversion after the target was created
// (as SIGINT does): the exit is an error and the target is gone.
func TestConvertInterrupted(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	sparseRaw(t, src, 8<<20, map[int64][]byte{0: pattern(1, 1<<20)})
	dst := filepath.Join(dir, "dst.raw")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	h := &hooks{afterCreate: func() {
		if !exists(dst) {
			t.Error("afterCreate: target does not exist yet")
		}
		cancel()
	}}
	r := vdiskRunCtx(t, ctx, h, "convert", "-p", "-f", "raw", src, dst)
	if r.code != 1 {
		t.Errorf("exit %d, want 1", r.code)
	}
	if !strings.HasSuffix(r.stderr, "vdisk convert: interrupted\n") {
		t.Errorf("stderr %q", r.stderr)
	}
	if exists(dst) {
		t.Error("interrupted convert left its target behind")
	}
}

func TestConvertUnsupported(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	sparseRaw(t, src, 1<<20, nil)
	for _, args := range [][]string{
		{"-c"},
		{"-l", "snapshot.name=s1"},
		{"-l", "s1"},
		{"-B", src},
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			dst := filepath.Join(dir, "dst.raw")
			r := vdiskRun(t, append(append([]string{"convert", "-f", "raw"}, args...), src, dst)...)
			oneErrorLine(t, r, "vdisk convert")
			if exists(dst) {
				t.Error("failed convert left its target behind")
			}
		})
	}
}
