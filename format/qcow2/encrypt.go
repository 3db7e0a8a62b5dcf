package qcow2

import (
	"io"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

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
// Writes (LUKS only; the legacy scheme stays read-only) encrypt whole
// 512-byte sectors: a write is widened to the sectors it touches, the old
// plaintext around it is composed in (decrypted from the cluster, zeros,
// or the bytes the container filled from the backing chain) and the
// result encrypted with the sector numbers of the host clusters it lands
// in. Copy-on-write into a new cluster therefore decrypts with the old
// host offset and re-encrypts with the new one, as qemu does. Zero
// clusters and discards change only L2 entries (a zero cluster reads
// zeros without decryption); preallocation is refused, since a
// preallocated cluster would decrypt to noise.

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
// option's secret. Writing a legacy AES image is refused; an info-only
// open without a secret shows the image without its data.
func (im *image) loadCrypto(p *driver.OpenParams, fsize int64) error {
	h := im.hdr
	if h.cryptMethod == cryptNone {
		return nil
	}
	if !p.ReadOnly && h.cryptMethod == cryptAES {
		return driver.Unsupportedf(im.name, "images with qcow2's legacy AES encryption are read-only here (the scheme is insecure); convert it to encrypt.format=luks")
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
	sector := (host - lead) / 512
	if cs.method == cryptAES {
		sector = (guest - lead) / 512
	}
	if lead == 0 && len(p)&511 == 0 {
		// Whole sectors: decrypt in place.
		if err := readAtFile(im.df, p, host); err != nil {
			return err
		}
		cs.c.Decrypt(p, uint64(sector))
		return nil
	}
	n := (lead + int64(len(p)) + 511) &^ 511
	buf := make([]byte, n)
	if err := readAtFile(im.df, buf, host-lead); err != nil {
		return err
	}
	cs.c.Decrypt(buf, uint64(sector))
	copy(p, buf[lead:])
	clear(buf)
	return nil
}

// cipherForWrite returns the cipher that encrypts written clusters, or an
// error naming why the image cannot be written encrypted.
func (im *image) cipherForWrite(off int64) (*luks.SectorCipher, error) {
	cs := im.crypt
	if cs.method != cryptLUKS {
		return nil, driver.Unsupportedf(im.name, "images with qcow2's legacy AES encryption are read-only")
	}
	if cs.c == nil {
		return nil, driver.Errorf(driver.ErrInvalidOption, im.name, off, "the image was opened without its key (encrypt.key-secret)")
	}
	return cs.c, nil
}

// encRun is a host range of whole sectors, plaintext until encrypted.
type encRun struct {
	host int64
	buf  []byte
}

// encryptRuns encrypts every run in place (LUKS: the IV is the host
// sector number). Large batches use every core: a run of parallelMin
// bytes or more is split by the cipher itself; many smaller runs are
// spread over GOMAXPROCS goroutines.
func encryptRuns(c *luks.SectorCipher, runs []encRun) {
	total := 0
	for _, r := range runs {
		total += len(r.buf)
	}
	procs := runtime.GOMAXPROCS(0)
	if len(runs) < 2 || total < parallelMin || procs < 2 {
		for _, r := range runs {
			c.Encrypt(r.buf, uint64(r.host/512))
		}
		return
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	for range min(procs, len(runs)) {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= len(runs) {
					return
				}
				c.Encrypt(runs[i].buf, uint64(runs[i].host/512))
			}
		})
	}
	wg.Wait()
}

// parallelMin is the batch size from which encryption uses every core.
const parallelMin = 256 << 10

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

// encryptCreateOptions are qemu's qcow2 create options for encryption.
var encryptCreateOptions = []driver.Option{
	{Name: "encrypt.format", Type: driver.TypeEnum, Values: []string{"luks", "aes"},
		Doc: "encrypt the image: luks (aes is qemu's insecure legacy scheme and cannot be created)"},
	{Name: "encrypt.key-secret", Type: driver.TypeString,
		Doc: "id of the secret with the passphrase (--object secret,id=ID,...)"},
	{Name: "encrypt.cipher-alg", Type: driver.TypeEnum, Default: "aes-256", Values: []string{"aes-128", "aes-192", "aes-256"},
		Doc: "LUKS cipher algorithm"},
	{Name: "encrypt.cipher-mode", Type: driver.TypeEnum, Default: "xts", Values: []string{"xts", "cbc", "ecb"},
		Doc: "LUKS cipher mode"},
	{Name: "encrypt.ivgen-alg", Type: driver.TypeEnum, Default: "plain64", Values: []string{"plain", "plain64", "plain64be", "essiv"},
		Doc: "LUKS IV generator"},
	{Name: "encrypt.ivgen-hash-alg", Type: driver.TypeEnum, Default: "sha256", Values: []string{"sha1", "sha224", "sha256", "sha384", "sha512"},
		Doc: "hash of the essiv IV generator"},
	{Name: "encrypt.hash-alg", Type: driver.TypeEnum, Default: "sha256", Values: []string{"sha1", "sha224", "sha256", "sha384", "sha512"},
		Doc: "LUKS PBKDF2 and anti-forensic hash"},
	{Name: "encrypt.iter-time", Type: driver.TypeInt, Default: "2000", Min: 0, Max: 1 << 31,
		Doc: "time to spend on PBKDF2 when unlocking, in milliseconds"},
}

