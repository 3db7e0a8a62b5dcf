package vboxcrypt

import (
	"bytes"
	"crypto/aes"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"golang.org/x/crypto/pbkdf2"
	"golang.org/x/crypto/xts"
)

// Key stores VirtualBox made (CRYPT/KeyStore values published in public
// write-ups about VirtualBox disk encryption; one as a Windows host wrote
// it, with CRLF line breaks escaped for XML). Their passwords are unknown:
// they check the layout, not the unlocking.
var realStores = []struct {
	text             string
	dekIter, dgsIter int
}{
	{"U0NORQABQUVTLVhUUzI1Ni1QTEFJTjY0AAAAAAAAAAAAAAAAAABQQktERjItU0hBMjU2AAAAAAAAAAAAAAAAAAAAAAAAAEAAAABvS/VqJLI2X44BS9+Njw3CzwckGpyuZxS6nYgC/BzCByAAAABqCM2V9MpQ7RvyfCdcFAQXjriay2YBKLXItWZzFTxsGiBOAAD4oQv/5wWedWE4p16mQaya8vwUZ/i/koAHa63lWJvmSMDUAQBAAAAAmLe9bB4Q/2gGzS2l3kgMlnR3sVRMvOztBG/kTz63jBkVv34TWHzxSWcdu8RHlrNFbkoqkCvY7udQKZV43ZaKqg==", 120000, 20000},
	{"U0NORQABQUVTLVhUUzI1Ni1QTEFJTjY0AAAAAAAAAAAAAAAAAABQQktERjItU0hB&#13;&#10;MjU2AAAAAAAAAAAAAAAAAAAAAAAAAEAAAABUQgV7yASjqRRgfezqVXSqcDjNzg1J&#13;&#10;jH/ENK/ozVskTyAAAADpYIvN2MBwhohZoxyfHl5d6YterYwh8lwMQ+5peBbjLCBO&#13;&#10;AABUYpGmB0lDsJbqgNsq451Bed5tHD8X6iXWLmJ6v6f7y2A9CABAAAAAo4alQy6T&#13;&#10;jyDI+8mvRgp4wXkMGavRxR6cC+ckk5yUgVhhgPxKNBNdhIHkNtjBMrj0uaVQ3ksk&#13;&#10;gwC6MrGLZFhl1g==", 540000, 20000},
}

func TestRealStores(t *testing.T) {
	for i, rs := range realStores {
		s, err := Decode("real", rs.text)
		if err != nil {
			t.Fatalf("store %d: %v", i, err)
		}
		if s.Cipher != XTS256 || s.KDF != "PBKDF2-SHA256" || s.KeyLen != 64 || len(s.Digest) != 32 || len(s.EncDEK) != 64 || s.DEKIter != rs.dekIter || s.DigestIter != rs.dgsIter {
			t.Fatalf("store %d parsed as %+v", i, s)
		}
		raw, _ := base64.StdEncoding.DecodeString(strings.ReplaceAll(rs.text, "&#13;&#10;", ""))
		if !bytes.Equal(s.Marshal(), raw) {
			t.Fatalf("store %d: Marshal does not give VirtualBox's bytes back", i)
		}
		if i > 0 {
			continue // one costly unlock is enough
		}
		if _, err := s.Unlock("real", []byte("not the password")); !errors.Is(err, ErrPassword) {
			t.Fatalf("store %d: unlock with a guess: %v", i, err)
		}
	}
}

// handStore builds a store straight from the documented layout (offsets
// written out here, not taken from the package).
func handStore(t *testing.T, cipher, kdf string, pw, dek []byte, dekIter, dgsIter int) []byte {
	t.Helper()
	h := sha256.New
	hs := 32
	if kdf == "PBKDF2-SHA1" {
		h, hs = sha1.New, 20
	}
	b := make([]byte, 250)
	le := binary.LittleEndian
	copy(b[0:], "SCNE")
	le.PutUint16(b[4:], 0x0100)
	copy(b[6:], cipher)
	copy(b[38:], kdf)
	le.PutUint32(b[70:], uint32(len(dek)))
	dsalt := bytes.Repeat([]byte{0x5a}, 32)
	copy(b[110:], dsalt)
	le.PutUint32(b[142:], uint32(dgsIter))
	copy(b[74:], pbkdf2.Key(dek, dsalt, dgsIter, hs, h))
	le.PutUint32(b[106:], uint32(hs))
	ksalt := bytes.Repeat([]byte{0xa5}, 32)
	copy(b[146:], ksalt)
	le.PutUint32(b[178:], uint32(dekIter))
	kek := pbkdf2.Key(pw, ksalt, dekIter, len(dek), h)
	c, err := xts.NewCipher(aes.NewCipher, kek)
	if err != nil {
		t.Fatal(err)
	}
	enc := make([]byte, len(dek))
	c.Encrypt(enc, dek, 0)
	le.PutUint32(b[182:], uint32(len(dek)))
	copy(b[186:], enc)
	return b
}

