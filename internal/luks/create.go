package luks

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"time"

	"github.com/vdisk/vdisk/driver"
)

// CreateOptions describe a new volume header.
type CreateOptions struct {
	// Version is 1 (qemu's format, the default) or 2.
	Version  int
	Cipher   Spec
	KeyBytes int
	// Hash is the PBKDF2 hash of the key slots and the digest.
	Hash string
	// IterTime calibrates PBKDF2 iteration counts (qemu's iter-time);
	// Iterations, when > 0, fixes the slot's count instead.
	IterTime   time.Duration
	Iterations int
	// SectorSize is the LUKS2 encryption sector (512 or 4096).
	SectorSize int
	// KDF is the LUKS2 key slot derivation: "pbkdf2" (default),
	// "argon2i" or "argon2id" with ArgonTime, ArgonMemoryKiB, ArgonThreads.
	KDF            string
	ArgonTime      int
	ArgonMemoryKiB int
	ArgonThreads   int
	// Rand is the randomness source (crypto/rand when nil).
	Rand io.Reader
}

// Create builds a header and a fresh random volume key, and stores the key
// in slot 0 under pass, writing key material and header to w. It returns
// the header and the volume key (the caller wipes it).
func Create(w io.WriterAt, o CreateOptions, pass []byte) (*Header, []byte, error) {
	rnd := o.Rand
	if rnd == nil {
		rnd = rand.Reader
	}
	if err := o.Cipher.validate(); err != nil {
		return nil, nil, driver.OptionErrorf("%v", err)
	}
	if !o.Cipher.ValidKeyBytes(o.KeyBytes) {
		return nil, nil, driver.OptionErrorf("a %d-byte key does not fit %s", o.KeyBytes, o.Cipher)
	}
	if o.Hash == "" {
		o.Hash = "sha256"
	}
	if _, err := HashFunc(o.Hash); err != nil {
		return nil, nil, driver.OptionErrorf("%v", err)
	}
	iters := o.Iterations
	if iters <= 0 {
		n, err := Calibrate(o.Hash, o.KeyBytes, o.IterTime)
		if err != nil {
			return nil, nil, err
		}
		iters = n
	}
	iters = max(iters, MinIterations)
	key := make([]byte, o.KeyBytes)
	if _, err := io.ReadFull(rnd, key); err != nil {
		return nil, nil, err
	}
	h := &Header{Version: 1, Cipher: o.Cipher, KeyBytes: o.KeyBytes, SectorSize: 512, DataSize: -1, Hash: o.Hash, UUID: newUUID(rnd)}
	// The digest takes an eighth of the slot's time (as qemu does), at
	// least the minimum.
	h.Digest = Digest{Hash: o.Hash, Iterations: max(iters/8, MinIterations), Salt: make([]byte, 32)}
	if _, err := io.ReadFull(rnd, h.Digest.Salt); err != nil {
		return nil, nil, err
	}
	dlen := v1DigestLen
	if o.Version == 2 {
		hf, _ := HashFunc(o.Hash)
		dlen = hf().Size()
	}
	hf, _ := HashFunc(o.Hash)
	h.Digest.Value = PBKDF2(hf, key, h.Digest.Salt, h.Digest.Iterations, dlen)
	area := (int64(o.KeyBytes)*Stripes + 4095) &^ 4095
	kdf := KDF{Type: "pbkdf2", Hash: o.Hash, Iterations: iters}
	switch o.Version {
	case 0, 1:
		// qemu's layout: slot areas of whole 4 KiB from 4 KiB on, the
		// payload right after the eighth.
		for i := 0; i < v1Slots; i++ {
			h.Slots = append(h.Slots, Slot{ID: i, Offset: 4096 + int64(i)*area, Size: area, Stripes: Stripes,
				AFHash: o.Hash, Cipher: o.Cipher, KeyBytes: o.KeyBytes, KDF: KDF{Type: "pbkdf2", Hash: o.Hash}})
		}
		h.PayloadOffset = 4096 + v1Slots*area
	case 2:
		h.Version = 2
		ss := o.SectorSize
		if ss == 0 {
			ss = 512
		}
		if ss != 512 && ss != 4096 {
			return nil, nil, driver.OptionErrorf("LUKS2 sector size %d (512 or 4096)", ss)
		}
		h.SectorSize = ss
		h.PayloadOffset = 2*v2DefaultHdr + v2DefaultAreaSz
		if err := h.initV2(); err != nil {
			return nil, nil, err
		}
		if o.KDF != "" && o.KDF != "pbkdf2" {
			// cryptsetup's floors: 32 KiB of memory; 4 passes by default.
			t := o.ArgonTime
			if t <= 0 {
				t = 4
			}
			kdf = KDF{Type: o.KDF, Time: t, MemoryKiB: max(o.ArgonMemoryKiB, 32), Threads: max(o.ArgonThreads, 1)}
		}
	default:
		return nil, nil, driver.OptionErrorf("LUKS version %d (1 or 2)", o.Version)
	}
	if err := h.SetSlot(w, 0, key, pass, kdf, rnd); err != nil {
		wipe(key)
		return nil, nil, err
	}
	return h, key, nil
}

// initV2 builds the JSON objects of a new LUKS2 header: one dynamic crypt
// segment at the payload offset and its digest.
func (h *Header) initV2() error {
	st := &v2State{hdrSize: v2DefaultHdr, csumAlg: "sha256", areaSize: v2DefaultAreaSz, meta: map[string]json.RawMessage{}, digestID: "0"}
	seg := map[string]jSegment{"0": {Type: "crypt", Offset: strconv.FormatInt(h.PayloadOffset, 10), Size: "dynamic",
		IVTweak: "0", Encryption: h.Cipher.String(), SectorSize: h.SectorSize}}
	cfg := map[string]string{"json_size": strconv.FormatInt(v2DefaultHdr-v2BinSize, 10), "keyslots_size": strconv.FormatInt(v2DefaultAreaSz, 10)}
	dg := jDigest{Type: "pbkdf2", Keyslots: []string{}, Segments: []string{"0"}, Hash: h.Digest.Hash, Iterations: h.Digest.Iterations,
		Salt: base64.StdEncoding.EncodeToString(h.Digest.Salt), Digest: base64.StdEncoding.EncodeToString(h.Digest.Value)}
	var err error
	for k, v := range map[string]any{"segments": seg, "config": cfg, "tokens": map[string]any{}, "keyslots": map[string]any{},
		"digests": map[string]any{"0": dg}} {
		if st.meta[k], err = json.Marshal(v); err != nil {
			return err
		}
	}
	raw, _ := json.Marshal(dg)
	if err := json.Unmarshal(raw, &st.digest); err != nil {
		return err
	}
	h.v2 = st
	return nil
}

func newUUID(rnd io.Reader) string {
	var u [16]byte
	io.ReadFull(rnd, u[:])
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:])
}
