package vboxcrypt

import (
	"crypto/aes"
	"fmt"
	"runtime"
	"sync"

	"golang.org/x/crypto/xts"
)

// SectorSize is the data unit of the filter for VDI, VMDK and VHD.
const SectorSize = 512

// parallelMin is the request size from which sectors are spread over cores.
const parallelMin = 256 << 10

// xtsOnce runs AES-XTS over b with tweak 0 (how the DEK is wrapped).
func xtsOnce(key, b []byte, encrypt bool) ([]byte, error) {
	c, err := xts.NewCipher(aes.NewCipher, key)
	if err != nil {
		return nil, fmt.Errorf("AES-XTS key of %d bytes: %v", len(key), err)
	}
	out := make([]byte, len(b))
	if encrypt {
		c.Encrypt(out, b, 0)
	} else {
		c.Decrypt(out, b, 0)
	}
	return out, nil
}

// Cipher encrypts and decrypts 512-byte sectors, the tweak being the
// sector number of the virtual disk. Safe for concurrent use.
type Cipher struct {
	name string
	c    *xts.Cipher
}

// NewCipher builds the sector cipher for a DEK. The caller may wipe dek
// afterwards.
func NewCipher(cipher string, dek []byte) (*Cipher, error) {
	kl := KeyLenOf(cipher)
	if kl == 0 || len(dek) != kl {
		return nil, fmt.Errorf("VirtualBox encryption: %s needs a %d-byte key, got %d", cipher, kl, len(dek))
	}
	c, err := xts.NewCipher(aes.NewCipher, dek)
	if err != nil {
		return nil, err
	}
	return &Cipher{name: cipher, c: c}, nil
}

// Name is the cipher's VirtualBox name.
func (c *Cipher) Name() string { return c.name }

// Encrypt encrypts src (whole sectors) into dst; the first sector is number
// sector. dst and src may be the same slice.
func (c *Cipher) Encrypt(dst, src []byte, sector uint64) { c.run(dst, src, sector, true) }

// Decrypt is Encrypt's inverse.
func (c *Cipher) Decrypt(dst, src []byte, sector uint64) { c.run(dst, src, sector, false) }

func (c *Cipher) span(dst, src []byte, sector uint64, enc bool) {
	for i := 0; i+SectorSize <= len(src); i += SectorSize {
		if enc {
			c.c.Encrypt(dst[i:i+SectorSize], src[i:i+SectorSize], sector)
		} else {
			c.c.Decrypt(dst[i:i+SectorSize], src[i:i+SectorSize], sector)
		}
		sector++
	}
}

func (c *Cipher) run(dst, src []byte, sector uint64, enc bool) {
	if len(src)%SectorSize != 0 || len(dst) < len(src) {
		panic("vboxcrypt: buffer is not whole sectors") // caller bug, never data-driven
	}
	n := runtime.GOMAXPROCS(0)
	if len(src) < parallelMin || n < 2 {
		c.span(dst, src, sector, enc)
		return
	}
	per := (len(src)/SectorSize + n - 1) / n * SectorSize
	var wg sync.WaitGroup
	for off := 0; off < len(src); off += per {
		end := min(off+per, len(src))
		wg.Add(1)
		go func(off, end int) {
			defer wg.Done()
			c.span(dst[off:end], src[off:end], sector+uint64(off/SectorSize), enc)
		}(off, end)
	}
	wg.Wait()
}
