package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
)

// result is what one in-process run of the command line produced.
type result struct {
	stdout, stderr string
	code           int
}

// vdiskRun runs the command line in-process.
func vdiskRun(t *testing.T, args ...string) result {
	t.Helper()
	return vdiskRunCtx(t, context.Background(), nil, args...)
}

func vdiskRunCtx(t *testing.T, ctx context.Context, h *hooks, args ...string) result {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(ctx, args, strings.NewReader(""), &out, &errb, h)
	return result{out.String(), errb.String(), code}
}

// mustRun runs the command line and fails the test unless it succeeds.
func mustRun(t *testing.T, args ...string) result {
	t.Helper()
	r := vdiskRun(t, args...)
	if r.code != 0 {
		t.Fatalf("vdisk %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r
}

// qemu returns the path of a qemu tool; the test suite requires them.
func qemu(t *testing.T, tool string) string {
	t.Helper()
	p, err := exec.LookPath(tool)
	if err != nil {
		t.Fatalf("%s is required by these tests (install qemu-utils): %v", tool, err)
	}
	return p
}

// runQemu runs a qemu tool and returns its stdout and exit code.
func runQemu(t *testing.T, tool string, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(qemu(t, tool), args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("%s %s: %v", tool, strings.Join(args, " "), err)
	}
	return out.String(), code
}

func mustQemu(t *testing.T, tool string, args ...string) string {
	t.Helper()
	out, code := runQemu(t, tool, args...)
	if code != 0 {
		t.Fatalf("%s %s: exit %d: %s", tool, strings.Join(args, " "), code, out)
	}
	return out
}

// sparseRaw makes a sparse raw image of size bytes with the given data
// written at the given offsets.
func sparseRaw(t *testing.T, path string, size int64, writes map[int64][]byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for off, b := range writes {
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
}

func pattern(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

// qemuSparseRaw makes the reference image of the qemu comparisons: a 64 MiB
// raw image created by qemu-img with 64 KiB of 0x5a written at 1 MiB by
// qemu-io.
func qemuSparseRaw(t *testing.T, dir string) string {
	t.Helper()
	p := filepath.Join(dir, "ref.raw")
	mustQemu(t, "qemu-img", "create", "-q", "-f", "raw", p, "64M")
	mustQemu(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", p)
	return p
}

// allocated is the space a file takes on disk.
func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

var actualSizeRE = regexp.MustCompile(`"actual-size": \d+`)

// parseJSON decodes s or fails the test.
func parseJSON(t *testing.T, s string) any {
	t.Helper()
	var v any
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatalf("invalid JSON: %v\n%s", err, s)
	}
	return v
}

// oneErrorLine checks the error contract: exactly one stderr line, starting
// with the command's prefix.
func oneErrorLine(t *testing.T, r result, prefix string) {
	t.Helper()
	if r.code == 0 {
		t.Errorf("exit code 0, want failure (stdout %q)", r.stdout)
	}
	lines := strings.Split(strings.TrimSuffix(r.stderr, "\n"), "\n")
	if r.stderr == "" || !strings.HasSuffix(r.stderr, "\n") || len(lines) != 1 {
		t.Errorf("stderr is not exactly one line: %q", r.stderr)
		return
	}
	if !strings.HasPrefix(lines[0], prefix+": ") {
		t.Errorf("stderr %q does not start with %q", lines[0], prefix+": ")
	}
}
