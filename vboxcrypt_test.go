package vdisk_test

import (
	"bytes"
	"context"
	"crypto/aes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	_ "github.com/vdisk/vdisk/format/raw"
	_ "github.com/vdisk/vdisk/format/vdi"
	_ "github.com/vdisk/vdisk/format/vhd"
	_ "github.com/vdisk/vdisk/format/vmdk"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/internal/vboxcrypt"
	"github.com/vdisk/vdisk/storage/memfs"
	"golang.org/x/crypto/xts"
)

// A size VHD's CHS geometry keeps exactly (16 heads x 63 sectors x 2).
const vboxTestSize = 16 * 63 * 512 * 2

// xtsSectors is the independent oracle: AES-XTS per 512-byte sector with
// the sector number of the virtual disk as the tweak (x/crypto/xts).
func xtsSectors(t *testing.T, dek, in []byte, encrypt bool) []byte {
	t.Helper()
	c, err := xts.NewCipher(aes.NewCipher, dek)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, len(in))
	for i := 0; i < len(in); i += 512 {
		if encrypt {
			c.Encrypt(out[i:i+512], in[i:i+512], uint64(i/512))
		} else {
			c.Decrypt(out[i:i+512], in[i:i+512], uint64(i/512))
		}
	}
	return out
}

func vboxPlain(seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 7))
	b := make([]byte, vboxTestSize)
	// Data with holes and a zero run inside written data.
	for off := 0; off < len(b); off += 64 << 10 {
		if r.IntN(3) == 0 {
			continue
		}
		for i := off; i < off+64<<10 && i < len(b); i++ {
			b[i] = byte(r.Uint32())
		}
	}
	clear(b[200<<10 : 210<<10])
	return b
}

