package luks

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vdisk/vdisk/internal/qemutest"
)

func openFile(t testing.TB, name string) (*os.File, int64) {
	t.Helper()
	f, err := os.OpenFile(name, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	return f, st.Size()
}

// TestCryptsetupLUKS2 reads LUKS2 headers cryptsetup made (PBKDF2 and
// Argon2 key slots, 512- and 4096-byte sectors, two slots): the volume key
// vdisk recovers equals luksDump --dump-volume-key's, and a wrong
// passphrase opens nothing.
func TestCryptsetupLUKS2(t *testing.T) {
	requireCryptsetup(t)
	for _, c := range []struct {
		name string
		args []string
	}{
		{"pbkdf2-sha256-512", []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--sector-size", "512"}},
		{"pbkdf2-sha512-4096", []string{"--pbkdf", "pbkdf2", "--hash", "sha512", "--pbkdf-force-iterations", "1200", "--sector-size", "4096"}},
		{"argon2id", []string{"--pbkdf", "argon2id", "--pbkdf-memory", "64", "--pbkdf-force-iterations", "4", "--pbkdf-parallel", "2"}},
		{"argon2i-aes128", []string{"--pbkdf", "argon2i", "--pbkdf-memory", "32", "--pbkdf-force-iterations", "4", "--pbkdf-parallel", "1", "--key-size", "256"}},
		{"cbc-essiv", []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--cipher", "aes-cbc-essiv:sha256", "--key-size", "256"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := filepath.Join(t.TempDir(), "v.img")
			if err := os.WriteFile(f, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			os.Truncate(f, 20<<20)
			args := append([]string{"luksFormat", "--type", "luks2", "--batch-mode", "--key-file", keyFile(t, "right horse")}, c.args...)
			if out, code := cryptsetup(t, append(args, f)...); code != 0 {
				t.Fatalf("luksFormat: %d\n%s", code, out)
			}
			kf := keyFile(t, "second pass")
			if out, code := cryptsetup(t, "luksAddKey", "--batch-mode", "--key-file", keyFile(t, "right horse"), "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", f, kf); code != 0 {
				t.Fatalf("luksAddKey: %d\n%s", code, out)
			}
			want := dumpVolumeKey(t, f, "right horse")
			r, size := openFile(t, f)
			h, err := Read(r, size, f)
			if err != nil {
				t.Fatal(err)
			}
			if h.Version != 2 || h.ActiveSlots() != 2 {
				t.Fatalf("version %d, %d active slots", h.Version, h.ActiveSlots())
			}
			for _, pass := range []string{"right horse", "second pass"} {
				key, slot, err := h.Unlock(r, []byte(pass), f)
				if err != nil {
					t.Fatalf("%q: %v", pass, err)
				}
				if !bytes.Equal(key, want) {
					t.Fatalf("slot %d gives key %x, cryptsetup %x", slot, key, want)
				}
			}
			if _, _, err := h.Unlock(r, []byte("wrong"), f); err == nil || !strings.Contains(err.Error(), "no key slot accepted") {
				t.Fatalf("wrong passphrase: %v", err)
			}
		})
	}
}

// TestQemuLUKS1 reads a LUKS1 header qemu-img made: the key vdisk recovers
// equals the one cryptsetup recovers from the same file.
func TestQemuLUKS1(t *testing.T) {
	qemutest.Require(t)
	requireCryptsetup(t)
	for _, opts := range []string{"cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64", "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha1"} {
		t.Run(opts, func(t *testing.T) {
			f := filepath.Join(t.TempDir(), "q.luks")
			QemuCreate(t, f, "1M", "pass0", opts)
			want := dumpVolumeKey(t, f, "pass0")
			r, size := openFile(t, f)
			h, err := Read(r, size, f)
			if err != nil {
				t.Fatal(err)
			}
			key, _, err := h.Unlock(r, []byte("pass0"), f)
			if err != nil || !bytes.Equal(key, want) {
				t.Fatalf("key %x (%v), cryptsetup %x", key, err, want)
			}
		})
	}
}

// QemuCreate makes a LUKS1 volume with qemu-img create -f luks (a short
// iter-time, which qemutest.Run retries when qemu's calibration refuses).
func QemuCreate(t testing.TB, file, size, pass, opts string) {
	t.Helper()
	qemutest.Img(t, "create", "-q", "-f", "luks", "--object", "secret,id=sec0,data="+pass,
		"-o", "key-secret=sec0,iter-time=50,"+opts, file, size)
}

// TestCreateLUKS2ForCryptsetup: LUKS2 headers vdisk makes parse in
// luksDump, and cryptsetup accepts the right passphrase only and recovers
// the same volume key; an added slot works, an erased one no longer does.
func TestCreateLUKS2ForCryptsetup(t *testing.T) {
	requireCryptsetup(t)
	for _, c := range []CreateOptions{
		{Version: 2, Cipher: Spec{"aes", "xts", "plain64", ""}, KeyBytes: 64, Hash: "sha256", Iterations: 1000, SectorSize: 4096},
		{Version: 2, Cipher: Spec{"aes", "xts", "plain64", ""}, KeyBytes: 32, Hash: "sha512", Iterations: 1000, SectorSize: 512, KDF: "argon2id", ArgonMemoryKiB: 64, ArgonTime: 4, ArgonThreads: 1},
		{Version: 1, Cipher: Spec{"aes", "cbc", "essiv", "sha256"}, KeyBytes: 32, Hash: "sha1", Iterations: 1000},
	} {
		t.Run(c.Cipher.String()+"-"+c.KDF, func(t *testing.T) {
			f := filepath.Join(t.TempDir(), "v.img")
			os.WriteFile(f, nil, 0o600)
			os.Truncate(f, 20<<20)
			w, _ := openFile(t, f)
			h, key, err := Create(w, c, []byte("good"))
			if err != nil {
				t.Fatal(err)
			}
			if out, code := cryptsetup(t, "luksDump", f); code != 0 {
				t.Fatalf("luksDump: %d\n%s", code, out)
			}
			if out, code := cryptsetup(t, "open", "--test-passphrase", "--key-file", keyFile(t, "good"), f); code != 0 {
				t.Fatalf("right passphrase refused: %d\n%s", code, out)
			}
			if out, code := cryptsetup(t, "open", "--test-passphrase", "--key-file", keyFile(t, "bad"), f); code == 0 {
				t.Fatalf("wrong passphrase accepted\n%s", out)
			}
			if got := dumpVolumeKey(t, f, "good"); !bytes.Equal(got, key) {
				t.Fatalf("cryptsetup key %x, ours %x", got, key)
			}
			if err := h.SetSlot(w, 3, key, []byte("other"), KDF{Type: "pbkdf2", Hash: c.Hash, Iterations: 1000}, nil); err != nil {
				t.Fatal(err)
			}
			if err := h.KillSlot(w, 0, nil); err != nil {
				t.Fatal(err)
			}
			if out, code := cryptsetup(t, "open", "--test-passphrase", "--key-file", keyFile(t, "other"), f); code != 0 {
				t.Fatalf("added slot refused: %d\n%s", code, out)
			}
			if _, code := cryptsetup(t, "open", "--test-passphrase", "--key-file", keyFile(t, "good"), f); code == 0 {
				t.Fatal("erased slot still opens")
			}
		})
	}
}
