// Package qemutest runs the real qemu tools (qemu-img, qemu-io) as oracles
// in tests: build images with them, and check and compare what vdisk writes.
// The test script installs the tools, so a missing tool fails the test
// instead of skipping it.
package qemutest

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Require fails the test when a tool is missing.
func Require(t testing.TB, tools ...string) {
	t.Helper()
	if len(tools) == 0 {
		tools = []string{"qemu-img", "qemu-io"}
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found: run ./test.sh, which installs qemu-utils", tool)
		}
	}
}

// Run runs a command and returns stdout, failing the test on error.
// qemu-img is run again (up to 10 more times, over about a second) when
// it refused because its PBKDF2 calibration for a LUKS key slot could not
// measure its CPU time, which a short iter-time on a busy machine
// sometimes makes it do ("Unable to get accurate CPU usage").
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, code, err := RunCode(name, args...)
	for try := 1; try <= 10 && name == "qemu-img" && err == nil && code != 0 && strings.Contains(out, "accurate CPU usage"); try++ {
		time.Sleep(time.Duration(try) * 20 * time.Millisecond)
		out, code, err = RunCode(name, args...)
	}
	if err != nil || code != 0 {
		t.Fatalf("%s %s: exit %d: %v\n%s", name, strings.Join(args, " "), code, err, out)
	}
	return out
}

// RunCode runs a command and returns its combined output and exit code.
func RunCode(name string, args ...string) (string, int, error) {
	cmd := exec.Command(name, args...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return out.String(), ee.ExitCode(), nil
	}
	if err != nil {
		return out.String(), -1, err
	}
	return out.String(), 0, nil
}

// Img runs qemu-img.
func Img(t testing.TB, args ...string) string {
	t.Helper()
	return Run(t, "qemu-img", args...)
}

// Create runs qemu-img create -f format [-o opts] file size.
func Create(t testing.TB, format, file, size string, opts ...string) {
	t.Helper()
	args := []string{"create", "-q", "-f", format}
	if len(opts) > 0 {
		args = append(args, "-o", strings.Join(opts, ","))
	}
	Img(t, append(args, file, size)...)
}

// IO runs qemu-io -f format with each command (e.g. "write -P 0xaa 0 64k").
func IO(t testing.TB, format, file string, cmds ...string) {
	t.Helper()
	args := []string{"-f", format}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out := Run(t, "qemu-io", append(args, file)...)
	if strings.Contains(out, "error") || strings.Contains(out, "failed") {
		t.Fatalf("qemu-io %v: %s", cmds, out)
	}
}

// CheckResult is qemu-img check --output json.
type CheckResult struct {
	Filename          string `json:"filename"`
	Format            string `json:"format"`
	CheckErrors       int    `json:"check-errors"`
	Corruptions       int    `json:"corruptions"`
	Leaks             int    `json:"leaks"`
	ImageEndOffset    int64  `json:"image-end-offset"`
	AllocatedClusters int64  `json:"allocated-clusters"`
	TotalClusters     int64  `json:"total-clusters"`
}

// Check runs qemu-img check and fails the test on any error or leak.
func Check(t testing.TB, format, file string) CheckResult {
	t.Helper()
	out, code, err := RunCode("qemu-img", "check", "--output", "json", "-f", format, file)
	if err != nil {
		t.Fatal(err)
	}
	var r CheckResult
	if jerr := json.Unmarshal([]byte(out), &r); jerr != nil {
		t.Fatalf("qemu-img check %s: exit %d: %s", file, code, out)
	}
	if code != 0 || r.CheckErrors != 0 || r.Corruptions != 0 || r.Leaks != 0 {
		t.Fatalf("qemu-img check %s: exit %d: %s", file, code, out)
	}
	return r
}

// Compare runs qemu-img compare and reports whether the images are
// identical; it fails the test on an error (exit code 2).
func Compare(t testing.TB, fmtA, a, fmtB, b string, extra ...string) bool {
	t.Helper()
	args := append([]string{"compare", "-f", fmtA, "-F", fmtB}, extra...)
	out, code, err := RunCode("qemu-img", append(args, a, b)...)
	if err != nil || code > 1 {
		t.Fatalf("qemu-img compare %s %s: exit %d: %v %s", a, b, code, err, out)
	}
	return code == 0
}

// Info runs qemu-img info --output json.
func Info(t testing.TB, format, file string) map[string]any {
	t.Helper()
	args := []string{"info", "--output", "json"}
	if format != "" {
		args = append(args, "-f", format)
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(Img(t, append(args, file)...)), &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// MapEntry is one entry of qemu-img map --output json.
type MapEntry struct {
	Start   int64  `json:"start"`
	Length  int64  `json:"length"`
	Depth   int    `json:"depth"`
	Present bool   `json:"present"`
	Zero    bool   `json:"zero"`
	Data    bool   `json:"data"`
	Offset  *int64 `json:"offset,omitempty"`
}

// Map runs qemu-img map --output json.
func Map(t testing.TB, format, file string) []MapEntry {
	t.Helper()
	var m []MapEntry
	if err := json.Unmarshal([]byte(Img(t, "map", "--output", "json", "-f", format, file)), &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// Raw converts file (of format) to raw with qemu-img and returns its
// content: what qemu reads from the image.
func Raw(t testing.TB, format, file string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "qemu.raw")
	Img(t, "convert", "-f", format, "-O", "raw", file, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(out)
	return b
}
