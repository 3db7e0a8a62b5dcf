package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestCLIVBoxEncrypt: convert makes a VirtualBox-encrypted VDI and writes
// the medium's <HardDisk> element; compare opens it through --image-opts
// with keystore= (that file) and key-secret=, and only with the password.
func TestCLIVBoxEncrypt(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	sparseRaw(t, src, 4<<20, map[int64][]byte{0: pattern(0xaa, 70000), 3 << 20: pattern(0x55, 4096)})
	dst := filepath.Join(dir, "enc.vdi")
	props := filepath.Join(dir, "props.xml")
	pw := filepath.Join(dir, "pw")
	if err := os.WriteFile(pw, []byte("hunter2"), 0o600); err != nil {
		t.Fatal(err)
	}
	mustRun(t, "convert", "--object", "secret,id=sec0,file="+pw, "-f", "raw", "-O", "vdi",
		"-o", "vbox-encrypt=AES-XTS128-PLAIN64,key-secret=sec0,vbox-keystore-out="+props, src, dst)
	b, err := os.ReadFile(props)
	if err != nil || !strings.Contains(string(b), `name="CRYPT/KeyStore" value="U0NORQAB`) || !strings.Contains(string(b), `name="CRYPT/KeyId" value="sec0"`) {
		t.Fatalf("properties file: %q, %v", b, err)
	}
	r := mustRun(t, "compare", "--object", "secret,id=sec0,file="+pw, "--image-opts",
		"driver=raw,file.filename="+src, "driver=vdi,file.filename="+dst+",keystore="+props+",key-secret=sec0")
	if !strings.Contains(r.stdout, "identical") {
		t.Fatalf("compare: %q", r.stdout)
	}
	// Without the key the container reads as ciphertext: different.
	if r := vdiskRun(t, "compare", "-f", "raw", "-F", "vdi", src, dst); r.code != 1 {
		t.Fatalf("compare without the key: exit %d, %q %q", r.code, r.stdout, r.stderr)
	}
	r = vdiskRun(t, "compare", "--object", "secret,id=sec0,data=wrong", "--image-opts",
		"driver=raw,file.filename="+src, "driver=vdi,file.filename="+dst+",keystore="+props+",key-secret=sec0")
	oneErrorLine(t, r, "vdisk compare")
	if !strings.Contains(r.stderr, "does not unlock the VirtualBox key store") {
		t.Fatalf("wrong password: %q", r.stderr)
	}
	// Incomplete options are refused before anything is created.
	r = vdiskRun(t, "convert", "--object", "secret,id=sec0,file="+pw, "-f", "raw", "-O", "vdi",
		"-o", "vbox-encrypt=AES-XTS256-PLAIN64,key-secret=sec0", src, filepath.Join(dir, "x.vdi"))
	oneErrorLine(t, r, "vdisk convert")
	if exists(filepath.Join(dir, "x.vdi")) {
		t.Fatal("a refused convert left a file")
	}
}
