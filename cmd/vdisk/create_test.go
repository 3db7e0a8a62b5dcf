package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestCreateMatchesQemu: same "Formatting" line, same file size.
func TestCreateMatchesQemu(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name string
		args []string // after the file name
	}{
		{"plain", []string{"1G"}},
		{"fraction", []string{"1.5M"}},
		{"bytes", []string{"1000"}},
		{"prealloc", []string{"-o", "preallocation=full", "64k"}},
		{"size-option", []string{"-o", "size=2M"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ours := filepath.Join(dir, tc.name+".vdisk.raw")
			theirs := filepath.Join(dir, tc.name+".qemu.raw")
			r := mustRun(t, append([]string{"create", "-f", "raw", ours}, tc.args...)...)
			q := mustQemu(t, "qemu-img", append([]string{"create", "-f", "raw", theirs}, tc.args...)...)
			if got, want := strings.ReplaceAll(r.stdout, ours, "F"), strings.ReplaceAll(q, theirs, "F"); got != want {
				t.Errorf("output %q, qemu-img %q", got, want)
			}
			a, err := os.Stat(ours)
			if err != nil {
				t.Fatal(err)
			}
			b, err := os.Stat(theirs)
			if err != nil {
				t.Fatal(err)
			}
			if a.Size() != b.Size() {
				t.Errorf("file size %d, qemu-img's %d", a.Size(), b.Size())
			}
		})
	}
}

func TestCreateOverwritesAndQuiet(t *testing.T) {
	img := filepath.Join(t.TempDir(), "x.raw")
	if err := os.WriteFile(img, pattern(7, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	r := mustRun(t, "create", "-q", "-f", "raw", img, "1M")
	if r.stdout != "" || r.stderr != "" {
		t.Errorf("-q printed %q %q", r.stdout, r.stderr)
	}
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != 1<<20 || b[0] != 0 {
		t.Errorf("existing file not overwritten: %d bytes, first %d", len(b), b[0])
	}
}

func TestOptionHelp(t *testing.T) {
	never := filepath.Join(t.TempDir(), "never.raw")
	for _, args := range [][]string{
		{"create", "-f", "raw", "-o", "help"},
		{"create", "-o", "?"},
		{"create", "-f", "raw", "-o", "help", never, "1M"},
		{"convert", "-O", "raw", "-o", "help"},
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			r := mustRun(t, args...)
			for _, want := range []string{
				"Supported raw options:\n",
				"  preallocation=<str>    - ",
				"allowed values: off, falloc, full",
				"default: off",
				"  size=<size>            - Virtual disk size\n",
			} {
				if !strings.Contains(r.stdout, want) {
					t.Errorf("help lacks %q:\n%s", want, r.stdout)
				}
			}
		})
	}
	if exists(never) {
		t.Error("-o help created the file")
	}
}
