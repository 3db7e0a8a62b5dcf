package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vdisk/vdisk/nbd"
)

// untrustedTree builds hostile images with qemu-img in dir/img, naming
// files in dir/out: a qcow2 with an absolute external data file, a
// monolithicFlat VMDK whose descriptor (edited as text) names an extent
// outside, and a qcow2 whose backing file climbs out with "..". The
// outside files hold 0x5a, 0x99 and 0x3c in their first 64 KiB.
func untrustedTree(t *testing.T) (img, out string) {
	t.Helper()
	root := t.TempDir()
	img, out = filepath.Join(root, "img"), filepath.Join(root, "out")
	for _, d := range []string{img, out} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	run := func(name string, args ...string) {
		t.Helper()
		cmd := exec.Command(qemu(t, name), args...)
		cmd.Dir = img
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, b)
		}
	}
	run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(out, "data.raw")+",data_file_raw=on", "data.qcow2", "1M")
	run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", "data.qcow2")
	if err := os.WriteFile(filepath.Join(out, "secret.raw"), bytes.Repeat([]byte{0x99}, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	run("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", "ext.vmdk", "1M")
	desc := filepath.Join(img, "ext.vmdk")
	b, err := os.ReadFile(desc)
	if err != nil {
		t.Fatal(err)
	}
	text := strings.Replace(string(b), `"ext-flat.vmdk"`, `"`+filepath.Join(out, "secret.raw")+`"`, 1)
	if text == string(b) {
		t.Fatalf("no extent line in\n%s", b)
	}
	os.WriteFile(desc, []byte(text), 0o644)
	os.Remove(filepath.Join(img, "ext-flat.vmdk"))
	// A split sparse VMDK whose extent was moved out of the directory:
	// info must still describe it without reading the extent's header.
	run("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", "sparse.vmdk", "1M")
	sdesc := filepath.Join(img, "sparse.vmdk")
	sb, err := os.ReadFile(sdesc)
	if err != nil {
		t.Fatal(err)
	}
	stext := strings.Replace(string(sb), `"sparse-s001.vmdk"`, `"../out/sparse-s001.vmdk"`, 1)
	if stext == string(sb) {
		t.Fatalf("no sparse extent line in\n%s", sb)
	}
	os.WriteFile(sdesc, []byte(stext), 0o644)
	if err := os.Rename(filepath.Join(img, "sparse-s001.vmdk"), filepath.Join(out, "sparse-s001.vmdk")); err != nil {
		t.Fatal(err)
	}
	run("qemu-img", "create", "-q", "-f", "qcow2", "../out/base.qcow2", "1M")
	run("qemu-io", "-f", "qcow2", "-c", "write -P 0x3c 0 64k", "../out/base.qcow2")
	run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "../out/base.qcow2", "-F", "qcow2", "top.qcow2")
	return img, out
}

func sums(t *testing.T, dir string) map[string]string {
	t.Helper()
	m := map[string]string{}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		m[e.Name()] = fmt.Sprintf("%x %v", sha256.Sum256(b), fi.ModTime())
	}
	return m
}

type refJSON struct {
	Field, Name, Path, Refused string
}

