package main

import (
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// TestMapLikeQemu: on a sparse raw file (holes made by the test, so the
// file system decides nothing), vdisk map prints byte for byte what
// qemu-img map prints, for whole files, ranges and a start past the end.
func TestMapLikeQemu(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.raw")
	sparseRaw(t, img, 64<<20, map[int64][]byte{
		1 << 20: pattern(0xaa, 64<<10),
		8 << 20: pattern(0x55, 4<<10),
	})
	for _, args := range [][]string{
		{"map", "-f", "raw", "--output", "json", img},
		{"map", "-f", "raw", "--output", "json", "--start-offset", "1M", "--max-length", "100k", img},
		{"map", "-f", "raw", "--output", "json", "--start-offset", "1G", img},
		{"map", "-f", "raw", img},
	} {
		t.Run(strings.Join(args[3:len(args)-1], " "), func(t *testing.T) {
			ours := mustRun(t, args...).stdout
			theirs := mustQemu(t, "qemu-img", args...)
			if ours != theirs {
				t.Errorf("vdisk %v:\n%s\nqemu-img:\n%s", args, ours, theirs)
			}
		})
	}
}

// TestMapMatchesQemu: same JSON (parsed) and same human output as qemu-img
// map on the same files.
func TestMapMatchesQemu(t *testing.T) {
	dir := t.TempDir()
	ref := qemuSparseRaw(t, dir)
	mine := filepath.Join(dir, "mine.raw")
	sparseRaw(t, mine, 32<<20+1000, map[int64][]byte{
		0:        pattern(1, 512),
		4 << 20:  pattern(2, 128<<10),
		32 << 20: pattern(3, 1000),
	})
	tests := []struct {
		name string
		args []string // between "map" and the file
		img  string
	}{
		{"qemu-made", nil, ref},
		{"range", []string{"--start-offset", "1M", "--max-length", "100k"}, ref},
		{"start-in-data", []string{"--start-offset", "1056768"}, ref},
		{"past-end", []string{"--start-offset", "1G"}, ref},
		{"unaligned-tail", nil, mine},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for _, out := range []string{"json", "human"} {
				args := append(append([]string{"map", "-f", "raw", "--output", out}, tc.args...), tc.img)
				ours := mustRun(t, args...).stdout
				theirs := mustQemu(t, "qemu-img", args...)
				if out == "json" {
					if !reflect.DeepEqual(parseJSON(t, ours), parseJSON(t, theirs)) {
						t.Errorf("map --output json differs\nvdisk:\n%s\nqemu-img:\n%s", ours, theirs)
					}
					if ours != theirs {
						t.Errorf("map --output json not byte-identical\nvdisk:\n%q\nqemu-img:\n%q", ours, theirs)
					}
				} else if ours != theirs {
					t.Errorf("map human output differs\nvdisk:\n%s\nqemu-img:\n%s", ours, theirs)
				}
			}
		})
	}
}
