package main

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/osfs"
)

// TestBadInput: every runtime error is exactly one stderr line prefixed with
// the command, exits non-zero, and convert leaves no target behind.
func TestBadInput(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "ok.raw")
	sparseRaw(t, img, 1<<20, map[int64][]byte{0: pattern(1, 4096)})
	missing := filepath.Join(dir, "missing.raw")
	subdir := filepath.Join(dir, "subdir")
	if err := os.Mkdir(subdir, 0o755); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out.raw")
	noDir := filepath.Join(dir, "nodir", "out.raw")

	tests := []struct {
		name string
		args []string
		code int
		// noFile must not exist afterwards.
		noFile string
		// contains is a substring the error line must have.
		contains string
	}{
		{"info missing", []string{"info", missing}, 1, "", "no such file"},
		{"info missing -f", []string{"info", "-f", "raw", missing}, 1, "", "no such file"},
		{"info unknown format", []string{"info", "-f", "nosuch", img}, 1, "", "nosuch"},
		{"info directory", []string{"info", subdir}, 1, "", "directory"},
		{"info directory -f", []string{"info", "-f", "raw", subdir}, 1, "", "directory"},
		{"info bad output", []string{"info", "--output", "xml", img}, 1, "", "--output"},
		{"map missing", []string{"map", "-f", "raw", missing}, 1, "", "no such file"},
		{"map directory", []string{"map", subdir}, 1, "", "directory"},
		{"map unknown format", []string{"map", "-f", "nosuch", img}, 1, "", "nosuch"},
		{"compare missing", []string{"compare", "-f", "raw", img, missing}, 2, "", "no such file"},
		{"compare unknown format", []string{"compare", "-f", "raw", "-F", "nosuch", img, img}, 2, "", "nosuch"},
		{"create unknown format", []string{"create", "-f", "nosuch", out, "1M"}, 1, out, "nosuch"},
		{"create bad option", []string{"create", "-f", "raw", "-o", "nosuch=1", out, "1M"}, 1, out, "nosuch"},
		{"create bad value", []string{"create", "-f", "raw", "-o", "preallocation=bogus", out, "1M"}, 1, out, "bogus"},
		{"create bad size", []string{"create", "-f", "raw", out, "12Q"}, 1, out, "size"},
		{"create negative size", []string{"create", "-f", "raw", out, "-1"}, 1, out, ""},
		{"create no size", []string{"create", "-f", "raw", out}, 1, out, "size"},
		{"create directory", []string{"create", "-f", "raw", subdir, "1M"}, 1, "", "directory"},
		{"create in missing dir", []string{"create", "-f", "raw", noDir, "1M"}, 1, noDir, "no such file"},
		{"convert missing source", []string{"convert", "-f", "raw", missing, out}, 1, out, "no such file"},
		{"convert source directory", []string{"convert", subdir, out}, 1, out, "directory"},
		{"convert unknown source format", []string{"convert", "-f", "nosuch", img, out}, 1, out, "nosuch"},
		{"convert unknown target format", []string{"convert", "-f", "raw", "-O", "nosuch", img, out}, 1, out, "nosuch"},
		{"convert bad option", []string{"convert", "-f", "raw", "-o", "nosuch=1", img, out}, 1, out, "nosuch"},
		{"convert bad value", []string{"convert", "-f", "raw", "-o", "preallocation=bogus", img, out}, 1, out, "bogus"},
		{"convert target in missing dir", []string{"convert", "-f", "raw", img, noDir}, 1, noDir, "no such file"},
		{"convert target is a directory", []string{"convert", "-f", "raw", img, subdir}, 1, "", "directory"},
		{"convert -n into a directory", []string{"convert", "-n", "-f", "raw", "-O", "raw", img, subdir}, 1, "", "directory"},
		{"convert -n missing target", []string{"convert", "-n", "-f", "raw", "-O", "raw", img, out}, 1, out, "no such file"},
		{"convert bad workers", []string{"convert", "-m", "0", "-f", "raw", img, out}, 1, out, ""},
		{"convert bad sparse size", []string{"convert", "-S", "100", "-f", "raw", img, out}, 1, out, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := vdiskRun(t, tc.args...)
			cmd := "vdisk " + tc.args[0]
			if r.code != tc.code {
				t.Errorf("exit %d, want %d", r.code, tc.code)
			}
			// Usage errors add a "Try ... --help" hint; runtime errors are one line.
			stderr := r.stderr
			if hint := "Try '" + cmd + " --help' for more information.\n"; strings.HasSuffix(stderr, hint) {
				stderr = strings.TrimSuffix(stderr, hint)
			}
			oneErrorLine(t, result{r.stdout, stderr, r.code}, cmd)
			if !strings.Contains(strings.ToLower(stderr), strings.ToLower(tc.contains)) {
				t.Errorf("stderr %q does not mention %q", stderr, tc.contains)
			}
			// qemu-img create prints "Formatting ..." before it fails.
			if r.stdout != "" && !(tc.args[0] == "create" && strings.HasPrefix(r.stdout, "Formatting '")) {
				t.Errorf("stdout %q", r.stdout)
			}
			if tc.noFile != "" && exists(tc.noFile) {
				t.Errorf("%s left behind", tc.noFile)
				os.Remove(tc.noFile)
			}
		})
	}
}