func TestHandBuiltStoreUnlocks(t *testing.T) {
	for _, tc := range []struct {
		cipher, kdf string
		keyLen      int
	}{{XTS256, "PBKDF2-SHA256", 64}, {XTS128, "PBKDF2-SHA256", 32}, {XTS256, "PBKDF2-SHA1", 64}} {
		dek := make([]byte, tc.keyLen)
		for i := range dek {
			dek[i] = byte(i*7 + 1)
		}
		b := handStore(t, tc.cipher, tc.kdf, []byte("s3cret"), dek, 1000, 500)
		s, err := Decode("hand", base64.StdEncoding.EncodeToString(b))
		if err != nil {
			t.Fatalf("%s/%s: %v", tc.cipher, tc.kdf, err)
		}
		got, err := s.Unlock("hand", []byte("s3cret"))
		if err != nil || !bytes.Equal(got, dek) {
			t.Fatalf("%s/%s: unlock = %x, %v", tc.cipher, tc.kdf, got, err)
		}
		if _, err := s.Unlock("hand", []byte("s3cret ")); !errors.Is(err, ErrPassword) || !errors.Is(err, driver.ErrInvalidOption) {
			t.Fatalf("%s/%s: wrong password: %v", tc.cipher, tc.kdf, err)
		}
		if !bytes.Equal(s.Marshal(), b) {
			t.Fatalf("%s/%s: Marshal differs from the hand-built store", tc.cipher, tc.kdf)
		}
	}
}

func TestNewStoreRoundTrip(t *testing.T) {
	for _, cipher := range []string{XTS128, XTS256} {
		dek, err := NewDEK(cipher)
		if err != nil {
			t.Fatal(err)
		}
		s, err := NewStore(cipher, []byte("pässwörd"), dek, 0)
		if err != nil {
			t.Fatal(err)
		}
		text := s.Encode()
		for _, line := range strings.Split(text, "\n") {
			if len(line) > 64 {
				t.Fatalf("line of %d characters", len(line))
			}
		}
		if !strings.HasPrefix(text, "U0NORQAB") {
			t.Fatalf("encoded store starts %q, VirtualBox's start U0NORQAB", text[:8])
		}
		p, err := Decode("new", text)
		if err != nil {
			t.Fatal(err)
		}
		if p.DEKIter != 20000 || p.DigestIter != 20000 || p.KDF != "PBKDF2-SHA256" || p.Cipher != cipher {
			t.Fatalf("parsed %+v", p)
		}
		got, err := p.Unlock("new", []byte("pässwörd"))
		if err != nil || !bytes.Equal(got, dek) {
			t.Fatalf("%s: unlock: %v", cipher, err)
		}
		if _, err := p.Unlock("new", []byte("password")); !errors.Is(err, ErrPassword) {
			t.Fatalf("%s: wrong password: %v", cipher, err)
		}
	}
	if _, err := NewStore("AES-CBC", []byte("x"), make([]byte, 32), 0); !errors.Is(err, driver.ErrInvalidOption) {
		t.Fatalf("unknown cipher: %v", err)
	}
	if _, err := NewStore(XTS256, []byte("x"), make([]byte, 32), 0); !errors.Is(err, driver.ErrInvalidOption) {
		t.Fatalf("short key: %v", err)
	}
	if _, err := NewStore(XTS256, []byte("x"), make([]byte, 64), 100); !errors.Is(err, driver.ErrInvalidOption) {
		t.Fatalf("too few iterations: %v", err)
	}
}

