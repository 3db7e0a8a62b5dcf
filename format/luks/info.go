package luks

import "github.com/vdisk/vdisk/driver"

// Specific is the format-specific part of info, with qemu's field names
// (qemu-img info's "format-specific" for luks); Version and SectorSize are
// vdisk's additions for LUKS2.
type Specific struct {
	CipherAlg      string     `json:"cipher-alg"`
	CipherMode     string     `json:"cipher-mode"`
	IVGenAlg       string     `json:"ivgen-alg,omitempty"`
	IVGenHashAlg   string     `json:"ivgen-hash-alg,omitempty"`
	HashAlg        string     `json:"hash-alg"`
	PayloadOffset  int64      `json:"payload-offset"`
	MasterKeyIters int        `json:"master-key-iters"`
	UUID           string     `json:"uuid"`
	Slots          []SlotInfo `json:"slots"`
	Version        int        `json:"luks-version"`
	SectorSize     int        `json:"sector-size"`
}

// SlotInfo is one key slot, as qemu shows it; KDF is added for LUKS2.
type SlotInfo struct {
	Active    bool   `json:"active"`
	Iters     int    `json:"iters,omitempty"`
	Stripes   int    `json:"stripes,omitempty"`
	KeyOffset int64  `json:"key-offset"`
	KDF       string `json:"kdf,omitempty"`
}

func (im *image) Info() driver.Info {
	im.hmu.Lock()
	defer im.hmu.Unlock()
	h := im.hdr
	s := &Specific{CipherAlg: im.cipherAlg(), CipherMode: h.Cipher.Mode, IVGenAlg: h.Cipher.IVGen, IVGenHashAlg: h.Cipher.IVHash,
		HashAlg: h.Digest.Hash, PayloadOffset: h.PayloadOffset, MasterKeyIters: h.Digest.Iterations, UUID: h.UUID,
		Version: h.Version, SectorSize: h.SectorSize, Slots: []SlotInfo{}}
	if h.Version == 1 {
		s.HashAlg = h.Hash
	}
	for _, sl := range h.Slots {
		si := SlotInfo{Active: sl.Active, KeyOffset: sl.Offset}
		if sl.Active {
			si.Iters, si.Stripes = sl.KDF.Iterations, sl.Stripes
			if h.Version == 2 {
				si.KDF = sl.KDF.Type
				if sl.KDF.Type != "pbkdf2" {
					si.Iters = sl.KDF.Time
				}
			}
		}
		s.Slots = append(s.Slots, si)
	}
	return driver.Info{Format: "luks", VirtualSize: im.Size(), ClusterSize: im.ss, Encrypted: true, EncryptFormat: "luks", Specific: s}
}
