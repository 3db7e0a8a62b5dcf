package qcow2

import (
	"io"
	"strconv"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/luks"
)

// Encryption (qemu's docs/interop/qcow2.txt): crypt_method 1 is the legacy
// AES-CBC scheme (the passphrase, up to 16 bytes, is the AES-128 key; each
// 512-byte sector's IV is its guest sector number, little-endian); 2 is
// LUKS: the full disk encryption header pointer extension (0x0537be77:
// offset and length, both 64-bit) locates a LUKS header inside the file,
// whose key slot offsets count from the header's start and whose payload
// offset is unused. LUKS data clusters are encrypted in 512-byte sectors
// whose IV is the sector number of the host offset (qemu's
// crypt_physical_offset), so a cluster moved by the refcount machinery
// needs re-encryption. Compressed clusters are never encrypted: qemu
// refuses to write them and so do we.
//
// This build reads encrypted images; writing them is refused at open.

const (
	cryptNone = 0
	cryptAES  = 1
	cryptLUKS = 2
	// maxCryptoHeader bounds the LUKS header a qcow2 file may claim
	// (qemu's LUKS1 header for AES-256-XTS is about 2 MiB).
	maxCryptoHeader = 64 << 20
)

// cryptState is an encrypted image's cipher.
type cryptState struct {
	method uint32
	hdr    *luks.Header       // LUKS only
	c      *luks.SectorCipher // nil when opened for info without a key
}

// checkCrypto validates the encryption fields of the header.
func (h *header) checkCrypto(name string, fileSize int64) error {
	switch h.cryptMethod {
	case cryptNone:
		if h.hasCrypto {
			return driver.Corruptf(name, 32, "encryption header extension in an image that is not LUKS-encrypted")
		}
	case cryptAES:
		if h.hasCrypto {
			return driver.Corruptf(name, 32, "encryption header extension in an AES-encrypted image")
		}
	case cryptLUKS:
		if !h.hasCrypto {
			return driver.Corruptf(name, 32, "LUKS-encrypted image without the encryption header extension")
		}
		if h.cryptoLen == 0 || h.cryptoLen > maxCryptoHeader || h.cryptoOff > uint64(fileSize) || h.cryptoLen > uint64(fileSize)-h.cryptoOff {
			return driver.Corruptf(name, -1, "LUKS header [%d, +%d) lies outside the %d-byte file or exceeds %d bytes", h.cryptoOff, h.cryptoLen, fileSize, maxCryptoHeader)
		}
		if h.cryptoOff&((1<<h.clusterBits)-1) != 0 {
			return driver.Corruptf(name, -1, "LUKS header offset %d is not cluster-aligned", h.cryptoOff)
		}
	default:
		return driver.Unsupportedf(name, "encryption method %d", h.cryptMethod)
	}
	return nil
}

// loadCrypto unlocks an encrypted image with the encrypt.key-secret
// option's secret. Writing is refused; an info-only open without a secret
// shows the image without its data.
func (im *image) loadCrypto(p *driver.OpenParams, fsize int64) error {
	h := im.hdr
	if h.cryptMethod == cryptNone {
		return nil
	}
	if !p.ReadOnly {
		return driver.Unsupportedf(im.name, "writing encrypted qcow2 images is not supported yet; open it read-only")
	}
	if h.incompat&incompatDataFile != 0 {
		return driver.Unsupportedf(im.name, "encrypted image with an external data file")
	}
	cs := &cryptState{method: h.cryptMethod}
	im.crypt = cs
	var r io.ReaderAt
	if h.cryptMethod == cryptLUKS {
		r = io.NewSectionReader(im.f, int64(h.cryptoOff), int64(h.cryptoLen))
		lh, err := luks.Read(r, int64(h.cryptoLen), im.name)
		if err != nil {
			return err
		}
		if lh.SectorSize != 512 {
			return driver.Unsupportedf(im.name, "LUKS sector size %d in a qcow2 image", lh.SectorSize)
		}
		cs.hdr = lh
	}
	id := p.Options.String("encrypt.key-secret")
	if id == "" && p.InfoOnly {
		return nil
	}
	if id == "" {
		return driver.Errorf(driver.ErrInvalidOption, im.name, -1, "the image is encrypted: give encrypt.key-secret=ID naming the secret with its passphrase")
	}
	pass, err := driver.LookupSecret(p.Secrets, id)
	if err != nil {
		return err
	}
	defer driver.Wipe(pass)
	if h.cryptMethod == cryptAES {
		if p.Logger != nil {
			p.Logger.Warn("the image uses qcow2's legacy AES encryption, which is insecure (no key derivation, predictable IVs); convert it to encrypt.format=luks", "image", im.name)
		}
		key := make([]byte, 16)
		copy(key, pass)
		defer driver.Wipe(key)
		c, err := luks.NewSectorCipher(luks.Spec{Alg: "aes", Mode: "cbc", IVGen: "plain64"}, key, 512)
		if err != nil {
			return err
		}
		cs.c = c
		return nil
	}
	key, _, err := cs.hdr.Unlock(r, pass, im.name)
	if err != nil {
		return err
	}
	defer driver.Wipe(key)
	if cs.c, err = cs.hdr.NewCipher(key); err != nil {
		return driver.Unsupportedf(im.name, "%v", err)
	}
	return nil
}

// readData reads guest data of an allocated cluster at host (guest offset
// guest), decrypting it when the image is encrypted.
func (im *image) readData(p []byte, host, guest int64) error {
	cs := im.crypt
	if cs == nil {
		return readAtFile(im.df, p, host)
	}
	if cs.c == nil {
		return driver.Errorf(driver.ErrInvalidOption, im.name, guest, "the image was opened without its key (encrypt.key-secret)")
	}
	// Whole sectors around the request; the IV counts host sectors (LUKS)
	// or guest sectors (legacy AES), which share their offset in a sector.
	lead := host & 511
	n := (lead + int64(len(p)) + 511) &^ 511
	buf := make([]byte, n)
	if err := readAtFile(im.df, buf, host-lead); err != nil {
		return err
	}
	sector := (host - lead) / 512
	if cs.method == cryptAES {
		sector = (guest - lead) / 512
	}
	cs.c.Decrypt(buf, uint64(sector))
	copy(p, buf[lead:])
	clear(buf)
	return nil
}

// encryptInfo is qemu-img info's "encrypt" object: the format and, for
// LUKS, the header's fields under qemu's names.
func (im *image) encryptInfo() map[string]any {
	cs := im.crypt
	if cs == nil {
		return nil
	}
	if cs.hdr == nil {
		return map[string]any{"format": "aes"}
	}
	h := cs.hdr
	kb := h.KeyBytes
	if h.Cipher.Mode == "xts" {
		kb /= 2
	}
	m := map[string]any{"format": "luks", "cipher-alg": h.Cipher.Alg + "-" + strconv.Itoa(kb*8), "cipher-mode": h.Cipher.Mode,
		"ivgen-alg": h.Cipher.IVGen, "hash-alg": h.Hash, "payload-offset": h.PayloadOffset,
		"master-key-iters": h.Digest.Iterations, "uuid": h.UUID}
	if h.Cipher.IVHash != "" {
		m["ivgen-hash-alg"] = h.Cipher.IVHash
	}
	var slots []map[string]any
	for _, s := range h.Slots {
		e := map[string]any{"active": s.Active, "key-offset": s.Offset}
		if s.Active {
			e["iters"], e["stripes"] = s.KDF.Iterations, s.Stripes
		}
		slots = append(slots, e)
	}
	m["slots"] = slots
	return m
}