// encryptSpec builds the LUKS cipher and key length from the create
// options.
func encryptSpec(o driver.Values) (luks.Spec, int, error) {
	kb := map[string]int{"aes-128": 16, "aes-192": 24, "aes-256": 32}[o.String("encrypt.cipher-alg")]
	s := luks.Spec{Alg: "aes", Mode: o.String("encrypt.cipher-mode"), IVGen: o.String("encrypt.ivgen-alg")}
	if s.Mode == "ecb" {
		s.IVGen = ""
	}
	if s.IVGen == "essiv" {
		s.IVHash = o.String("encrypt.ivgen-hash-alg")
	}
	if s.Mode == "xts" {
		kb *= 2
	}
	if kb == 0 {
		return s, 0, driver.OptionErrorf("qcow2: unknown encrypt.cipher-alg %q", o.String("encrypt.cipher-alg"))
	}
	if _, err := luks.ParseSpec(s.Alg, s.ModeString()); err != nil {
		return s, 0, driver.OptionErrorf("qcow2: %v", err)
	}
	return s, kb, nil
}

// checkEncryptCreate validates the encryption create options.
func checkEncryptCreate(o driver.Values, c *createOpts) error {
	format := o.String("encrypt.format")
	if format == "" {
		if o.String("encrypt.key-secret") != "" {
			return driver.OptionErrorf("qcow2: encrypt.key-secret needs encrypt.format=luks")
		}
		return nil
	}
	if format == "aes" {
		return driver.OptionErrorf("qcow2: encrypt.format=aes (qcow2's legacy AES-CBC scheme) is insecure and cannot be created; use encrypt.format=luks")
	}
	if format != "luks" {
		return driver.OptionErrorf("qcow2: encrypt.format=%s (luks)", format)
	}
	if o.String("encrypt.key-secret") == "" {
		return driver.OptionErrorf("qcow2: encrypt.format=luks needs encrypt.key-secret=ID naming the secret with the passphrase")
	}
	if c.dataFile != "" {
		return driver.OptionErrorf("qcow2: encryption cannot be used with an external data file")
	}
	if c.prealloc != "off" {
		return driver.OptionErrorf("qcow2: preallocation=%s is not supported with encryption (preallocated clusters would not read zeros)", c.prealloc)
	}
	if _, _, err := encryptSpec(o); err != nil {
		return err
	}
	c.encrypt = true
	return nil
}

// setupEncryption writes a new LUKS header into clusters of a freshly
// created image (after its initial tables, as qemu does), points the
// header extension at it and keeps the cipher for writing.
func (im *image) setupEncryption(p *driver.CreateParams) error {
	o := p.Options
	spec, kb, err := encryptSpec(o)
	if err != nil {
		return err
	}
	pass, err := driver.LookupSecret(p.Secrets, o.String("encrypt.key-secret"))
	if err != nil {
		return err
	}
	defer driver.Wipe(pass)
	hlen := luksHeaderLen(kb)
	im.mu.Lock()
	defer im.mu.Unlock()
	n := (hlen + im.cs - 1) >> im.cbits
	s, err := im.allocContig(n)
	if err != nil {
		return err
	}
	off := s << im.cbits
	if sz, err := im.f.Size(); err != nil {
		return err
	} else if sz < off+n*im.cs {
		if err := im.f.Truncate(off + n*im.cs); err != nil {
			return err
		}
	}
	co := luks.CreateOptions{Version: 1, Cipher: spec, KeyBytes: kb, Hash: o.String("encrypt.hash-alg"),
		IterTime: time.Duration(o.Int("encrypt.iter-time")) * time.Millisecond}
	lh, key, err := luks.Create(io.NewOffsetWriter(im.f, off), co, pass)
	if err != nil {
		return err
	}
	c, err := lh.NewCipher(key)
	driver.Wipe(key)
	if err != nil {
		return driver.Unsupportedf(im.name, "%v", err)
	}
	if lh.PayloadOffset > n*im.cs {
		return driver.Errorf(driver.ErrCorrupt, im.name, off, "internal error: LUKS header of %d bytes exceeds its %d clusters", lh.PayloadOffset, n)
	}
	h := im.hdr
	h.cryptMethod = cryptLUKS
	h.hasCrypto, h.cryptoOff, h.cryptoLen = true, uint64(off), uint64(lh.PayloadOffset)
	im.crypt = &cryptState{method: cryptLUKS, hdr: lh, c: c}
	im.rebuildMeta()
	if err := im.flushLocked(false); err != nil {
		return err
	}
	return im.writeHeaderSync(false, false)
}

// luksHeaderLen is the size of a new LUKS1 header for a kb-byte key as
// qemu lays it out: 4 KiB of header, then eight slot areas of whole 4 KiB.
func luksHeaderLen(kb int) int64 {
	return 4096 + 8*((int64(kb)*luks.Stripes+4095)&^4095)
}
