package luks

import (
	"bytes"
	"crypto/aes"
	"testing"

	"golang.org/x/crypto/xts"
)

func BenchmarkXTS(b *testing.B) {
	c, err := NewSectorCipher(xtsSpec, make([]byte, 64), 512)
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		c.Encrypt(buf, 0)
	}
}

// TestXTSIndependent checks our XTS against golang.org/x/crypto/xts for
// every key size, plain and plain64 IVs.
func TestXTSIndependent(t *testing.T) {
	for _, kb := range []int{32, 48, 64} {
		key := make([]byte, kb)
		for i := range key {
			key[i] = byte(i*31 + kb)
		}
		ref, err := xts.NewCipher(aes.NewCipher, key)
		if err != nil {
			t.Fatal(err)
		}
		for _, ivg := range []string{"plain", "plain64"} {
			c, err := NewSectorCipher(Spec{"aes", "xts", ivg, ""}, key, 4096)
			if err != nil {
				t.Fatal(err)
			}
			pt := make([]byte, 3*4096)
			for i := range pt {
				pt[i] = byte(i * 13)
			}
			buf := append([]byte(nil), pt...)
			sector := uint64(1<<32 + 5)
			c.Encrypt(buf, sector)
			for i := 0; i < 3; i++ {
				n := sector + uint64(i)
				if ivg == "plain" {
					n = uint64(uint32(n))
				}
				want := make([]byte, 4096)
				ref.Encrypt(want, pt[i*4096:(i+1)*4096], n)
				if !bytes.Equal(want, buf[i*4096:(i+1)*4096]) {
					t.Fatalf("%d-byte key, %s, sector %d differs from x/crypto/xts", kb, ivg, i)
				}
			}
			c.Decrypt(buf, sector)
			if !bytes.Equal(buf, pt) {
				t.Fatal("decrypt does not invert encrypt")
			}
		}
	}
}