// TestInfoUntrusted: `vdisk info --untrusted --output json` opens nothing
// outside the image's directory, still describes the images, and lists
// every file name they record, refused ones marked.
func TestInfoUntrusted(t *testing.T) {
	img, out := untrustedTree(t)
	before := sums(t, out)
	cases := []struct {
		image, format, field, name, refused string
	}{
		{"data.qcow2", "qcow2", "data file", filepath.Join(out, "data.raw"), "is an absolute path outside the image's directory"},
		{"ext.vmdk", "vmdk", "extent file", filepath.Join(out, "secret.raw"), "is an absolute path outside the image's directory"},
		{"top.qcow2", "qcow2", "backing file", "../out/base.qcow2", "leaves the image's directory"},
		{"sparse.vmdk", "vmdk", "extent file", "../out/sparse-s001.vmdk", "leaves the image's directory"},
	}
	for _, c := range cases {
		for _, f := range []string{"", c.format} {
			args := []string{"--untrusted", "info", "--output", "json"}
			if f != "" {
				args = append(args, "-f", f)
			}
			r := mustRun(t, append(args, filepath.Join(img, c.image))...)
			var info struct {
				Format   string    `json:"format"`
				Backing  string    `json:"backing-filename"`
				Full     string    `json:"full-backing-filename"`
				Refs     []refJSON `json:"external-references"`
				Specific struct {
					Data struct {
						DataFile string `json:"data-file"`
						Extents  []struct {
							Filename string `json:"filename"`
						} `json:"extents"`
					} `json:"data"`
				} `json:"format-specific"`
			}
			if err := json.Unmarshal([]byte(r.stdout), &info); err != nil {
				t.Fatalf("%s: %v\n%s", c.image, err, r.stdout)
			}
			if info.Format != c.format {
				t.Errorf("%s: format %q", c.image, info.Format)
			}
			if len(info.Refs) != 1 || info.Refs[0].Field != c.field || info.Refs[0].Name != c.name || info.Refs[0].Refused != c.refused {
				t.Errorf("%s: external-references %+v, want one %s %q refused (%s)", c.image, info.Refs, c.field, c.name, c.refused)
			}
			switch c.field {
			case "data file":
				if info.Specific.Data.DataFile != c.name {
					t.Errorf("%s: data-file %q", c.image, info.Specific.Data.DataFile)
				}
			case "extent file":
				if len(info.Specific.Data.Extents) != 1 || !strings.HasSuffix(info.Specific.Data.Extents[0].Filename, filepath.Base(c.name)) {
					t.Errorf("%s: extents %+v", c.image, info.Specific.Data.Extents)
				}
			case "backing file":
				if info.Backing != c.name || info.Full == "" {
					t.Errorf("%s: backing-filename %q full %q", c.image, info.Backing, info.Full)
				}
			}
		}
		// Without --untrusted (a local, trusted command) there is no
		// such key: the output stays qemu-img's.
		if r := mustRun(t, "info", "--output", "json", filepath.Join(img, c.image)); strings.Contains(r.stdout, "external-references") {
			t.Errorf("%s: external-references without --untrusted", c.image)
		}
	}
	if after := sums(t, out); !equalMaps(before, after) {
		t.Error("files outside the image directory changed")
	}
}

