package vboxcrypt

import "testing"

func BenchmarkEncrypt(b *testing.B) {
	for _, cipher := range []string{XTS128, XTS256} {
		b.Run(cipher, func(b *testing.B) {
			c, err := NewCipher(cipher, make([]byte, KeyLenOf(cipher)))
			if err != nil {
				b.Fatal(err)
			}
			buf := make([]byte, 2<<20)
			b.SetBytes(int64(len(buf)))
			for b.Loop() {
				c.Encrypt(buf, buf, 0)
			}
		})
	}
}
