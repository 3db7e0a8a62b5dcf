package luks

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/luks"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/osfs"
)

// TestReadsQemuImages: LUKS1 volumes qemu-img creates with several
// ciphers, written by qemu-io, read bit-exact (qemu-img convert decrypts
// the reference); a wrong passphrase opens nothing; info matches qemu's;
// the AES-XTS volume's payload decrypts with an independent XTS under the
// key cryptsetup recovers.
func TestReadsQemuImages(t *testing.T) {
	qemutest.Require(t)
	requireCryptsetup(t)
	dir := t.TempDir()
	for _, c := range []struct {
		name, opts string
	}{
		{"aes-256-xts-plain64", ""},
		{"aes-128-cbc-essiv", "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha1"},
		{"aes-192-xts-plain-sha512", "cipher-alg=aes-192,cipher-mode=xts,ivgen-alg=plain,hash-alg=sha512"},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := filepath.Join(dir, c.name+".luks")
			qemuCreate(t, f, "3M", "qemu pass", c.opts)
			qemuIO(t, f, "qemu pass", "write -P 0xaa 0 64k", "write -P 0x55 1M 513k", "write -P 0x11 3144704 1k", "write -z 2M 4k")
			want := qemuRaw(t, f, "qemu pass")
			d := mustOpen(t, osfs.New(), f, "qemu pass", true)
			defer d.Close()
			if d.Size() != 3<<20 {
				t.Fatalf("size %d, want %d", d.Size(), 3<<20)
			}
			if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
				t.Fatal("content differs from qemu's")
			}
			if _, err := openLUKS(osfs.New(), f, "qemu pass!", true); !errors.Is(err, luks.ErrPassphrase) || !errors.Is(err, driver.ErrInvalidOption) {
				t.Fatalf("wrong passphrase: %v", err)
			}
			checkInfo(t, f, "qemu pass")
			if c.name == "aes-256-xts-plain64" {
				if got := decryptXTS(t, f, volumeKey(t, f, "qemu pass"), 2068480, 512); !bytes.Equal(got, want) {
					t.Fatal("independent XTS decryption of qemu's volume differs")
				}
			}
		})
	}
}

// TestQemuReadsOurs: volumes vdisk creates (LUKS1, several ciphers) open
// in qemu with the same secret and compare equal to the content written;
// qemu refuses a wrong passphrase; qemu-img info shows our header.
func TestQemuReadsOurs(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	for _, c := range []struct {
		name string
		opts []string
	}{
		{"default", nil},
		{"aes-128-cbc-essiv-sha1", []string{"cipher-alg=aes-128", "cipher-mode=cbc", "ivgen-alg=essiv", "hash-alg=sha1"}},
		{"aes-256-cbc-plain64", []string{"cipher-mode=cbc", "ivgen-alg=plain64", "hash-alg=sha512"}},
		{"aes-128-xts-plain", []string{"cipher-alg=aes-128", "ivgen-alg=plain"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := filepath.Join(dir, c.name+".luks")
			size := int64(4<<20 + 512)
			d := createLUKS(t, osfs.New(), f, size, "our pass", c.opts...)
			want := make([]byte, size)
			for _, w := range []struct {
				off int64
				n   int
				c   byte
			}{{0, 4096, 0x31}, {1000, 3000, 0x32}, {1 << 20, 1<<20 + 7, 0x33}, {size - 700, 700, 0x34}} {
				p := disktest.Fill(w.n, w.c)
				disktest.MustWrite(t, d, nil, p, w.off)
				copy(want[w.off:], p)
			}
			if err := d.WriteZeroes(1<<20+4096, 10000, true); err != nil {
				t.Fatal(err)
			}
			clear(want[1<<20+4096 : 1<<20+4096+10000])
			disktest.MustClose(t, d)
			ref := filepath.Join(dir, c.name+".raw")
			os.WriteFile(ref, want, 0o644)
			out, code, _ := qemutest.RunCode("qemu-img", "compare", "--object", secretObject("our pass"), "--image-opts", imageOpts(f), "driver=raw,file.filename="+ref)
			if code != 0 {
				t.Fatalf("qemu-img compare: %d\n%s", code, out)
			}
			if got := qemuRaw(t, f, "our pass"); !bytes.Equal(got, want) {
				t.Fatal("qemu reads different content")
			}
			out, code = qemuOpens(f, "wrong")
			if code == 0 || !strings.Contains(strings.ToLower(out), "password") && !strings.Contains(strings.ToLower(out), "keyslot") {
				t.Fatalf("qemu opened with a wrong passphrase: %d\n%s", code, out)
			}
		})
	}
}

