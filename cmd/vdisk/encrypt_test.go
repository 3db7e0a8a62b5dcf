package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestEncryptedQcow2CLI: create and convert into an encrypted qcow2 with
// qemu's --object secret and -o encrypt.* options, convert back out of it
// with --image-opts; info prints what qemu-img info prints (encrypted,
// format-specific encrypt object); qemu reads the images with the secret,
// and a wrong secret is a clear error.
func TestEncryptedQcow2CLI(t *testing.T) {
	dir := t.TempDir()
	sec := filepath.Join(dir, "secret")
	if err := os.WriteFile(sec, []byte("cli pass"), 0o600); err != nil {
		t.Fatal(err)
	}
	obj := "secret,id=sec0,file=" + sec
	enc := "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"
	src := filepath.Join(dir, "src.raw")
	sparseRaw(t, src, 4<<20, map[int64][]byte{0: pattern(0xaa, 70000), 3 << 20: pattern(0x55, 5000)})
	want, _ := os.ReadFile(src)

	created := filepath.Join(dir, "created.qcow2")
	mustRun(t, "create", "-q", "-f", "qcow2", "--object", obj, "-o", enc+",cluster_size=4k", created, "1M")
	conv := filepath.Join(dir, "conv.qcow2")
	mustRun(t, "convert", "-O", "qcow2", "--object", obj, "-o", enc, src, conv)
	for _, img := range []string{created, conv} {
		for _, args := range [][]string{{"info", img}, {"info", "--output", "json", img}} {
			ours := withoutAllocation(mustRun(t, args...).stdout)
			theirs := withoutAllocation(mustQemu(t, "qemu-img", args...))
			if ours != theirs {
				t.Errorf("vdisk %v:\n%s\nqemu-img:\n%s", args, ours, theirs)
			}
			if !strings.Contains(ours, "encrypted") {
				t.Errorf("vdisk %v does not say encrypted:\n%s", args, ours)
			}
		}
		opts := "driver=qcow2,file.filename=" + img + ",encrypt.key-secret=sec0"
		if out, code := runQemu(t, "qemu-img", "check", "--object", obj, "--image-opts", opts); code != 0 {
			t.Errorf("qemu-img check %s: exit %d\n%s", img, code, out)
		}
	}
	opts := "driver=qcow2,file.filename=" + conv + ",encrypt.key-secret=sec0"
	mustQemu(t, "qemu-img", "compare", "--object", obj, "--image-opts", opts, "driver=raw,file.filename="+src)
	back := filepath.Join(dir, "back.raw")
	mustRun(t, "convert", "-O", "raw", "--object", obj, "--image-opts", opts, back)
	if got, _ := os.ReadFile(back); !bytes.Equal(got, want) {
		t.Fatal("converted back out of the encrypted image: content differs")
	}
	// Wrong secret: a clear error, exit 1.
	bad := filepath.Join(dir, "bad")
	os.WriteFile(bad, []byte("wrong"), 0o600)
	r := vdiskRun(t, "convert", "-O", "raw", "--object", "secret,id=sec0,file="+bad, "--image-opts", opts, back)
	if r.code == 0 || !strings.Contains(r.stderr, "passphrase") {
		t.Errorf("wrong secret: exit %d, %q", r.code, r.stderr)
	}
	// The legacy scheme cannot be created.
	r = vdiskRun(t, "create", "-f", "qcow2", "--object", obj, "-o", "encrypt.format=aes,encrypt.key-secret=sec0", filepath.Join(dir, "aes.qcow2"), "1M")
	if r.code == 0 || !strings.Contains(r.stderr, "insecure") {
		t.Errorf("encrypt.format=aes: exit %d, %q", r.code, r.stderr)
	}
}
