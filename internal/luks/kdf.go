package luks

import (
	"crypto/hmac"
	"encoding/binary"
	"fmt"
	"hash"
	"time"

	"golang.org/x/crypto/argon2"
)

// Limits on what a header may ask of the key derivation, so that a hostile
// image cannot make an open allocate without bound. cryptsetup itself
// caps Argon2 memory at 4 GiB and parallelism at 4 threads by default.
const (
	MaxArgonMemoryKiB = 4 << 20 // 4 GiB
	MaxArgonTime      = 1 << 20
	MaxArgonThreads   = 255
	MaxIterations     = 1<<32 - 1
)

// KDF describes a key derivation: "pbkdf2" (Hash, Iterations) or
// "argon2i"/"argon2id" (Time, MemoryKiB, Threads).
type KDF struct {
	Type       string
	Hash       string
	Iterations int
	Time       int
	MemoryKiB  int
	Threads    int
	Salt       []byte
}

// Check validates the parameters against the limits.
func (k *KDF) Check() error {
	switch k.Type {
	case "pbkdf2":
		if _, err := HashFunc(k.Hash); err != nil {
			return err
		}
		if k.Iterations < 1 || int64(k.Iterations) > MaxIterations {
			return fmt.Errorf("pbkdf2 iteration count %d out of range [1, %d]", k.Iterations, int64(MaxIterations))
		}
	case "argon2i", "argon2id":
		if k.MemoryKiB < 8 || k.MemoryKiB > MaxArgonMemoryKiB {
			return fmt.Errorf("%s memory cost %d KiB out of range [8 KiB, %d KiB]: refusing to allocate it", k.Type, k.MemoryKiB, MaxArgonMemoryKiB)
		}
		if k.Time < 1 || k.Time > MaxArgonTime {
			return fmt.Errorf("%s time cost %d out of range [1, %d]", k.Type, k.Time, MaxArgonTime)
		}
		if k.Threads < 1 || k.Threads > MaxArgonThreads {
			return fmt.Errorf("%s parallelism %d out of range [1, %d]", k.Type, k.Threads, MaxArgonThreads)
		}
	default:
		return fmt.Errorf("key derivation %q is not supported (pbkdf2, argon2i, argon2id)", k.Type)
	}
	if len(k.Salt) == 0 || len(k.Salt) > 1024 {
		return fmt.Errorf("%s salt of %d bytes", k.Type, len(k.Salt))
	}
	return nil
}

// Derive derives n bytes from pass.
func (k *KDF) Derive(pass []byte, n int) ([]byte, error) {
	if err := k.Check(); err != nil {
		return nil, err
	}
	switch k.Type {
	case "pbkdf2":
		h, _ := HashFunc(k.Hash)
		return PBKDF2(h, pass, k.Salt, k.Iterations, n), nil
	case "argon2i":
		return argon2.Key(pass, k.Salt, uint32(k.Time), uint32(k.MemoryKiB), uint8(k.Threads), uint32(n)), nil
	default:
		return argon2.IDKey(pass, k.Salt, uint32(k.Time), uint32(k.MemoryKiB), uint8(k.Threads), uint32(n)), nil
	}
}

// PBKDF2 is RFC 8018's PBKDF2 with HMAC-h. It works on byte slices so the
// caller can wipe the password (the standard library's takes a string).
func PBKDF2(h func() hash.Hash, pass, salt []byte, iter, n int) []byte {
	prf := hmac.New(h, pass)
	hl := prf.Size()
	out := make([]byte, 0, (n+hl-1)/hl*hl)
	u := make([]byte, 0, hl)
	t := make([]byte, hl)
	var idx [4]byte
	for block := uint32(1); len(out) < n; block++ {
		prf.Reset()
		prf.Write(salt)
		binary.BigEndian.PutUint32(idx[:], block)
		prf.Write(idx[:])
		u = prf.Sum(u[:0])
		copy(t, u)
		for i := 1; i < iter; i++ {
			prf.Reset()
			prf.Write(u)
			u = prf.Sum(u[:0])
			for j := range t {
				t[j] ^= u[j]
			}
		}
		out = append(out, t...)
	}
	wipe(t)
	wipe(u[:hl])
	r := out[:n]
	wipe(out[n:cap(out)])
	return r
}

// MinIterations is the least PBKDF2 iteration count a new key slot or
// digest gets (qemu's and cryptsetup's floor).
const MinIterations = 1000

// Calibrate returns how many PBKDF2-hash iterations take about d on this
// machine (at least MinIterations), as qemu's iter-time option asks.
func Calibrate(hashName string, keyBytes int, d time.Duration) (int, error) {
	h, err := HashFunc(hashName)
	if err != nil {
		return 0, err
	}
	if d <= 0 {
		return MinIterations, nil
	}
	pass, salt := []byte("calibration passphrase"), make([]byte, 32)
	// Double the count until one run takes 20 ms or more, then scale.
	for iter := 1 << 12; ; iter *= 2 {
		start := time.Now()
		PBKDF2(h, pass, salt, iter, keyBytes)
		el := time.Since(start)
		if el >= 20*time.Millisecond || iter >= 1<<30 {
			n := float64(iter) * float64(d) / float64(max(el, time.Microsecond))
			return int(min(max(n, MinIterations), float64(MaxIterations))), nil
		}
	}
}