// TestAmendInterop: a key slot vdisk adds opens the volume in qemu, one it
// erases no longer does; a slot qemu-img amend adds opens it in vdisk.
func TestAmendInterop(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	f := filepath.Join(dir, "a.luks")
	qemuCreate(t, f, "1M", "first", "")
	qemuIO(t, f, "first", "write -P 0x66 0 1M")
	sm := secrets("sec0", "first", "sec1", "second", "sec2", "third")
	d, err := vdisk.Open(ctx, f, &vdisk.OpenOptions{Format: "luks", Options: disktest.KVs("key-secret=sec0"), Secrets: sm})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Amend(ctx, disktest.KVs("state=active,new-secret=sec1,iter-time=10")); err != nil {
		t.Fatal(err)
	}
	if err := d.Amend(ctx, disktest.KVs("state=active,new-secret=sec2,keyslot=5,iter-time=10")); err != nil {
		t.Fatal(err)
	}
	if err := d.Amend(ctx, disktest.KVs("state=inactive,old-secret=sec0")); err != nil {
		t.Fatal(err)
	}
	if err := d.Amend(ctx, disktest.KVs("state=inactive,keyslot=5")); err != nil {
		t.Fatal(err)
	}
	if err := d.Amend(ctx, disktest.KVs("state=inactive,keyslot=1")); err == nil {
		t.Fatal("erasing the last slot was allowed")
	}
	spec := d.Top().Info().Specific.(*Specific)
	if !spec.Slots[1].Active || spec.Slots[0].Active || spec.Slots[5].Active {
		t.Fatalf("slots after amend: %+v", spec.Slots)
	}
	disktest.MustClose(t, d)
	want := disktest.Fill(1<<20, 0x66)
	if got := qemuRaw(t, f, "second"); !bytes.Equal(got, want) {
		t.Fatal("qemu reads other data with the added slot")
	}
	if out, code := qemuOpens(f, "first"); code == 0 {
		t.Log(out)
		t.Fatal("qemu still opens the erased slot")
	}
	// qemu adds a slot; vdisk opens with it.
	qemutest.Img(t, "amend", "--object", secretObject("second"), "--object", "secret,id=sec9,data=ninth",
		"--image-opts", imageOpts(f), "-o", "state=active,new-secret=sec9,keyslot=7,iter-time=10")
	d = mustOpen(t, osfs.New(), f, "ninth", true)
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
		t.Fatal("content through qemu's new slot")
	}
	disktest.MustClose(t, d)
}

// checkInfo: info shows qemu's format-specific fields with the values
// qemu-img info shows for the same volume, also when opened without a key.
func checkInfo(t *testing.T, f, pass string) {
	out := qemutest.Img(t, "info", "--output", "json", "--object", secretObject(pass), "--image-opts", imageOpts(f))
	d := mustOpen(t, osfs.New(), f, pass, true)
	defer d.Close()
	s := d.Top().Info().Specific.(*Specific)
	if s.IVGenHashAlg != "" && !strings.Contains(out, `"ivgen-hash-alg": "`+s.IVGenHashAlg+`"`) {
		t.Errorf("qemu-img info lacks ivgen-hash-alg %s:\n%s", s.IVGenHashAlg, out)
	}
	for _, want := range []string{`"cipher-alg": "` + s.CipherAlg + `"`, `"cipher-mode": "` + s.CipherMode + `"`,
		`"ivgen-alg": "` + s.IVGenAlg + `"`, `"hash-alg": "` + s.HashAlg + `"`,
		`"uuid": "` + s.UUID + `"`, `"payload-offset": ` + itoa(s.PayloadOffset), `"master-key-iters": ` + itoa(int64(s.MasterKeyIters)),
		`"key-offset": ` + itoa(s.Slots[7].KeyOffset), `"iters": ` + itoa(int64(s.Slots[0].Iters))} {
		if !strings.Contains(out, want) {
			t.Errorf("qemu-img info lacks %s:\n%s", want, out)
		}
	}
	// Info without a key: the header only.
	di, err := vdisk.Open(ctx, f, &vdisk.OpenOptions{Format: "luks", InfoOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if di.Size() != d.Size() {
		t.Fatalf("info-only size %d", di.Size())
	}
	di.Close()
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

// qemuOpens reads a sector through qemu with pass (qemu-img info does not
// unlock a volume).
func qemuOpens(f, pass string) (string, int) {
	out, code, _ := qemutest.RunCode("qemu-io", "--object", secretObject(pass), "--image-opts", imageOpts(f), "-c", "read 0 512")
	return out, code
}
