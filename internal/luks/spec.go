package luks

import (
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"fmt"
	"hash"
	"strings"
)

// Spec is a cipher specification: algorithm, chaining mode and IV
// generator ("aes", "xts", "plain64"), with the hash ESSIV uses.
type Spec struct {
	Alg    string // "aes"
	Mode   string // "xts", "cbc", "ecb"
	IVGen  string // "plain", "plain64", "plain64be", "essiv", "" (ecb)
	IVHash string // the ESSIV hash ("sha256")
}

// ParseSpec parses LUKS1's cipher name and mode ("aes", "xts-plain64",
// "cbc-essiv:sha256").
func ParseSpec(name, mode string) (Spec, error) {
	s := Spec{Alg: strings.ToLower(name)}
	m, iv, _ := strings.Cut(strings.ToLower(mode), "-")
	s.Mode = m
	iv, hash, _ := strings.Cut(iv, ":")
	s.IVGen, s.IVHash = iv, hash
	return s, s.validate()
}

// ParseEncryption parses LUKS2's "aes-xts-plain64" form.
func ParseEncryption(enc string) (Spec, error) {
	name, mode, ok := strings.Cut(enc, "-")
	if !ok {
		return Spec{}, fmt.Errorf("cipher %q has no mode", enc)
	}
	return ParseSpec(name, mode)
}

// Name is LUKS1's cipher name field.
func (s Spec) Name() string { return s.Alg }

// ModeString is LUKS1's cipher mode field ("xts-plain64").
func (s Spec) ModeString() string {
	m := s.Mode
	if s.IVGen != "" {
		m += "-" + s.IVGen
	}
	if s.IVHash != "" {
		m += ":" + s.IVHash
	}
	return m
}

// String is LUKS2's encryption string ("aes-xts-plain64").
func (s Spec) String() string { return s.Alg + "-" + s.ModeString() }

func (s Spec) validate() error {
	if s.Alg != "aes" {
		return fmt.Errorf("cipher %q is not supported (only aes)", s.Alg)
	}
	switch s.Mode {
	case "xts", "cbc":
		switch s.IVGen {
		case "plain", "plain64":
		case "plain64be":
		case "essiv":
			h, err := HashFunc(s.IVHash)
			if err != nil {
				return fmt.Errorf("essiv: %v", err)
			}
			if n := h().Size(); n != 16 && n != 24 && n != 32 {
				return fmt.Errorf("essiv hash %s gives %d bytes, not an AES key", s.IVHash, n)
			}
		default:
			return fmt.Errorf("IV generator %q is not supported (plain, plain64, plain64be, essiv)", s.IVGen)
		}
		if s.IVGen != "essiv" && s.IVHash != "" {
			return fmt.Errorf("IV generator %s takes no hash", s.IVGen)
		}
	case "ecb":
		if s.IVGen != "" {
			return fmt.Errorf("ecb takes no IV generator")
		}
	default:
		return fmt.Errorf("cipher mode %q is not supported (xts, cbc, ecb)", s.Mode)
	}
	return nil
}

// ValidKeyBytes reports whether n is a valid key length for the spec.
func (s Spec) ValidKeyBytes(n int) bool {
	if s.Mode == "xts" {
		return n == 32 || n == 48 || n == 64
	}
	return n == 16 || n == 24 || n == 32
}

// HashFunc returns the hash named as LUKS names it.
func HashFunc(name string) (func() hash.Hash, error) {
	switch strings.ToLower(name) {
	case "sha1":
		return sha1.New, nil
	case "sha224":
		return sha256.New224, nil
	case "sha256":
		return sha256.New, nil
	case "sha384":
		return sha512.New384, nil
	case "sha512":
		return sha512.New, nil
	}
	return nil, fmt.Errorf("hash %q is not supported (sha1, sha224, sha256, sha384, sha512)", name)
}
