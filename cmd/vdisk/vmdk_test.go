package main

import (
	"encoding/json"
	"path/filepath"
	"testing"
)

// TestVMDKConvert converts a raw image into every VMDK subformat through
// the CLI: qemu-img check is clean, the copy compares equal, info reports
// the subformat, and converting back gives the same bytes.
func TestVMDKConvert(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	mustQemu(t, "qemu-img", "create", "-q", "-f", "raw", src, "12M")
	mustQemu(t, "qemu-io", "-f", "raw", "-c", "write -P 0x3c 64k 1M", "-c", "write -P 0x7e 5M 300k", "-c", "write -P 0x01 12224k 64k", src)
	for _, sub := range []string{"monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized"} {
		t.Run(sub, func(t *testing.T) {
			out := filepath.Join(dir, sub+".vmdk")
			r := mustRun(t, "convert", "-O", "vmdk", "-o", "subformat="+sub, src, out)
			if r.stderr != "" {
				t.Errorf("stderr %q", r.stderr)
			}
			if msg, code := runQemu(t, "qemu-img", "check", "-f", "vmdk", out); code != 0 {
				t.Errorf("qemu-img check: exit %d: %s", code, msg)
			}
			if msg, code := runQemu(t, "qemu-img", "compare", "-f", "raw", "-F", "vmdk", src, out); code != 0 {
				t.Errorf("qemu-img compare: %s", msg)
			}
			var info struct {
				Format   string `json:"format"`
				Specific struct {
					Data struct {
						CreateType string `json:"create-type"`
					} `json:"data"`
				} `json:"format-specific"`
			}
			if err := json.Unmarshal([]byte(mustRun(t, "info", "--output", "json", out).stdout), &info); err != nil {
				t.Fatal(err)
			}
			if info.Format != "vmdk" || info.Specific.Data.CreateType != sub {
				t.Errorf("info: format %q create-type %q", info.Format, info.Specific.Data.CreateType)
			}
			back := filepath.Join(dir, sub+".raw")
			mustRun(t, "convert", "-O", "raw", out, back)
			if msg, code := runQemu(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, back); code != 0 {
				t.Errorf("back to raw: %s", msg)
			}
		})
	}
}