// TestVBoxEncryptConvert: vdisk encrypts a raw disk into VDI, VMDK and VHD
// images the way VirtualBox's filter does; qemu-img reads the containers
// back as raw and the test decrypts every sector itself with the DEK the
// store unwraps to: the plaintext is the source, zeros included.
func TestVBoxEncryptConvert(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	ctx := context.Background()
	for _, tc := range []struct{ format, cipher string }{
		{"vdi", vboxcrypt.XTS256}, {"vmdk", vboxcrypt.XTS128}, {"vpc", vboxcrypt.XTS256},
	} {
		t.Run(tc.format, func(t *testing.T) {
			dir := t.TempDir()
			plain := vboxPlain(1)
			src := filepath.Join(dir, "src.raw")
			if err := os.WriteFile(src, plain, 0o644); err != nil {
				t.Fatal(err)
			}
			secrets := &driver.SecretMap{}
			secrets.Set("sec0", []byte("correct horse"))
			sd, err := vdisk.Open(ctx, src, &vdisk.OpenOptions{Format: "raw", ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer sd.Close()
			dst := filepath.Join(dir, "enc."+tc.format)
			props := filepath.Join(dir, "props.xml")
			dd, err := vdisk.Create(ctx, dst, &vdisk.CreateOptions{Format: tc.format, Size: sd.Size(), Secrets: secrets,
				Options: []driver.KV{{Key: "vbox-encrypt", Value: tc.cipher}, {Key: "key-secret", Value: "sec0"}, {Key: "vbox-keystore-out", Value: props}, {Key: "vbox-key-id", Value: "My VM"}}})
			if err != nil {
				t.Fatal(err)
			}
			if err := vdisk.Convert(ctx, dd, sd, &vdisk.ConvertOptions{}); err != nil {
				t.Fatal(err)
			}
			if err := dd.Close(); err != nil {
				t.Fatal(err)
			}
			// The properties file: a <HardDisk> with both properties.
			ps, err := vboxcrypt.RegistryProperties(props)
			if err != nil || len(ps) != 1 || ps[0].KeyID != "My VM" {
				t.Fatalf("properties file: %+v, %v", ps, err)
			}
			st, err := vboxcrypt.Decode(props, ps[0].KeyStore)
			if err != nil {
				t.Fatal(err)
			}
			if st.Cipher != tc.cipher || st.DEKIter < 20000 {
				t.Fatalf("store %+v", st)
			}
			dek, err := st.Unlock(props, []byte("correct horse"))
			if err != nil {
				t.Fatal(err)
			}
			// qemu-img reads the container: ciphertext.
			raw := filepath.Join(dir, "cipher.raw")
			qemutest.Img(t, "convert", "-f", tc.format, "-O", "raw", dst, raw)
			ct, err := os.ReadFile(raw)
			if err != nil {
				t.Fatal(err)
			}
			if len(ct) < len(plain) {
				t.Fatalf("qemu-img reads %d bytes, want %d", len(ct), len(plain))
			}
			ct = ct[:len(plain)]
			if bytes.Equal(ct[:64<<10], plain[:64<<10]) {
				t.Fatal("the image holds plaintext")
			}
			if got := xtsSectors(t, dek, ct, false); !bytes.Equal(got, plain) {
				for i := 0; i < len(plain); i += 512 {
					if !bytes.Equal(got[i:i+512], plain[i:i+512]) {
						t.Fatalf("sector %d decrypts to something else than the source", i/512)
					}
				}
			}
			if tc.format != "vpc" { // qemu-img cannot check VHD
				if c := qemutest.Check(t, tc.format, dst); c.Corruptions != 0 {
					t.Fatalf("qemu-img check: %+v", c)
				}
			}
			// vdisk reads it back with the properties file as keystore=.
			for _, ks := range []string{props, ps[0].KeyStore} {
				rd, err := vdisk.Open(ctx, dst, &vdisk.OpenOptions{Format: tc.format, ReadOnly: true, Secrets: secrets,
					Options: []driver.KV{{Key: "keystore", Value: ks}, {Key: "key-secret", Value: "sec0"}}})
				if err != nil {
					t.Fatal(err)
				}
				got := make([]byte, len(plain))
				_, err = rd.ReadAt(got, 0)
				rd.Close()
				if err != nil || !bytes.Equal(got, plain) {
					t.Fatalf("vdisk reads back something else (%v)", err)
				}
			}
			// The wrong password is a clear error.
			bad := &driver.SecretMap{}
			bad.Set("sec0", []byte("correct horse "))
			_, err = vdisk.Open(ctx, dst, &vdisk.OpenOptions{Format: tc.format, ReadOnly: true, Secrets: bad,
				Options: []driver.KV{{Key: "keystore", Value: props}, {Key: "key-secret", Value: "sec0"}}})
			if !errors.Is(err, vboxcrypt.ErrPassword) || !errors.Is(err, driver.ErrInvalidOption) || !strings.Contains(err.Error(), dst) {
				t.Fatalf("wrong password: %v", err)
			}
		})
	}
}

// TestVBoxOpenForeign: an image laid out as VirtualBox's filter writes it,
// built without vdisk's writer (sectors encrypted by x/crypto/xts, the
// container made by qemu-img, the store built by the test), opens with
// the password, through keystore=BASE64 and through a .vbox file.
func TestVBoxOpenForeign(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	ctx := context.Background()
	for _, tc := range []struct{ format, vboxFormat, cipher string }{
		{"vdi", "VDI", vboxcrypt.XTS128}, {"vmdk", "VMDK", vboxcrypt.XTS256}, {"vpc", "VHD", vboxcrypt.XTS128},
	} {
		t.Run(tc.format, func(t *testing.T) {
			dir := t.TempDir()
			plain := vboxPlain(2)
			dek, err := vboxcrypt.NewDEK(tc.cipher)
			if err != nil {
				t.Fatal(err)
			}
			ct := xtsSectors(t, dek, plain, true)
			raw := filepath.Join(dir, "cipher.raw")
			if err := os.WriteFile(raw, ct, 0o644); err != nil {
				t.Fatal(err)
			}
			img := filepath.Join(dir, "disk."+tc.format)
			qemutest.Img(t, "convert", "-f", "raw", "-O", tc.format, raw, img)
			st, err := vboxcrypt.NewStore(tc.cipher, []byte("pw"), dek, 0)
			if err != nil {
				t.Fatal(err)
			}
			// The medium's UUID as vdisk reads it (for the .vbox file).
			pd, err := vdisk.Open(ctx, img, &vdisk.OpenOptions{Format: tc.format, ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			uuid := "" // a VMDK's identifier is its CID: found by file name
			if id, ok := vdisk.As[driver.Identifier](pd.Top()); ok && tc.format != "vmdk" {
				uuid = id.UUID()
			}
			pd.Close()
			vbox := filepath.Join(dir, "vm.vbox")
			settings := `<?xml version="1.0"?>
<VirtualBox xmlns="http://www.virtualbox.org/" version="1.19-linux">
  <Machine uuid="{528b3540-b8be-4677-b43f-7f4969137747}" name="vm">
    <MediaRegistry>
      <HardDisks>
        <HardDisk uuid="{0898f36f-01c3-4b43-8aeb-36ba7adaef95}" location="other.vdi" format="VDI" type="Normal">
          <Property name="CRYPT/KeyId" value="other"/>
          <Property name="CRYPT/KeyStore" value="` + strings.ReplaceAll(st.Encode(), "\n", "&#10;") + `"/>
        </HardDisk>
` + vboxcrypt.HardDiskXML(uuid, img, tc.vboxFormat, "vm", strings.ReplaceAll(st.Encode(), "\n", "\r\n")) + `
      </HardDisks>
    </MediaRegistry>
  </Machine>
</VirtualBox>
`
			if err := os.WriteFile(vbox, []byte(settings), 0o644); err != nil {
				t.Fatal(err)
			}
			secrets := &driver.SecretMap{}
			secrets.Set("pw", []byte("pw"))
			for _, ks := range []string{st.Encode(), vbox} {
				d, err := vdisk.Open(ctx, img, &vdisk.OpenOptions{Format: tc.format, Secrets: secrets,
					Options: []driver.KV{{Key: "keystore", Value: ks}, {Key: "key-secret", Value: "pw"}}})
				if err != nil {
					t.Fatal(err)
				}
				got := make([]byte, len(plain))
				if _, err := d.ReadAt(got, 0); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, plain) {
					t.Fatal("decrypted content differs")
				}
				// An unaligned write goes through read-modify-write.
				if _, err := d.WriteAt([]byte("vdisk was here"), 1000); err != nil {
					t.Fatal(err)
				}
				if err := d.Close(); err != nil {
					t.Fatal(err)
				}
				copy(plain[1000:], "vdisk was here")
			}
			qemutest.Img(t, "convert", "-f", tc.format, "-O", "raw", img, raw)
			ct2, _ := os.ReadFile(raw)
			if got := xtsSectors(t, dek, ct2[:len(plain)], false); !bytes.Equal(got[:4096], plain[:4096]) {
				t.Fatal("the unaligned write is not encrypted as VirtualBox reads it")
			}
			// Without the key material, and with the wrong medium, clear errors.
			for _, kvs := range [][]driver.KV{
				{{Key: "key-secret", Value: "pw"}},
				{{Key: "keystore", Value: "AAAA"}, {Key: "key-secret", Value: "pw"}},
				{{Key: "keystore", Value: st.Encode()}, {Key: "key-secret", Value: "nope"}},
			} {
				if _, err := vdisk.Open(ctx, img, &vdisk.OpenOptions{Format: tc.format, Secrets: secrets, Options: kvs}); err == nil {
					t.Fatalf("%v: opened", kvs)
				} else if !strings.Contains(err.Error(), img) {
					t.Fatalf("%v: error does not name the image: %v", kvs, err)
				}
			}
		})
	}
}

// TestVBoxChain: a plain new diff over an encrypted base, opened with the
// base's key store, is encrypted with the chain's DEK (VirtualBox's filter
// sits on the whole disk): copy-on-write fills decrypt the parent and
// encrypt into the child; a live snapshot's new top inherits the filter.
func TestVBoxChain(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	secrets := &driver.SecretMap{}
	secrets.Set("k", []byte("chain"))
	base := filepath.Join(dir, "base.vdi")
	props := filepath.Join(dir, "base.xml")
	bd, err := vdisk.Create(ctx, base, &vdisk.CreateOptions{Format: "vdi", Size: 3 << 20, Secrets: secrets,
		Options: []driver.KV{{Key: "vbox-encrypt", Value: vboxcrypt.XTS256}, {Key: "key-secret", Value: "k"}, {Key: "vbox-keystore-out", Value: props}}})
	if err != nil {
		t.Fatal(err)
	}
	model := make([]byte, 3<<20)
	r := rand.New(rand.NewPCG(5, 6))
	write := func(d *vdisk.Disk, n int) {
		for i := 0; i < n; i++ {
			off := r.Int64N(int64(len(model)) - 20000)
			p := make([]byte, 1+r.IntN(20000))
			for j := range p {
				p[j] = byte(r.Uint32())
			}
			if _, err := d.WriteAt(p, off); err != nil {
				t.Fatal(err)
			}
			copy(model[off:], p)
		}
	}
	check := func(d *vdisk.Disk, what string) {
		got := make([]byte, len(model))
		if _, err := d.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, model) {
			t.Fatalf("%s: content differs from the model", what)
		}
	}
	write(bd, 20)
	check(bd, "base")
	if err := bd.Close(); err != nil {
		t.Fatal(err)
	}
	// A diff with vbox-encrypt is refused (it would get a DEK of its own).
	if _, err := vdisk.Create(ctx, filepath.Join(dir, "bad.vdi"), &vdisk.CreateOptions{Format: "vdi", Backing: base, Secrets: secrets,
		Options: []driver.KV{{Key: "vbox-encrypt", Value: vboxcrypt.XTS256}, {Key: "key-secret", Value: "k"}, {Key: "vbox-keystore-out", Value: props + "2"}}}); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("encrypted diff: %v", err)
	}
	diff := filepath.Join(dir, "diff.vdi")
	dd, err := vdisk.Create(ctx, diff, &vdisk.CreateOptions{Format: "vdi", Backing: base})
	if err != nil {
		t.Fatal(err)
	}
	dd.Close()
	open := func() *vdisk.Disk {
		d, err := vdisk.Open(ctx, diff, &vdisk.OpenOptions{Secrets: secrets,
			Options: []driver.KV{{Key: "keystore", Value: props}, {Key: "key_secret", Value: "k"}}})
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	d := open()
	check(d, "chain")
	write(d, 20)
	check(d, "chain after writes")
	snap := filepath.Join(dir, "snap.vdi")
	if err := d.Snapshot(ctx, snap, &vdisk.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	atSnap := append([]byte(nil), model...)
	write(d, 10)
	check(d, "after a live snapshot")
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	latest := model
	model = atSnap
	d = open()
	check(d, "diff reopened")
	d.Close()
	model = latest
	sd, err := vdisk.Open(ctx, snap, &vdisk.OpenOptions{Secrets: secrets,
		Options: []driver.KV{{Key: "keystore", Value: props}, {Key: "key-secret", Value: "k"}}})
	if err != nil {
		t.Fatal(err)
	}
	check(sd, "snapshot top reopened")
	sd.Close()
	// Opened without the key, the base's data is ciphertext.
	pd, err := vdisk.Open(ctx, base, &vdisk.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer pd.Close()
	got := make([]byte, len(model))
	pd.ReadAt(got, 0)
	if bytes.Equal(got, model) {
		t.Fatal("the base holds plaintext")
	}
}

// TestVBoxModel: the reference model through the filter over a VDI chain
// on memfs (writes, reads, zeroes, discards, parallel batches, reopens and
// new diffs opened with the chain's key store), 10^4 operations.
func TestVBoxModel(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		seed   int64
		format string
		opts   []driver.KV
		ops    int
	}{
		{1, "vdi", []driver.KV{{Key: "block_size", Value: "64K"}}, vboxModelOps},
		{2, "vpc", nil, vboxModelOps},
	} {
		t.Run(c.format, func(t *testing.T) {
			st := memfs.New()
			secrets := &driver.SecretMap{}
			secrets.Set("k", []byte("model"))
			const size = 16 * 63 * 512 * 8
			// A fresh image, then a cheap store (the model reopens often;
			// PBKDF2 at VirtualBox's 2 x 20000 iterations would dominate).
			d, err := vdisk.Create(ctx, "/base."+c.format, &vdisk.CreateOptions{Format: c.format, Size: size, Storage: st, Options: c.opts})
			if err != nil {
				t.Fatal(err)
			}
			d.Close()
			dek, _ := vboxcrypt.NewDEK(vboxcrypt.XTS256)
			ks, err := vboxcrypt.NewStoreIterations(vboxcrypt.XTS256, []byte("model"), dek, 10, 10)
			if err != nil {
				t.Fatal(err)
			}
			props := ks.Encode()
			top, depth := "/base."+c.format, 0
			open := func() (*vdisk.Disk, error) {
				return vdisk.Open(ctx, top, &vdisk.OpenOptions{Storage: st, Secrets: secrets,
					Options: []driver.KV{{Key: "keystore", Value: props}, {Key: "key-secret", Value: "k"}}})
			}
			h := &model.Harness{Seed: c.seed, Ops: c.ops, MaxIO: 64 << 10,
				Reopen: func(d *vdisk.Disk) (*vdisk.Disk, error) {
					if err := d.Close(); err != nil {
						return nil, err
					}
					return open()
				},
				Snapshot: func(d *vdisk.Disk) (*vdisk.Disk, error) {
					if depth >= 2 {
						return nil, nil
					}
					if err := d.Close(); err != nil {
						return nil, err
					}
					depth++
					name := "/l" + string(rune('0'+depth)) + "." + c.format
					nd, err := vdisk.Create(ctx, name, &vdisk.CreateOptions{Format: c.format, Backing: strings.TrimPrefix(top, "/"), Storage: st, Options: c.opts})
					if err != nil {
						return nil, err
					}
					if err := nd.Close(); err != nil {
						return nil, err
					}
					top = name
					return open()
				}}
			d, err = open()
			if err != nil {
				t.Fatal(err)
			}
			m := model.New(d.Size())
			d = h.Run(t, d, m)
			if len(d.Layers()) < 2 {
				t.Fatalf("the chain never grew")
			}
			res, err := d.Check(ctx, driver.RepairNone)
			if err != nil || res.Corruptions != 0 {
				t.Fatalf("check: %+v %v", res, err)
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			// Opened without the key, the data is not the model's.
			pd, err := vdisk.Open(ctx, top, &vdisk.OpenOptions{Storage: st, ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer pd.Close()
			got := make([]byte, len(m.Data))
			pd.ReadAt(got, 0)
			if bytes.Equal(got, m.Data) {
				t.Fatal("the chain holds plaintext")
			}
		})
	}
}
