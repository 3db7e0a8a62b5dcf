package luks

import (
	"bytes"
	"crypto/aes"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/crypto/xts"

	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/osfs"
)

// volumeKey is the key cryptsetup recovers from file with pass.
func volumeKey(t *testing.T, file, pass string) []byte {
	t.Helper()
	kf := filepath.Join(t.TempDir(), "kf")
	os.WriteFile(kf, []byte(pass), 0o600)
	out := qemutest.Run(t, "cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", kf, file)
	var hx strings.Builder
	in := false
	for _, line := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && line != "" && line[0] != '\t' && line[0] != ' ' {
			if in = strings.HasPrefix(k, "MK dump") || strings.HasPrefix(k, "Volume key"); in {
				line = v
			}
		}
		if in {
			hx.WriteString(strings.ReplaceAll(strings.TrimSpace(line), " ", ""))
		}
	}
	key, err := hex.DecodeString(hx.String())
	if err != nil || len(key) == 0 {
		t.Fatalf("no key in luksDump output: %v\n%s", err, out)
	}
	return key
}

// decryptXTS decrypts the payload of file with an independent AES-XTS
// (golang.org/x/crypto/xts) and the key cryptsetup recovered; IVs are
// plain64 in sector units.
func decryptXTS(t *testing.T, file string, key []byte, payload int64, sector int) []byte {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	c, err := xts.NewCipher(aes.NewCipher, key)
	if err != nil {
		t.Fatal(err)
	}
	ct := b[payload:]
	pt := make([]byte, len(ct))
	for i := 0; i+sector <= len(ct); i += sector {
		c.Decrypt(pt[i:i+sector], ct[i:i+sector], uint64(i/sector))
	}
	return pt
}

// TestIndependentXTS: the sectors vdisk writes (LUKS2, 4096-byte sectors,
// and LUKS1) decrypt with an independent AES-XTS under the volume key
// cryptsetup recovers from the header; cryptsetup accepts the right
// passphrase only. (TestReadsQemuImages does the same for qemu's.)
func TestIndependentXTS(t *testing.T) {
	requireCryptsetup(t)
	dir := t.TempDir()
	for _, c := range []struct {
		name   string
		opts   []string
		sector int
	}{
		{"luks2-4096", []string{"luks-version=2", "sector-size=4096"}, 4096},
		{"luks2-512", []string{"luks-version=2", "hash-alg=sha512"}, 512},
		{"luks2-argon2id", []string{"luks-version=2", "pbkdf=argon2id", "pbkdf-memory=256", "pbkdf-parallel=2"}, 512},
		{"luks1", nil, 512},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := filepath.Join(dir, c.name+".luks")
			size := int64(1 << 20)
			d := createLUKS(t, osfs.New(), f, size, "xts pass", c.opts...)
			want := make([]byte, size)
			p := disktest.Fill(300000, 0)
			for i := range p {
				p[i] = byte(i * 7)
			}
			disktest.MustWrite(t, d, nil, p, 12345)
			copy(want[12345:], p)
			payload := d.Top().Info().Specific.(*Specific).PayloadOffset
			disktest.MustClose(t, d)
			kf := filepath.Join(dir, "kf")
			os.WriteFile(kf, []byte("xts pass"), 0o600)
			qemutest.Run(t, "cryptsetup", "open", "--test-passphrase", "--key-file", kf, f)
			os.WriteFile(kf, []byte("xts pass?"), 0o600)
			if out, code, _ := qemutest.RunCode("cryptsetup", "open", "--test-passphrase", "--key-file", kf, f); code == 0 {
				t.Fatalf("cryptsetup accepted a wrong passphrase\n%s", out)
			}
			if got := decryptXTS(t, f, volumeKey(t, f, "xts pass"), payload, c.sector); !bytes.Equal(got, want) {
				t.Fatal("independent XTS decryption differs")
			}
		})
	}
}