func TestHostileStores(t *testing.T) {
	dek := make([]byte, 64)
	good := handStore(t, XTS256, "PBKDF2-SHA256", []byte("pw"), dek, 100, 100)
	le := binary.LittleEndian
	mut := func(f func(b []byte)) string {
		b := append([]byte(nil), good...)
		f(b)
		return base64.StdEncoding.EncodeToString(b)
	}
	for _, tc := range []struct {
		name, text string
		want       error
		off        int64
	}{
		{"short", base64.StdEncoding.EncodeToString(good[:249]), driver.ErrCorrupt, -1},
		{"long", base64.StdEncoding.EncodeToString(append(append([]byte(nil), good...), 0)), driver.ErrCorrupt, -1},
		{"not base64", "U0NORQAB!!!", driver.ErrCorrupt, -1},
		{"huge text", strings.Repeat("A", 1<<20), driver.ErrCorrupt, -1},
		{"magic", mut(func(b []byte) { b[0] = 'X' }), driver.ErrCorrupt, 0},
		{"version", mut(func(b []byte) { le.PutUint16(b[4:], 0x0200) }), driver.ErrUnsupported, 4},
		{"unknown cipher", mut(func(b []byte) { copy(b[6:38], "AES-CBC256\x00\x00\x00\x00\x00\x00\x00\x00\x00") }), driver.ErrUnsupported, 6},
		{"unprintable cipher", mut(func(b []byte) { b[7] = 0xff }), driver.ErrCorrupt, 6},
		{"unterminated cipher", mut(func(b []byte) {
			for i := 6; i < 38; i++ {
				b[i] = 'A'
			}
		}), driver.ErrUnsupported, 6},
		{"unknown kdf", mut(func(b []byte) { copy(b[38:70], "SCRYPT\x00\x00\x00\x00\x00\x00\x00") }), driver.ErrUnsupported, 38},
		{"sha512 kdf", mut(func(b []byte) { copy(b[38:70], "PBKDF2-SHA512") }), driver.ErrUnsupported, 38},
		{"key size huge", mut(func(b []byte) { le.PutUint32(b[70:], 0xffffffff) }), driver.ErrCorrupt, 70},
		{"key size of the other cipher", mut(func(b []byte) { le.PutUint32(b[70:], 32) }), driver.ErrCorrupt, 70},
		{"digest length 0", mut(func(b []byte) { le.PutUint32(b[106:], 0) }), driver.ErrCorrupt, 106},
		{"digest length huge", mut(func(b []byte) { le.PutUint32(b[106:], 1<<31) }), driver.ErrCorrupt, 106},
		{"digest length not the hash's", mut(func(b []byte) { le.PutUint32(b[106:], 20) }), driver.ErrCorrupt, 106},
		{"digest iterations 0", mut(func(b []byte) { le.PutUint32(b[142:], 0) }), driver.ErrCorrupt, 142},
		{"digest iterations huge", mut(func(b []byte) { le.PutUint32(b[142:], 0xffffffff) }), driver.ErrCorrupt, 142},
		{"kek iterations huge", mut(func(b []byte) { le.PutUint32(b[178:], 0x80000000) }), driver.ErrCorrupt, 178},
		{"encrypted key length huge", mut(func(b []byte) { le.PutUint32(b[182:], 0xffffffff) }), driver.ErrCorrupt, 182},
		{"encrypted key length short", mut(func(b []byte) { le.PutUint32(b[182:], 16) }), driver.ErrCorrupt, 182},
	} {
		_, err := Decode("ks", tc.text)
		if !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
			continue
		}
		var de *driver.Error
		if !errors.As(err, &de) || de.File != "ks" || de.Offset != tc.off {
			t.Errorf("%s: error %v does not name the store and offset %d", tc.name, err, tc.off)
		}
	}
	// A damaged digest or encrypted key parses but rejects the password.
	for _, off := range []int{74, 120, 150, 190} {
		b := append([]byte(nil), good...)
		b[off] ^= 1
		s, err := Parse("ks", b)
		if err != nil {
			t.Fatalf("offset %d: %v", off, err)
		}
		if _, err := s.Unlock("ks", []byte("pw")); !errors.Is(err, ErrPassword) {
			t.Fatalf("damage at %d: %v", off, err)
		}
	}
}

func FuzzKeyStore(f *testing.F) {
	for _, rs := range realStores {
		f.Add(rs.text)
	}
	dek := make([]byte, 32)
	s, err := NewStore(XTS128, []byte("fuzz"), dek, 0)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(s.Encode())
	dek64 := make([]byte, 64)
	s, err = NewStore(XTS256, []byte("fuzz"), dek64, 0)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(s.Encode())
	cheap := s.Marshal() // the same with few iterations, so unlocking is tried
	binary.LittleEndian.PutUint32(cheap[offDigestIter:], 100)
	binary.LittleEndian.PutUint32(cheap[offDEKIter:], 100)
	f.Add(base64.StdEncoding.EncodeToString(cheap))
	f.Add("")
	f.Fuzz(func(t *testing.T, text string) {
		s, err := Decode("fuzz", text)
		if err != nil {
			if !errors.Is(err, driver.ErrCorrupt) && !errors.Is(err, driver.ErrUnsupported) {
				t.Fatalf("unclassified error: %v", err)
			}
			return
		}
		if s.DEKIter > maxIterations || s.DigestIter > maxIterations || len(s.EncDEK) != s.KeyLen {
			t.Fatalf("bounds not enforced: %+v", s)
		}
		again, err := Parse("fuzz", s.Marshal())
		if err != nil {
			t.Fatalf("a parsed store does not parse after Marshal: %v", err)
		}
		if !bytes.Equal(again.Marshal(), s.Marshal()) {
			t.Fatal("Marshal is not stable")
		}
		// Unlocking costs the store's iterations: only try cheap ones.
		if s.DEKIter+s.DigestIter <= 4000 {
			if _, err := s.Unlock("fuzz", []byte("fuzz")); err != nil && !errors.Is(err, ErrPassword) {
				t.Fatalf("unlock: %v", err)
			}
		}
	})
}
