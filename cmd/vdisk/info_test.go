package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestInfoLikeQemu: vdisk info prints what qemu-img info prints for the
// same raw file, in JSON and human form, with and without --backing-chain
// and when the format is probed; only the allocation ("actual-size",
// "disk size"), which the two read from the file system at different
// moments, is left out.
func TestInfoLikeQemu(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.raw")
	sparseRaw(t, img, 1<<30, map[int64][]byte{1 << 20: pattern(0xaa, 64<<10)})
	for _, args := range [][]string{
		{"info", "-f", "raw", "--output", "json", img},
		{"info", "-f", "raw", "--output=json", "--backing-chain", img},
		{"info", "-f", "raw", img},
		{"info", "-U", "--output", "json", img},
	} {
		t.Run(strings.Join(args[1:len(args)-1], " "), func(t *testing.T) {
			ours := withoutAllocation(mustRun(t, args...).stdout)
			theirs := withoutAllocation(mustQemu(t, "qemu-img", args...))
			if ours != theirs {
				t.Errorf("vdisk %v:\n%s\nqemu-img:\n%s", args, ours, theirs)
			}
		})
	}
}

// withoutAllocation blanks the fields that report allocated bytes.
func withoutAllocation(s string) string {
	s = actualSizeRE.ReplaceAllString(s, `"actual-size": "<ALLOCATED>"`)
	lines := strings.Split(s, "\n")
	for i, l := range lines {
		if strings.HasPrefix(l, "disk size: ") {
			lines[i] = "disk size: <ALLOCATED>"
		}
	}
	return strings.Join(lines, "\n")
}

func TestInfoProbeWarning(t *testing.T) {
	img := filepath.Join(t.TempDir(), "disk.img")
	sparseRaw(t, img, 1<<20, nil)
	// Like qemu-img, a read-only open of a probed raw image is silent; the
	// warning is for writable opens (block 0 could be rewritten).
	if r := mustRun(t, "info", img); r.stderr != "" {
		t.Errorf("read-only probe: unexpected stderr %q", r.stderr)
	}
	if r := mustRun(t, "--debug", "info", img); !strings.Contains(r.stderr, "probing guessed raw") {
		t.Errorf("--debug: probe notice missing from %q", r.stderr)
	}
	if r := mustRun(t, "info", "-f", "raw", img); r.stderr != "" {
		t.Errorf("-f raw: unexpected stderr %q", r.stderr)
	}
}

// TestInfoMatchesQemu compares our JSON with qemu-img's for the same file.
func TestInfoMatchesQemu(t *testing.T) {
	dir := t.TempDir()
	ref := qemuSparseRaw(t, dir)
	odd := filepath.Join(dir, "odd.raw")
	if err := os.WriteFile(odd, pattern(1, 1000), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, img := range []string{ref, odd} {
		t.Run(filepath.Base(img), func(t *testing.T) {
			ours := parseJSON(t, mustRun(t, "info", "-f", "raw", "--output", "json", img).stdout).(map[string]any)
			theirs := parseJSON(t, mustQemu(t, "qemu-img", "info", "-f", "raw", "--output", "json", img)).(map[string]any)
			for _, k := range []string{"virtual-size", "format", "filename", "actual-size", "dirty-flag"} {
				if fmt.Sprint(ours[k]) != fmt.Sprint(theirs[k]) {
					t.Errorf("%s: vdisk %v, qemu-img %v", k, ours[k], theirs[k])
				}
			}
		})
	}
	// A 1000-byte raw file is a 1024-byte disk, as in qemu.
	r := mustRun(t, "info", "-f", "raw", "--output", "json", odd)
	if !strings.Contains(r.stdout, `"virtual-size": 1024,`) {
		t.Errorf("1000-byte raw file: %s", r.stdout)
	}
}

// TestInfoHumanMatchesQemu compares the human output line by line.
func TestInfoHumanMatchesQemu(t *testing.T) {
	ref := qemuSparseRaw(t, t.TempDir())
	ours := mustRun(t, "info", "-f", "raw", ref).stdout
	theirs := mustQemu(t, "qemu-img", "info", "-f", "raw", ref)
	if ours != theirs {
		t.Errorf("human info differs\nvdisk:\n%s\nqemu-img:\n%s", ours, theirs)
	}
}

func TestCreateSizes(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		arg  string
		want int64
	}{
		{"1G", 1 << 30},
		{"1.5M", 3 << 19},
		{"512", 512},
		{"64k", 64 << 10},
		{"2T", 2 << 40},
		{"1000", 1024}, // raw rounds up to a whole sector, as qemu does
		{"0", 0},
	}
	for i, tc := range tests {
		t.Run(tc.arg, func(t *testing.T) {
			img := filepath.Join(dir, fmt.Sprintf("s%d.raw", i))
			r := mustRun(t, "create", "-f", "raw", img, tc.arg)
			if !strings.HasPrefix(r.stdout, fmt.Sprintf("Formatting '%s', fmt=raw size=", img)) {
				t.Errorf("create output %q", r.stdout)
			}
			info := mustRun(t, "info", "-f", "raw", "--output", "json", img).stdout
			if want := fmt.Sprintf(`"virtual-size": %d,`, tc.want); !strings.Contains(info, want) {
				t.Errorf("size %s: info has no %s:\n%s", tc.arg, want, info)
			}
		})
	}
}
