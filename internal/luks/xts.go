package luks

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
)

// xtsCipher is AES-XTS (IEEE 1619) over whole sectors, without ciphertext
// stealing (sectors are multiples of 16 bytes). The tweak is kept in two
// 64-bit words so the per-block work outside AES stays small.
type xtsCipher struct {
	k1, k2 cipher.Block
}

func newXTS(key []byte) (*xtsCipher, error) {
	k1, err := aes.NewCipher(key[:len(key)/2])
	if err != nil {
		return nil, err
	}
	k2, err := aes.NewCipher(key[len(key)/2:])
	if err != nil {
		return nil, err
	}
	return &xtsCipher{k1, k2}, nil
}

// crypt encrypts or decrypts one sector in place; iv is the 16-byte IV
// (plain64: the sector number, little-endian).
func (x *xtsCipher) crypt(s []byte, iv *[16]byte, enc bool) {
	var t [16]byte
	x.k2.Encrypt(t[:], iv[:])
	lo, hi := binary.LittleEndian.Uint64(t[:8]), binary.LittleEndian.Uint64(t[8:])
	var b [16]byte
	for i := 0; i+16 <= len(s); i += 16 {
		blk := s[i : i+16 : i+16]
		binary.LittleEndian.PutUint64(b[:8], binary.LittleEndian.Uint64(blk[:8])^lo)
		binary.LittleEndian.PutUint64(b[8:], binary.LittleEndian.Uint64(blk[8:])^hi)
		if enc {
			x.k1.Encrypt(b[:], b[:])
		} else {
			x.k1.Decrypt(b[:], b[:])
		}
		binary.LittleEndian.PutUint64(blk[:8], binary.LittleEndian.Uint64(b[:8])^lo)
		binary.LittleEndian.PutUint64(blk[8:], binary.LittleEndian.Uint64(b[8:])^hi)
		// Multiply the tweak by x in GF(2^128) (little-endian bit order,
		// reduction polynomial x^128 + x^7 + x^2 + x + 1).
		carry := hi >> 63
		hi = hi<<1 | lo>>63
		lo = lo<<1 ^ carry*0x87
	}
}
