package vboxcrypt

import (
	"bytes"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/subtle"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"strings"

	"github.com/vdisk/vdisk/driver"
	"golang.org/x/crypto/pbkdf2"
)

// StoreSize is the size of the binary key store.
const StoreSize = 250

// Field offsets of the packed little-endian structure.
const (
	offMagic       = 0
	offVersion     = 4
	offCipher      = 6
	offKDF         = 38
	offKeyLen      = 70
	offDigest      = 74
	offDigestLen   = 106
	offDigestSalt  = 110
	offDigestIter  = 142
	offDEKSalt     = 146
	offDEKIter     = 178
	offEncDEKLen   = 182
	offEncDEK      = 186
	nameLen        = 32
	saltLen        = 32
	digestMax      = 32
	encDEKMax      = 64
	storeMagic     = 0x454e4353
	storeVersion   = 0x0100
	maxIterations  = 1 << 24 // 16.7M: far above what VirtualBox's 250 ms benchmark picks
	minIterations  = 20000   // VirtualBox's minimum for new stores
	maxEncodedSize = 4096    // the base64 text of 250 bytes is ~340 characters
)

// Cipher names VirtualBox knows (VDFilterCrypt's algorithm table).
const (
	XTS128 = "AES-XTS128-PLAIN64"
	XTS256 = "AES-XTS256-PLAIN64"
)

// ErrPassword is wrapped by Unlock's error for a wrong password.
var ErrPassword = errors.New("the password does not unlock the key store")

// Store is a parsed VirtualBox key store.
type Store struct {
	Cipher     string // XTS128 or XTS256
	KDF        string // PBKDF2-SHA1, PBKDF2-SHA256, PBKDF2-SHA512
	KeyLen     int    // DEK size in bytes (32 or 64)
	Digest     []byte // DEK digest (DigestLen bytes)
	DigestSalt [saltLen]byte
	DigestIter int
	DEKSalt    [saltLen]byte
	DEKIter    int
	EncDEK     []byte // encrypted DEK (KeyLen bytes)
}

// KeyLenOf returns the DEK size of a cipher name, 0 for an unknown one.
func KeyLenOf(cipher string) int {
	switch cipher {
	case XTS128:
		return 32
	case XTS256:
		return 64
	}
	return 0
}

func kdfHash(kdf string) (func() hash.Hash, int) {
	switch kdf {
	case "PBKDF2-SHA1":
		return sha1.New, sha1.Size
	case "PBKDF2-SHA256":
		return sha256.New, sha256.Size
	case "PBKDF2-SHA512":
		return sha512.New, sha512.Size
	}
	return nil, 0
}

// cstr reads a NUL-padded name field; it must be printable ASCII.
func cstr(b []byte) (string, bool) {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	for _, c := range b {
		if c < 0x20 || c > 0x7e {
			return "", false
		}
	}
	return string(b), true
}

// Decode parses the base64 text of a CRYPT/KeyStore property (line breaks
// and other white space, and XML's &#13;&#10; escapes, are ignored). name
// says where the store came from, for errors.
func Decode(name, text string) (*Store, error) {
	if len(text) > maxEncodedSize {
		return nil, driver.Corruptf(name, -1, "VirtualBox key store: %d characters of base64 is far more than a 250-byte store", len(text))
	}
	text = strings.NewReplacer("&#13;", "", "&#10;", "", "&#xD;", "", "&#xA;", "").Replace(text)
	text = strings.Map(func(r rune) rune {
		switch r {
		case ' ', '\t', '\r', '\n':
			return -1
		}
		return r
	}, text)
	raw, err := base64.StdEncoding.DecodeString(text)
	if err != nil {
		return nil, driver.Corruptf(name, -1, "VirtualBox key store: not valid base64: %v", err)
	}
	return Parse(name, raw)
}

