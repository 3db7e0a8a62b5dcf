package luks

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"fmt"
	"runtime"
	"sync"
)

// SectorCipher encrypts and decrypts whole sectors with a volume key. It
// is safe for concurrent use. The key is only kept expanded inside the
// block ciphers.
type SectorCipher struct {
	spec       Spec
	sectorSize int
	// ivShift converts a sector number into IV units: LUKS2 counts IVs in
	// sector_size units, so it is 0; a cipher whose IVs count 512-byte
	// units over larger sectors would set it to log2(sectorSize/512).
	ivShift uint
	xts     *xtsCipher
	block   cipher.Block // cbc, ecb
	essiv   cipher.Block
}

// NewSectorCipher sets up spec with key for sectors of sectorSize bytes
// (a power of two from 512 to 4096).
func NewSectorCipher(spec Spec, key []byte, sectorSize int) (*SectorCipher, error) {
	if err := spec.validate(); err != nil {
		return nil, err
	}
	if sectorSize < 512 || sectorSize > 4096 || sectorSize&(sectorSize-1) != 0 {
		return nil, fmt.Errorf("sector size %d is not a power of two from 512 to 4096", sectorSize)
	}
	if !spec.ValidKeyBytes(len(key)) {
		return nil, fmt.Errorf("a %d-byte key does not fit %s", len(key), spec)
	}
	c := &SectorCipher{spec: spec, sectorSize: sectorSize}
	var err error
	switch spec.Mode {
	case "xts":
		c.xts, err = newXTS(key)
	default:
		c.block, err = aes.NewCipher(key)
	}
	if err != nil {
		return nil, err
	}
	if spec.IVGen == "essiv" {
		h, _ := HashFunc(spec.IVHash)
		d := h()
		d.Write(key)
		salt := d.Sum(nil)
		c.essiv, err = aes.NewCipher(salt)
		wipe(salt)
		if err != nil {
			return nil, err
		}
	}
	return c, nil
}

// SectorSize is the encryption unit in bytes.
func (c *SectorCipher) SectorSize() int { return c.sectorSize }

// iv fills iv (16 bytes) for sector n.
func (c *SectorCipher) iv(iv []byte, n uint64) {
	clear(iv)
	switch c.spec.IVGen {
	case "plain":
		binary.LittleEndian.PutUint32(iv, uint32(n))
	case "plain64":
		binary.LittleEndian.PutUint64(iv, n)
	case "plain64be":
		binary.BigEndian.PutUint64(iv[8:], n)
	case "essiv":
		binary.LittleEndian.PutUint64(iv, n)
		c.essiv.Encrypt(iv, iv)
	}
}

// crypt runs one direction over whole sectors of buf in place; sector is
// the IV number of the first.
func (c *SectorCipher) crypt(buf []byte, sector uint64, enc bool) {
	ss := c.sectorSize
	var iv [16]byte
	for i := 0; i+ss <= len(buf); i += ss {
		s := buf[i : i+ss]
		n := sector + uint64(i/ss)
		switch c.spec.Mode {
		case "xts":
			c.iv(iv[:], n)
			c.xts.crypt(s, &iv, enc)
		case "cbc":
			c.iv(iv[:], n)
			if enc {
				cipher.NewCBCEncrypter(c.block, iv[:]).CryptBlocks(s, s)
			} else {
				cipher.NewCBCDecrypter(c.block, iv[:]).CryptBlocks(s, s)
			}
		case "ecb":
			for j := 0; j < ss; j += 16 {
				if enc {
					c.block.Encrypt(s[j:j+16], s[j:j+16])
				} else {
					c.block.Decrypt(s[j:j+16], s[j:j+16])
				}
			}
		}
	}
}

// parallelMin is the request size from which sectors are encrypted on
// every core; parallelChunk is one goroutine's share at least.
const (
	parallelMin   = 256 << 10
	parallelChunk = 64 << 10
)

func (c *SectorCipher) run(buf []byte, sector uint64, enc bool) {
	if len(buf)%c.sectorSize != 0 {
		panic("luks: buffer is not whole sectors") // a caller bug, never input
	}
	procs := runtime.GOMAXPROCS(0)
	if len(buf) < parallelMin || procs < 2 {
		c.crypt(buf, sector, enc)
		return
	}
	per := max(parallelChunk, (len(buf)/procs+c.sectorSize-1)/c.sectorSize*c.sectorSize)
	var wg sync.WaitGroup
	for off := 0; off < len(buf); off += per {
		end := min(off+per, len(buf))
		wg.Go(func() { c.crypt(buf[off:end], sector+uint64(off/c.sectorSize), enc) })
	}
	wg.Wait()
}

// Encrypt encrypts whole sectors of buf in place; sector is the IV number
// of the first one. Large buffers are split across the cores.
func (c *SectorCipher) Encrypt(buf []byte, sector uint64) { c.run(buf, sector, true) }

// Decrypt decrypts whole sectors of buf in place.
func (c *SectorCipher) Decrypt(buf []byte, sector uint64) { c.run(buf, sector, false) }

func wipe(b []byte) { clear(b) }