func equalMaps(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// TestInfoUntrustedProbe: under --untrusted an unknown file is not guessed
// raw, and -f is the only format tried.
func TestInfoUntrustedProbe(t *testing.T) {
	dir := t.TempDir()
	name := filepath.Join(dir, "upload")
	if err := os.WriteFile(name, bytes.Repeat([]byte("junk"), 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	r := vdiskRun(t, "--untrusted", "info", "--output", "json", name)
	if r.code == 0 || !strings.Contains(r.stderr, "not opened as raw by guessing") {
		t.Errorf("unknown file without -f: exit %d, stderr %q", r.code, r.stderr)
	}
	oneErrorLine(t, r, "vdisk info")
	if r := vdiskRun(t, "--untrusted", "info", "-f", "qcow2", name); r.code == 0 {
		t.Error("-f qcow2 opened a file that is not qcow2")
	}
	if r := mustRun(t, "--untrusted", "info", "--output", "json", "-f", "raw", name); !strings.Contains(r.stdout, `"format": "raw"`) {
		t.Errorf("-f raw: %s", r.stdout)
	}
	// A qcow2 file is recognised, so nothing is guessed.
	img, _ := untrustedTree(t)
	if r := mustRun(t, "--untrusted", "info", filepath.Join(img, "top.qcow2")); !strings.Contains(r.stdout, "file format: qcow2") ||
		!strings.Contains(r.stdout, `external reference: backing file "../out/base.qcow2" (refused: leaves the image's directory)`) {
		t.Errorf("human output: %s", r.stdout)
	}
}

// TestUntrustedCommands: --untrusted refuses to read through the hostile
// images (naming image, field and path) and writes nothing outside; the
// same commands without it (local, trusted as qemu-img) read the data.
func TestUntrustedCommands(t *testing.T) {
	img, out := untrustedTree(t)
	before := sums(t, out)
	cases := []struct {
		image, field, name string
		fill               byte
	}{
		{"data.qcow2", "data file", filepath.Join(out, "data.raw"), 0x5a},
		{"ext.vmdk", "extent file", filepath.Join(out, "secret.raw"), 0x99},
		{"top.qcow2", "backing file", "../out/base.qcow2", 0x3c},
	}
	for _, c := range cases {
		src := filepath.Join(img, c.image)
		dst := filepath.Join(t.TempDir(), "out.raw")
		for _, args := range [][]string{
			{"--untrusted", "convert", "-O", "raw", src, dst},
			{"--untrusted", "map", "--output", "json", src},
			{"--untrusted", "check", src},
			{"--untrusted", "resize", src, "2M"},
			{"--untrusted", "info", "--backing-chain", src},
		} {
			if c.field != "backing file" && args[1] == "info" {
				continue // info opens these, see TestInfoUntrusted
			}
			if args[1] == "check" && c.image == "ext.vmdk" {
				args = []string{"--untrusted", "check", "-f", "vmdk", src}
			}
			r := vdiskRun(t, args...)
			if r.code == 0 {
				t.Errorf("vdisk %s succeeded", strings.Join(args, " "))
				continue
			}
			for _, want := range []string{c.image, c.field, c.name, "strict path policy"} {
				if !strings.Contains(r.stderr, want) {
					t.Errorf("vdisk %s: stderr %q does not mention %q", strings.Join(args, " "), r.stderr, want)
				}
			}
			if exists(dst) {
				t.Errorf("vdisk %s left %s", strings.Join(args, " "), dst)
			}
		}
		mustRun(t, "convert", "-O", "raw", src, dst)
		b, err := os.ReadFile(dst)
		if err != nil || !bytes.Equal(b[:64<<10], bytes.Repeat([]byte{c.fill}, 64<<10)) {
			t.Errorf("trusted convert of %s: %v", c.image, err)
		}
	}
	if after := sums(t, out); !equalMaps(before, after) {
		t.Error("files outside the image directory changed")
	}
}

// TestServeUntrustedPaths: `vdisk serve` follows image-recorded names only
// under the strict policy unless --allow-unsafe-paths; it then serves the
// data as qemu-nbd would.
func TestServeUntrustedPaths(t *testing.T) {
	img, out := untrustedTree(t)
	before := sums(t, out)
	for _, c := range []struct {
		image, field string
		fill         byte
	}{
		{"data.qcow2", "data file", 0x5a},
		{"ext.vmdk", "extent file", 0x99},
		{"top.qcow2", "backing file", 0x3c},
	} {
		src := filepath.Join(img, c.image)
		sock := sockPath(t)
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		r := runServe(ctx, "-k", sock, "-r", src)
		cancel()
		if r.code == 0 || !strings.Contains(r.stderr, c.field) || !strings.Contains(r.stderr, "strict path policy") {
			t.Errorf("serve %s: exit %d, stderr %q; want a refusal of the %s", c.image, r.code, r.stderr, c.field)
		}
		if r := runServe(context.Background(), "-k", sock, "--allow-unsafe-paths", "--untrusted", src); r.code == 0 {
			t.Error("--allow-unsafe-paths with --untrusted accepted")
		}
		startServe(t, sockReady(sock), "-k", sock, "-r", "-t", "--allow-unsafe-paths", src)
		ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
		cl, err := nbd.Dial(ctx, "unix", sock, nil)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 64<<10)
		if _, err := cl.ReadAt(b, 0); err != nil || !bytes.Equal(b, bytes.Repeat([]byte{c.fill}, 64<<10)) {
			t.Errorf("serve --allow-unsafe-paths %s: read %v", c.image, err)
		}
		cl.Close()
	}
	if after := sums(t, out); !equalMaps(before, after) {
		t.Error("files outside the image directory changed")
	}
}
