package luks

import (
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vdisk/vdisk/internal/qemutest"
)

// requireCryptsetup fails (under CI) or skips when cryptsetup is missing.
func requireCryptsetup(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("cryptsetup"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("cryptsetup not found: test.sh installs cryptsetup-bin")
		}
		t.Skip("cryptsetup not installed")
	}
}

// cryptsetup runs cryptsetup and returns its output and exit code.
func cryptsetup(t testing.TB, args ...string) (string, int) {
	t.Helper()
	out, code, err := qemutest.RunCode("cryptsetup", args...)
	if err != nil {
		t.Fatalf("cryptsetup %v: %v", args, err)
	}
	return out, code
}

// keyFile writes pass to a file for cryptsetup --key-file.
func keyFile(t testing.TB, pass string) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(f, []byte(pass), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

// dumpVolumeKey is the volume key cryptsetup recovers with pass.
func dumpVolumeKey(t testing.TB, file, pass string) []byte {
	t.Helper()
	out, code := cryptsetup(t, "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", keyFile(t, pass), file)
	if code != 0 {
		t.Fatalf("luksDump --dump-volume-key: exit %d\n%s", code, out)
	}
	var hexKey strings.Builder
	in := false
	for _, line := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && !strings.HasPrefix(line, "\t") && !strings.HasPrefix(line, " ") {
			in = strings.HasPrefix(k, "MK dump") || strings.HasPrefix(k, "Volume key")
			if in {
				line = v
			}
		}
		if in {
			hexKey.WriteString(strings.ReplaceAll(strings.TrimSpace(line), " ", ""))
		}
	}
	key, err := hex.DecodeString(hexKey.String())
	if err != nil || len(key) == 0 {
		t.Fatalf("no volume key in luksDump output (%v):\n%s", err, out)
	}
	return key
}