// Parse checks a binary key store, every field against its bounds.
func Parse(name string, b []byte) (*Store, error) {
	bad := func(off int64, format string, args ...any) error {
		return driver.Corruptf(name, off, "VirtualBox key store: "+format, args...)
	}
	if len(b) != StoreSize {
		return nil, bad(-1, "%d bytes, a key store has %d", len(b), StoreSize)
	}
	le := binary.LittleEndian
	if m := le.Uint32(b[offMagic:]); m != storeMagic {
		return nil, bad(offMagic, "magic %#08x is not %#08x (\"SCNE\")", m, storeMagic)
	}
	if v := le.Uint16(b[offVersion:]); v != storeVersion {
		return nil, driver.Errorf(driver.ErrUnsupported, name, offVersion, "VirtualBox key store: version %#04x, only %#04x is known", v, storeVersion)
	}
	s := &Store{}
	var ok bool
	if s.Cipher, ok = cstr(b[offCipher : offCipher+nameLen]); !ok {
		return nil, bad(offCipher, "cipher name is not printable text")
	}
	if s.KDF, ok = cstr(b[offKDF : offKDF+nameLen]); !ok {
		return nil, bad(offKDF, "key derivation name is not printable text")
	}
	want := KeyLenOf(s.Cipher)
	if want == 0 {
		return nil, driver.Errorf(driver.ErrUnsupported, name, offCipher, "VirtualBox key store: cipher %q (known: %s, %s)", s.Cipher, XTS128, XTS256)
	}
	h, hsize := kdfHash(s.KDF)
	if h == nil {
		return nil, driver.Errorf(driver.ErrUnsupported, name, offKDF, "VirtualBox key store: key derivation %q (known: PBKDF2-SHA1, PBKDF2-SHA256, PBKDF2-SHA512)", s.KDF)
	}
	if kl := le.Uint32(b[offKeyLen:]); kl != uint32(want) {
		return nil, bad(offKeyLen, "key size %d does not match cipher %s (%d bytes)", kl, s.Cipher, want)
	}
	s.KeyLen = want
	dl := le.Uint32(b[offDigestLen:])
	if dl == 0 || dl > digestMax {
		return nil, bad(offDigestLen, "DEK digest length %d is outside 1..%d", dl, digestMax)
	}
	if hsize > digestMax {
		// VirtualBox compares as many bytes as the hash has, more than the
		// field holds: such a store cannot be checked (nor made by it).
		return nil, driver.Errorf(driver.ErrUnsupported, name, offKDF, "VirtualBox key store: %s digests (%d bytes) do not fit the 32-byte digest field", s.KDF, hsize)
	}
	if int(dl) != hsize {
		return nil, bad(offDigestLen, "DEK digest length %d is not the %s size %d", dl, s.KDF, hsize)
	}
	s.Digest = append([]byte(nil), b[offDigest:offDigest+int(dl)]...)
	copy(s.DigestSalt[:], b[offDigestSalt:])
	copy(s.DEKSalt[:], b[offDEKSalt:])
	for _, f := range []struct {
		off  int
		dst  *int
		what string
	}{{offDigestIter, &s.DigestIter, "DEK digest"}, {offDEKIter, &s.DEKIter, "key derivation"}} {
		n := le.Uint32(b[f.off:])
		if n == 0 || n > maxIterations {
			return nil, bad(int64(f.off), "%s iteration count %d is outside 1..%d", f.what, n, maxIterations)
		}
		*f.dst = int(n)
	}
	el := le.Uint32(b[offEncDEKLen:])
	if el != uint32(want) {
		return nil, bad(offEncDEKLen, "encrypted DEK length %d, the cipher's key is %d bytes", el, want)
	}
	s.EncDEK = append([]byte(nil), b[offEncDEK:offEncDEK+int(el)]...)
	return s, nil
}

// Marshal returns the 250-byte binary store.
func (s *Store) Marshal() []byte {
	b := make([]byte, StoreSize)
	le := binary.LittleEndian
	le.PutUint32(b[offMagic:], storeMagic)
	le.PutUint16(b[offVersion:], storeVersion)
	copy(b[offCipher:offCipher+nameLen-1], s.Cipher)
	copy(b[offKDF:offKDF+nameLen-1], s.KDF)
	le.PutUint32(b[offKeyLen:], uint32(s.KeyLen))
	copy(b[offDigest:offDigest+digestMax], s.Digest)
	le.PutUint32(b[offDigestLen:], uint32(len(s.Digest)))
	copy(b[offDigestSalt:], s.DigestSalt[:])
	le.PutUint32(b[offDigestIter:], uint32(s.DigestIter))
	copy(b[offDEKSalt:], s.DEKSalt[:])
	le.PutUint32(b[offDEKIter:], uint32(s.DEKIter))
	le.PutUint32(b[offEncDEKLen:], uint32(len(s.EncDEK)))
	copy(b[offEncDEK:offEncDEK+encDEKMax], s.EncDEK)
	return b
}

// Encode returns the base64 text VirtualBox keeps in CRYPT/KeyStore, in
// lines of 64 characters as IPRT writes it (joined by "\n").
func (s *Store) Encode() string {
	t := base64.StdEncoding.EncodeToString(s.Marshal())
	var sb strings.Builder
	for len(t) > 64 {
		sb.WriteString(t[:64])
		sb.WriteByte('\n')
		t = t[64:]
	}
	sb.WriteString(t)
	return sb.String()
}

