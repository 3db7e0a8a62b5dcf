package main

import (
	"bytes"
	"encoding/json"
	"path/filepath"
	"slices"
	"testing"

	"github.com/vdisk/vdisk/storage/osfs"
)

// TestConvertOutputJSON: convert --output json prints one object of copy
// statistics with the documented names; the data (64 KiB) of a raw or
// dynamic VHD source is offloaded to a raw target with -C (and without it
// where the file system copies on its own), read and written with
// --no-offload or, without -C, on a file system whose copy_file_range is
// a page-cache copy, and read and written to a non-raw target; the byte counts
// add up to the virtual size.
func TestConvertOutputJSON(t *testing.T) {
	dir := t.TempDir()
	ref := qemuSparseRaw(t, dir)
	vhd := filepath.Join(dir, "ref.vhd")
	mustQemu(t, "qemu-img", "convert", "-q", "-f", "raw", "-O", "vpc", ref, vhd)
	const data = 64 << 10
	fsCopies, err := osfs.FileSystemCopies(dir)
	if err != nil {
		t.Fatal(err)
	}
	keys := []string{"copy-file-range-bytes", "elapsed-seconds", "offloaded-bytes", "read-bytes", "reflinked-bytes",
		"skipped-bytes", "written-bytes", "zero-bytes"}
	for _, c := range []struct {
		name, src, srcFmt, dstFmt string
		extra                     []string
		offload                   bool
	}{
		{"raw", ref, "raw", "raw", []string{"-C"}, true},
		{"vpc", vhd, "vpc", "raw", []string{"-C"}, true},
		// Without -C the kernel copies only on a file system that copies
		// on its own (reflinks, server-side copies).
		{"raw-auto", ref, "raw", "raw", nil, fsCopies},
		{"vpc-auto", vhd, "vpc", "raw", nil, fsCopies},
		{"raw-no-offload", ref, "raw", "raw", []string{"--no-offload"}, false},
		{"vpc-no-offload", vhd, "vpc", "raw", []string{"--no-offload"}, false},
		{"raw-to-qcow2", ref, "raw", "qcow2", nil, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			out := filepath.Join(dir, c.name+".out")
			args := append([]string{"convert", "--output", "json", "-f", c.srcFmt, "-O", c.dstFmt}, c.extra...)
			r := mustRun(t, append(args, c.src, out)...)
			var m map[string]json.Number
			dec := json.NewDecoder(bytes.NewReader([]byte(r.stdout)))
			dec.UseNumber()
			if err := dec.Decode(&m); err != nil {
				t.Fatalf("stdout %q: %v", r.stdout, err)
			}
			var got []string
			for k := range m {
				got = append(got, k)
			}
			slices.Sort(got)
			if !slices.Equal(got, keys) {
				t.Fatalf("keys %v, want %v", got, keys)
			}
			n := func(k string) int64 {
				v, err := m[k].Int64()
				if err != nil {
					t.Fatalf("%s: %v", k, err)
				}
				return v
			}
			if e, err := m["elapsed-seconds"].Float64(); err != nil || e <= 0 {
				t.Fatalf("elapsed-seconds %v (%v)", m["elapsed-seconds"], err)
			}
			// The virtual size (a VHD's is rounded to its geometry).
			size := int64(64 << 20)
			if c.srcFmt == "vpc" {
				size = 67125248
			}
			if s := n("written-bytes") + n("offloaded-bytes") + n("zero-bytes") + n("skipped-bytes"); s != size {
				t.Fatalf("%s: counts add up to %d, want %d", r.stdout, s, size)
			}
			if n("reflinked-bytes")+n("copy-file-range-bytes") != n("offloaded-bytes") {
				t.Fatalf("%s: reflinked + copy_file_range != offloaded", r.stdout)
			}
			if c.offload {
				// (A VHD's data area is not 4 KiB-aligned in its file: the
				// file's holes cut the runs a little wider, and the zero
				// fragments at their ends are read, found zero, skipped.)
				// (qemu-img create writes the first 4 KiB of a raw file,
				// which its Status then calls data.)
				want := int64(data)
				if c.srcFmt == "raw" {
					want += 4096
				}
				if n("offloaded-bytes") != want || n("read-bytes") != 0 || n("written-bytes") != 0 {
					t.Fatalf("%s: want %d bytes offloaded, none read or written", r.stdout, data)
				}
			} else if n("offloaded-bytes") != 0 || n("written-bytes") < data || n("read-bytes") < n("written-bytes") {
				t.Fatalf("%s: want nothing offloaded, %d bytes read and written", r.stdout, data)
			}
			if got, code := runQemu(t, "qemu-img", "compare", "-f", "raw", "-F", c.dstFmt, ref, out); code != 0 {
				t.Fatalf("qemu-img compare: exit %d, %q", code, got)
			}
		})
	}
	if r := vdiskRun(t, "convert", "--output", "yaml", ref, filepath.Join(dir, "x.raw")); r.code != 1 || r.stdout != "" {
		t.Fatalf("--output yaml: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
}