// TestReadOnlyTarget: convert -n into a file without write permission.
// Root ignores permission bits, so the images are held by a storage that
// enforces them (a ReadWrite open of a file without write bits fails with
// EACCES, as the kernel would for a user): the test runs as root in CI.
func TestReadOnlyTarget(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	sparseRaw(t, src, 1<<20, nil)
	dst := filepath.Join(dir, "ro.raw")
	sparseRaw(t, dst, 1<<20, nil)
	if err := os.Chmod(dst, 0o444); err != nil {
		t.Fatal(err)
	}
	st := &permFS{Storage: osfs.New()}
	r := vdiskRunCtx(t, context.Background(), &hooks{storage: st}, "convert", "-n", "-f", "raw", "-O", "raw", src, dst)
	if r.code == 0 {
		t.Fatal("convert -n into a read-only file succeeded")
	}
	oneErrorLine(t, r, "vdisk convert")
	if !strings.Contains(r.stderr, dst) || !strings.Contains(r.stderr, "permission denied") {
		t.Errorf("stderr %q does not name the target and the permission error", r.stderr)
	}
	if st.denied.Load() == 0 {
		t.Error("the target was never opened for writing")
	}
	if !exists(dst) {
		t.Error("convert -n removed the existing target")
	}
}

// permFS enforces permission bits as for an unprivileged user: a
// ReadWrite open of a file without any write bit fails with EACCES.
type permFS struct {
	driver.Storage
	denied atomic.Int32
}

func (p *permFS) Open(name string, flag driver.OpenFlag) (driver.File, error) {
	if flag&driver.ReadWrite != 0 {
		if fi, err := os.Stat(name); err == nil && fi.Mode().Perm()&0o222 == 0 {
			p.denied.Add(1)
			return nil, &driver.Error{Op: "open", File: name, Offset: -1, Err: &fs.PathError{Op: "open", Path: name, Err: syscall.EACCES}}
		}
	}
	return p.Storage.Open(name, flag)
}

func TestUsageErrors(t *testing.T) {
	tests := []struct {
		args []string
		cmd  string
	}{
		{[]string{"info"}, "vdisk info"},
		{[]string{"info", "a", "b"}, "vdisk info"},
		{[]string{"map"}, "vdisk map"},
		{[]string{"compare", "a"}, "vdisk compare"},
		{[]string{"convert", "a"}, "vdisk convert"},
		{[]string{"create"}, "vdisk create"},
		{[]string{"info", "--nosuch", "a"}, "vdisk info"},
		{[]string{"nosuch"}, "vdisk"},
		{[]string{}, "vdisk"},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			r := vdiskRun(t, tc.args...)
			if r.code != 1 {
				t.Errorf("exit %d, want 1", r.code)
			}
			lines := strings.Split(strings.TrimSuffix(r.stderr, "\n"), "\n")
			if len(lines) != 2 || !strings.HasPrefix(lines[0], tc.cmd+": ") ||
				lines[1] != "Try '"+tc.cmd+" --help' for more information." {
				t.Errorf("stderr %q: want an error line and a hint", r.stderr)
			}
			if r.stdout != "" {
				t.Errorf("usage dumped on stdout: %q", r.stdout)
			}
		})
	}
}

func TestHelp(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"info", "--help"}, {"help", "convert"}} {
		r := mustRun(t, args...)
		if !strings.Contains(r.stdout, "Usage:") {
			t.Errorf("%v: no usage in %q", args, r.stdout)
		}
	}
}
