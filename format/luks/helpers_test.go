package luks

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	_ "github.com/vdisk/vdisk/format/raw"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
)

var ctx = context.Background()

// secrets holds the passphrases the tests use, by qemu secret id.
func secrets(kv ...string) *driver.SecretMap {
	s := &driver.SecretMap{}
	for i := 0; i+1 < len(kv); i += 2 {
		s.Set(kv[i], []byte(kv[i+1]))
	}
	return s
}

// createLUKS creates a luks image with vdisk (key-secret=sec0 -> pass).
func createLUKS(t testing.TB, st driver.Storage, name string, size int64, pass string, opts ...string) *vdisk.Disk {
	t.Helper()
	kvs := disktest.KVs(append([]string{"key-secret=sec0", "iter-time=0"}, opts...)...)
	d, err := vdisk.Create(ctx, name, &vdisk.CreateOptions{Format: "luks", Size: size, Options: kvs, Storage: st, Secrets: secrets("sec0", pass)})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// openLUKS opens a luks image with the passphrase pass.
func openLUKS(st driver.Storage, name, pass string, ro bool) (*vdisk.Disk, error) {
	return vdisk.Open(ctx, name, &vdisk.OpenOptions{Format: "luks", ReadOnly: ro, Storage: st,
		Options: []driver.KV{{Key: "key-secret", Value: "sec0"}}, Secrets: secrets("sec0", pass)})
}

func mustOpen(t testing.TB, st driver.Storage, name, pass string, ro bool) *vdisk.Disk {
	t.Helper()
	d, err := openLUKS(st, name, pass, ro)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// imageOpts is qemu's --image-opts for a luks file unlocked by sec0.
func imageOpts(file string) string {
	return "driver=luks,file.filename=" + file + ",key-secret=sec0"
}

func secretObject(pass string) string { return "secret,id=sec0,data=" + pass }

// qemuCreate makes a LUKS1 volume with qemu-img create -f luks (a short
// iter-time, which qemutest.Run retries when qemu's calibration refuses).
func qemuCreate(t testing.TB, file, size, pass, opts string) {
	t.Helper()
	o := "key-secret=sec0,iter-time=50"
	if opts != "" {
		o += "," + opts
	}
	qemutest.Img(t, "create", "-q", "-f", "luks", "--object", secretObject(pass), "-o", o, file, size)
}

// qemuIO runs qemu-io commands on a luks file.
func qemuIO(t testing.TB, file, pass string, cmds ...string) {
	t.Helper()
	args := []string{"--object", secretObject(pass), "--image-opts", imageOpts(file)}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out := qemutest.Run(t, "qemu-io", args...)
	if strings.Contains(out, "error") || strings.Contains(out, "failed") {
		t.Fatalf("qemu-io %v: %s", cmds, out)
	}
}

// qemuRaw decrypts a luks file with qemu-img convert and returns its
// content.
func qemuRaw(t testing.TB, file, pass string) []byte {
	t.Helper()
	out := file + ".qemu.raw"
	qemutest.Img(t, "convert", "--object", secretObject(pass), "--image-opts", imageOpts(file), "-O", "raw", out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(out)
	return b
}

func requireCryptsetup(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("cryptsetup"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("cryptsetup not found: test.sh installs cryptsetup-bin")
		}
		t.Skip("cryptsetup not installed")
	}
}
