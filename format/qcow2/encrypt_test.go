package qcow2_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/format/qcow2"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/luks"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// qemuEncrypted makes an encrypted qcow2 with qemu-img and writes to it
// with qemu-io; it returns the content qemu reads.
func qemuEncrypted(t *testing.T, file, pass, opts string, cmds ...string) []byte {
	t.Helper()
	obj := "secret,id=sec0,data=" + pass
	qemutest.Img(t, "create", "-q", "-f", "qcow2", "--object", obj, "-o", opts+",encrypt.key-secret=sec0", file, "4M")
	img := "driver=qcow2,file.filename=" + file + ",encrypt.key-secret=sec0"
	args := []string{"--object", obj, "--image-opts", img}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	if out := qemutest.Run(t, "qemu-io", args...); strings.Contains(out, "error") || strings.Contains(out, "failed") {
		t.Fatalf("qemu-io: %s", out)
	}
	raw := file + ".raw"
	qemutest.Img(t, "convert", "--object", obj, "--image-opts", img, "-O", "raw", raw)
	b, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func openEncrypted(file, pass string) (*vdisk.Disk, error) {
	sm := &driver.SecretMap{}
	sm.Set("sec0", []byte(pass))
	return vdisk.Open(ctx, file, &vdisk.OpenOptions{Format: "qcow2", ReadOnly: true, Secrets: sm,
		Options: []driver.KV{{Key: "encrypt.key-secret", Value: "sec0"}}})
}

// TestReadEncrypted: qcow2 images qemu encrypts (LUKS with two ciphers,
// and the legacy AES scheme) and writes read bit-exact in vdisk with the
// passphrase, and only with it; LUKS ones open read-write, legacy AES
// ones only read-only.
func TestReadEncrypted(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	cmds := []string{"write -P 0xa1 0 64k", "write -P 0xa2 1000k 100k", "write -z 2M 64k", "write -P 0xa3 3145728 1536"}
	for _, c := range []struct{ name, opts string }{
		{"luks-xts", "encrypt.format=luks,encrypt.iter-time=50"},
		{"luks-cbc-essiv", "encrypt.format=luks,encrypt.iter-time=50,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,cluster_size=4k"},
		{"aes", "encrypt.format=aes"},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := filepath.Join(dir, c.name+".qcow2")
			want := qemuEncrypted(t, f, "qcow pass", c.opts, cmds...)
			d, err := openEncrypted(f, "qcow pass")
			if err != nil {
				t.Fatal(err)
			}
			if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
				t.Fatalf("content differs from qemu's at %d", firstDiff(got, want))
			}
			checkStatus(t, d, want)
			enc := d.Top().Info().Specific.(*qcow2.Specific).Encrypt
			if wantFmt := strings.TrimPrefix(strings.Split(c.opts, ",")[0], "encrypt.format="); enc["format"] != wantFmt {
				t.Fatalf("info encrypt %v, want format %s", enc, wantFmt)
			}
			disktest.MustClose(t, d)
			if c.name == "aes" {
				// The legacy scheme is read-only, and has no check: a
				// wrong key reads noise.
				sm := &driver.SecretMap{}
				sm.Set("sec0", []byte("qcow pass"))
				if _, err := vdisk.Open(ctx, f, &vdisk.OpenOptions{Format: "qcow2", Secrets: sm,
					Options: []driver.KV{{Key: "encrypt.key-secret", Value: "sec0"}}}); !errors.Is(err, driver.ErrUnsupported) {
					t.Fatalf("read-write open of a legacy AES image: %v", err)
				}
				return
			}
			if _, err := openEncrypted(f, "wrong"); !errors.Is(err, luks.ErrPassphrase) {
				t.Fatalf("wrong passphrase: %v", err)
			}
			sm := &driver.SecretMap{}
			sm.Set("sec0", []byte("qcow pass"))
			if d, err := vdisk.Open(ctx, f, &vdisk.OpenOptions{Format: "qcow2", Secrets: sm,
				Options: []driver.KV{{Key: "encrypt.key-secret", Value: "sec0"}}}); err != nil {
				t.Fatalf("read-write open: %v", err)
			} else {
				disktest.MustClose(t, d)
			}
			if d, err := vdisk.Open(ctx, f, &vdisk.OpenOptions{Format: "qcow2", InfoOnly: true}); err != nil {
				t.Fatalf("info without a key: %v", err)
			} else {
				d.Close()
			}
			// A hostile encryption header pointer: past the end, huge,
			// misaligned.
			good, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			at := bytes.Index(good[:4096], []byte{0x05, 0x37, 0xbe, 0x77})
			if at < 0 {
				t.Fatal("no encryption header extension")
			}
			for _, m := range []struct {
				field int
				v     uint64
			}{{8, 1 << 40}, {16, 1 << 40}, {8, 512}, {16, 0}} {
				b := append([]byte(nil), good...)
				binary.BigEndian.PutUint64(b[at+m.field:], m.v)
				h := filepath.Join(dir, "hostile.qcow2")
				os.WriteFile(h, b, 0o600)
				if _, err := openEncrypted(h, "qcow pass"); !errors.Is(err, driver.ErrCorrupt) {
					t.Fatalf("extension field %d = %d: %v", m.field, m.v, err)
				}
			}
		})
	}
}
