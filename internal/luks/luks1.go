package luks

import (
	"bytes"
	"encoding/binary"
	"io"

	"github.com/vdisk/vdisk/driver"
)

// LUKS1 header layout (big-endian).
const (
	v1HeaderSize  = 592
	v1Slots       = 8
	v1SlotSize    = 48
	v1SlotsOff    = 208
	v1DigestLen   = 20
	v1SaltLen     = 32
	slotActive    = 0x00AC71F3
	slotInactive  = 0x0000DEAD
	offCipherName = 8
	offCipherMode = 40
	offHashSpec   = 72
	offPayload    = 104
	offKeyBytes   = 108
	offMKDigest   = 112
	offMKSalt     = 132
	offMKIter     = 164
	offUUID       = 168
)

func cstr(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

func readV1(r io.ReaderAt, size int64, name string) (*Header, error) {
	b := make([]byte, v1HeaderSize)
	if err := driver.ReadFullAt(r, b, 0); err != nil {
		return nil, driver.Corruptf(name, 0, "LUKS1 header: %v", err)
	}
	be := binary.BigEndian
	h := &Header{Version: 1, SectorSize: 512, DataSize: -1}
	var err error
	if h.Cipher, err = ParseSpec(cstr(b[offCipherName:offCipherMode]), cstr(b[offCipherMode:offHashSpec])); err != nil {
		return nil, driver.Unsupportedf(name, "LUKS1 cipher: %v", err)
	}
	h.Hash = cstr(b[offHashSpec:offPayload])
	if _, err := HashFunc(h.Hash); err != nil {
		return nil, driver.Unsupportedf(name, "LUKS1 hash spec: %v", err)
	}
	h.PayloadOffset = int64(be.Uint32(b[offPayload:])) * 512
	h.KeyBytes = int(be.Uint32(b[offKeyBytes:]))
	if !h.Cipher.ValidKeyBytes(h.KeyBytes) {
		return nil, driver.Corruptf(name, offKeyBytes, "LUKS1 key of %d bytes does not fit %s", h.KeyBytes, h.Cipher)
	}
	h.Digest = Digest{Hash: h.Hash, Iterations: int(be.Uint32(b[offMKIter:])),
		Salt:  append([]byte(nil), b[offMKSalt:offMKSalt+v1SaltLen]...),
		Value: append([]byte(nil), b[offMKDigest:offMKDigest+v1DigestLen]...)}
	if h.Digest.Iterations < 1 {
		return nil, driver.Corruptf(name, offMKIter, "LUKS1 master key digest iteration count is 0")
	}
	h.UUID = cstr(b[offUUID : offUUID+40])
	for i := 0; i < v1Slots; i++ {
		o := v1SlotsOff + i*v1SlotSize
		sb := b[o : o+v1SlotSize]
		s := Slot{ID: i, Stripes: int(be.Uint32(sb[44:])), AFHash: h.Hash, Cipher: h.Cipher, KeyBytes: h.KeyBytes,
			KDF:    KDF{Type: "pbkdf2", Hash: h.Hash, Iterations: int(be.Uint32(sb[4:])), Salt: append([]byte(nil), sb[8:40]...)},
			Offset: int64(be.Uint32(sb[40:])) * 512}
		switch be.Uint32(sb) {
		case slotActive:
			s.Active = true
		case slotInactive:
		default:
			return nil, driver.Corruptf(name, int64(o), "LUKS1 key slot %d has an invalid state 0x%08x", i, be.Uint32(sb))
		}
		if s.Stripes != Stripes {
			return nil, driver.Corruptf(name, int64(o+44), "LUKS1 key slot %d has %d stripes (LUKS uses %d)", i, s.Stripes, Stripes)
		}
		s.Size = s.materialLen()
		if s.Active {
			if s.KDF.Iterations < 1 {
				return nil, driver.Corruptf(name, int64(o+4), "LUKS1 key slot %d has an iteration count of 0", i)
			}
			if err := checkSlotArea(&s, size, v1HeaderSize, name, int64(o+40)); err != nil {
				return nil, err
			}
			if h.PayloadOffset > 0 && s.Offset+s.Size > h.PayloadOffset {
				return nil, driver.Corruptf(name, int64(o+40), "LUKS1 key slot %d material ends past the payload offset %d", i, h.PayloadOffset)
			}
		}
		h.Slots = append(h.Slots, s)
	}
	// Active slots' areas must not overlap (qemu checks the same).
	for i := range h.Slots {
		for j := i + 1; j < len(h.Slots); j++ {
			a, c := &h.Slots[i], &h.Slots[j]
			if a.Active && c.Active && a.Offset < c.Offset+c.Size && c.Offset < a.Offset+a.Size {
				return nil, driver.Corruptf(name, int64(v1SlotsOff+j*v1SlotSize+40), "LUKS1 key slots %d and %d overlap", i, j)
			}
		}
	}
	return h, nil
}

func (h *Header) marshalV1() []byte {
	b := make([]byte, v1HeaderSize)
	be := binary.BigEndian
	copy(b, Magic)
	be.PutUint16(b[6:], 1)
	copy(b[offCipherName:offCipherMode], h.Cipher.Name())
	copy(b[offCipherMode:offHashSpec], h.Cipher.ModeString())
	copy(b[offHashSpec:offPayload], h.Hash)
	be.PutUint32(b[offPayload:], uint32(h.PayloadOffset/512))
	be.PutUint32(b[offKeyBytes:], uint32(h.KeyBytes))
	copy(b[offMKDigest:offMKDigest+v1DigestLen], h.Digest.Value)
	copy(b[offMKSalt:offMKSalt+v1SaltLen], h.Digest.Salt)
	be.PutUint32(b[offMKIter:], uint32(h.Digest.Iterations))
	copy(b[offUUID:offUUID+40], h.UUID)
	for _, s := range h.Slots {
		if s.ID < 0 || s.ID >= v1Slots {
			continue
		}
		sb := b[v1SlotsOff+s.ID*v1SlotSize:]
		state := uint32(slotInactive)
		if s.Active {
			state = slotActive
			be.PutUint32(sb[4:], uint32(s.KDF.Iterations))
			copy(sb[8:40], s.KDF.Salt)
		}
		be.PutUint32(sb, state)
		be.PutUint32(sb[40:], uint32(s.Offset/512))
		be.PutUint32(sb[44:], uint32(s.Stripes))
	}
	return b
}