// Unlock derives the KEK from password, decrypts the DEK and checks it
// against the digest. A wrong password is an error wrapping ErrPassword and
// driver.ErrInvalidOption. The caller wipes the DEK.
func (s *Store) Unlock(name string, password []byte) ([]byte, error) {
	h, _ := kdfHash(s.KDF)
	if h == nil || KeyLenOf(s.Cipher) != s.KeyLen || len(s.EncDEK) != s.KeyLen || len(s.Digest) == 0 {
		return nil, driver.Corruptf(name, -1, "VirtualBox key store: inconsistent store (not from Parse or NewStore)")
	}
	kek := pbkdf2.Key(password, s.DEKSalt[:], s.DEKIter, s.KeyLen, h)
	defer driver.Wipe(kek)
	dek, err := xtsOnce(kek, s.EncDEK, false)
	if err != nil {
		return nil, driver.Corruptf(name, -1, "VirtualBox key store: %v", err)
	}
	d := pbkdf2.Key(dek, s.DigestSalt[:], s.DigestIter, len(s.Digest), h)
	if subtle.ConstantTimeCompare(d, s.Digest) != 1 {
		driver.Wipe(dek)
		return nil, &driver.Error{Op: "open", File: name, Offset: -1,
			Reason: "the password does not unlock the VirtualBox key store (wrong key-secret?)",
			Err:    fmt.Errorf("%w: %w", ErrPassword, driver.ErrInvalidOption)}
	}
	return dek, nil
}

// NewStore protects dek (32 bytes for XTS128, 64 for XTS256) with password
// as VirtualBox does: PBKDF2-SHA256 with random salts, iter iterations for
// the KEK (at least 20000; 0 means VirtualBox's minimum) and 20000 for the
// digest.
func NewStore(cipher string, password, dek []byte, iter int) (*Store, error) {
	if iter == 0 {
		iter = minIterations
	}
	if iter < minIterations || iter > maxIterations {
		return nil, driver.OptionErrorf("VirtualBox encryption: iteration count %d is outside %d..%d", iter, minIterations, maxIterations)
	}
	return NewStoreIterations(cipher, password, dek, iter, minIterations)
}

// NewStoreIterations is NewStore with both iteration counts chosen freely
// (1..16M): for tests, which unlock stores often. VirtualBox itself never
// makes fewer than 20000.
func NewStoreIterations(cipher string, password, dek []byte, kekIter, digestIter int) (*Store, error) {
	kl := KeyLenOf(cipher)
	if kl == 0 {
		return nil, driver.OptionErrorf("VirtualBox encryption: unknown cipher %q (use %s or %s)", cipher, XTS256, XTS128)
	}
	if len(dek) != kl {
		return nil, driver.OptionErrorf("VirtualBox encryption: %s needs a %d-byte key, got %d", cipher, kl, len(dek))
	}
	for _, n := range []int{kekIter, digestIter} {
		if n < 1 || n > maxIterations {
			return nil, driver.OptionErrorf("VirtualBox encryption: iteration count %d is outside 1..%d", n, maxIterations)
		}
	}
	s := &Store{Cipher: cipher, KDF: "PBKDF2-SHA256", KeyLen: kl, DigestIter: digestIter, DEKIter: kekIter}
	if _, err := rand.Read(s.DigestSalt[:]); err != nil {
		return nil, err
	}
	if _, err := rand.Read(s.DEKSalt[:]); err != nil {
		return nil, err
	}
	s.Digest = pbkdf2.Key(dek, s.DigestSalt[:], s.DigestIter, sha256.Size, sha256.New)
	kek := pbkdf2.Key(password, s.DEKSalt[:], s.DEKIter, kl, sha256.New)
	defer driver.Wipe(kek)
	enc, err := xtsOnce(kek, dek, true)
	if err != nil {
		return nil, err
	}
	s.EncDEK = enc
	return s, nil
}

// NewDEK returns a random key for cipher.
func NewDEK(cipher string) ([]byte, error) {
	kl := KeyLenOf(cipher)
	if kl == 0 {
		return nil, driver.OptionErrorf("VirtualBox encryption: unknown cipher %q (use %s or %s)", cipher, XTS256, XTS128)
	}
	dek := make([]byte, kl)
	if _, err := rand.Read(dek); err != nil {
		return nil, err
	}
	return dek, nil
}
