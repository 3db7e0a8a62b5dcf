package luks

import (
	"crypto/rand"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"

	"github.com/vdisk/vdisk/driver"
)

// Magic starts every LUKS header (and LUKS2's first copy).
const Magic = "LUKS\xba\xbe"

// Stripes is the anti-forensic stripe count LUKS always uses.
const Stripes = 4000

// MaxKeyBytes bounds a volume key (AES-256-XTS needs 64).
const MaxKeyBytes = 64

// ErrPassphrase is what Unlock returns (wrapped, with
// driver.ErrInvalidOption) when no key slot accepts the passphrase.
var ErrPassphrase = errors.New("no key slot accepted the passphrase")

// Header is a parsed LUKS1 or LUKS2 header. Offsets are bytes from the
// start of the header (which qcow2 keeps inside its file).
type Header struct {
	Version    int
	Cipher     Spec
	KeyBytes   int
	SectorSize int
	// PayloadOffset is where the encrypted data starts.
	PayloadOffset int64
	// DataSize is the payload's length when the header fixes it (a LUKS2
	// segment with a size), or -1: up to the end of the file.
	DataSize int64
	IVTweak  uint64
	UUID     string
	// Hash is LUKS1's hash spec (slot PBKDF2, digest and AF hash).
	Hash   string
	Digest Digest
	Slots  []Slot
	v2     *v2State
}

// Digest identifies the right volume key: PBKDF2 of the key with Salt
// gives Value.
type Digest struct {
	Hash       string
	Iterations int
	Salt       []byte
	Value      []byte
}

// Slot is one key slot.
type Slot struct {
	ID     int
	Active bool
	KDF    KDF
	// Offset and Size locate the slot's key material area.
	Offset   int64
	Size     int64
	Stripes  int
	AFHash   string
	Cipher   Spec
	KeyBytes int
	// raw is the LUKS2 keyslot object as read, written back unchanged.
	raw []byte
}

// materialLen is the key material's length, whole 512-byte sectors.
func (s *Slot) materialLen() int64 {
	return (int64(s.KeyBytes)*int64(s.Stripes) + 511) &^ 511
}

// Read parses the header at the start of r (size bytes long; name is for
// errors). Every offset and length in it is checked against size and the
// format's limits.
func Read(r io.ReaderAt, size int64, name string) (*Header, error) {
	var pre [8]byte
	if err := driver.ReadFullAt(r, pre[:], 0); err != nil {
		return nil, driver.Corruptf(name, 0, "LUKS header: %v", err)
	}
	if string(pre[:6]) != Magic {
		if string(pre[:6]) == magic2 {
			return readV2(r, size, name)
		}
		return nil, driver.Corruptf(name, 0, "no LUKS magic")
	}
	switch v := int(pre[6])<<8 | int(pre[7]); v {
	case 1:
		return readV1(r, size, name)
	case 2:
		return readV2(r, size, name)
	default:
		return nil, driver.Unsupportedf(name, "LUKS version %d", v)
	}
}

// checkSlotArea bounds a key slot's material against the file and the
// header.
func checkSlotArea(s *Slot, size, headerEnd int64, name string, off int64) error {
	need := s.materialLen()
	if s.Offset < headerEnd || s.Offset > size || need > size-s.Offset {
		return driver.Corruptf(name, off, "key slot %d material [%d, +%d) lies outside the file (%d bytes) or inside the header", s.ID, s.Offset, need, size)
	}
	if s.Size > size-s.Offset {
		return driver.Corruptf(name, off, "key slot %d area [%d, +%d) lies outside the file (%d bytes)", s.ID, s.Offset, s.Size, size)
	}
	if s.Size < need {
		return driver.Corruptf(name, off, "key slot %d area of %d bytes is smaller than its %d bytes of key material", s.ID, s.Size, need)
	}
	return nil
}

// ActiveSlots counts the active key slots.
func (h *Header) ActiveSlots() int {
	n := 0
	for _, s := range h.Slots {
		if s.Active {
			n++
		}
	}
	return n
}

// Unlock tries pass on every active key slot and returns the volume key
// and the slot that opened. A wrong passphrase is ErrPassphrase.
func (h *Header) Unlock(r io.ReaderAt, pass []byte, name string) ([]byte, int, error) {
	var firstErr error
	for i := range h.Slots {
		s := &h.Slots[i]
		if !s.Active {
			continue
		}
		key, err := h.trySlot(r, s, pass)
		if err != nil {
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		if key != nil {
			return key, s.ID, nil
		}
	}
	if firstErr != nil {
		return nil, -1, driver.Errorf(driver.ErrCorrupt, name, -1, "no key slot accepted the passphrase; a slot could not be tried: %v", firstErr)
	}
	return nil, -1, &driver.Error{Op: "open", File: name, Offset: -1,
		Reason: "no key slot accepted the passphrase (wrong key-secret?)",
		Err:    fmt.Errorf("%w: %w", ErrPassphrase, driver.ErrInvalidOption)}
}

// trySlot returns the volume key when pass opens s, nil when it does not.
func (h *Header) trySlot(r io.ReaderAt, s *Slot, pass []byte) ([]byte, error) {
	af, err := HashFunc(s.AFHash)
	if err != nil {
		return nil, err
	}
	dk, err := s.KDF.Derive(pass, s.KeyBytes)
	if err != nil {
		return nil, err
	}
	defer wipe(dk)
	c, err := NewSectorCipher(s.Cipher, dk, 512)
	if err != nil {
		return nil, err
	}
	m := make([]byte, s.materialLen())
	defer wipe(m)
	if err := driver.ReadFullAt(r, m, s.Offset); err != nil {
		return nil, fmt.Errorf("key slot %d material: %w", s.ID, err)
	}
	c.Decrypt(m, 0)
	key, err := AFMerge(m, h.KeyBytes, s.Stripes, af)
	if err != nil {
		return nil, err
	}
	ok, err := h.CheckKey(key)
	if err != nil || !ok {
		wipe(key)
		return nil, err
	}
	return key, nil
}

// CheckKey reports whether key is the volume key (its digest matches).
func (h *Header) CheckKey(key []byte) (bool, error) {
	hf, err := HashFunc(h.Digest.Hash)
	if err != nil {
		return false, err
	}
	if len(key) != h.KeyBytes {
		return false, nil
	}
	d := PBKDF2(hf, key, h.Digest.Salt, h.Digest.Iterations, len(h.Digest.Value))
	return subtle.ConstantTimeCompare(d, h.Digest.Value) == 1, nil
}

// NewCipher returns the data cipher for key.
func (h *Header) NewCipher(key []byte) (*SectorCipher, error) {
	return NewSectorCipher(h.Cipher, key, h.SectorSize)
}

// Write writes the header (both copies for LUKS2) to w at 0.
func (h *Header) Write(w io.WriterAt) error {
	if h.Version == 2 {
		return h.writeV2(w)
	}
	_, err := w.WriteAt(h.marshalV1(), 0)
	return err
}

// HeaderEnd is the end of the binary/JSON header area.
func (h *Header) HeaderEnd() int64 {
	if h.Version == 2 {
		return 2 * h.v2.hdrSize
	}
	return v1HeaderSize
}

// SetSlot stores key in slot id under pass with kdf (its salt filled in
// here), writing the key material and then the header. The slot area is
// the one the slot has (LUKS1) or a free one of the keyslots area (LUKS2).
func (h *Header) SetSlot(w io.WriterAt, id int, key, pass []byte, kdf KDF, rnd io.Reader) error {
	if rnd == nil {
		rnd = rand.Reader
	}
	s, err := h.prepareSlot(id)
	if err != nil {
		return err
	}
	kdf.Salt = make([]byte, 32)
	if _, err := io.ReadFull(rnd, kdf.Salt); err != nil {
		return err
	}
	s.KDF = kdf
	af, err := HashFunc(s.AFHash)
	if err != nil {
		return err
	}
	m, err := AFSplit(key, s.Stripes, af, rnd)
	if err != nil {
		return err
	}
	defer wipe(m)
	buf := make([]byte, s.materialLen())
	copy(buf, m)
	defer wipe(buf)
	dk, err := kdf.Derive(pass, s.KeyBytes)
	if err != nil {
		return err
	}
	c, err := NewSectorCipher(s.Cipher, dk, 512)
	wipe(dk)
	if err != nil {
		return err
	}
	c.Encrypt(buf, 0)
	if _, err := w.WriteAt(buf, s.Offset); err != nil {
		return err
	}
	s.Active = true
	s.raw = nil
	for i := range h.Slots {
		if h.Slots[i].ID == s.ID {
			h.Slots[i] = *s
			return h.Write(w)
		}
	}
	h.Slots = append(h.Slots, *s)
	return h.Write(w)
}

// KillSlot deactivates slot id and overwrites its key material with random
// bytes, so the old passphrase can never open the volume again.
func (h *Header) KillSlot(w io.WriterAt, id int, rnd io.Reader) error {
	if rnd == nil {
		rnd = rand.Reader
	}
	for i := range h.Slots {
		s := &h.Slots[i]
		if s.ID != id || !s.Active {
			continue
		}
		junk := make([]byte, s.materialLen())
		if _, err := io.ReadFull(rnd, junk); err != nil {
			return err
		}
		if _, err := w.WriteAt(junk, s.Offset); err != nil {
			return err
		}
		s.Active = false
		if h.Version == 2 {
			h.Slots = append(h.Slots[:i], h.Slots[i+1:]...)
		} else {
			s.KDF = KDF{Type: "pbkdf2", Hash: h.Hash}
		}
		return h.Write(w)
	}
	return driver.OptionErrorf("key slot %d is not active", id)
}

// MaxSlots is the number of key slots the header version has.
func (h *Header) MaxSlots() int {
	if h.Version == 2 {
		return v2MaxSlots
	}
	return v1Slots
}

// Slot returns slot id, or nil when it is not active.
func (h *Header) Slot(id int) *Slot {
	for i := range h.Slots {
		if h.Slots[i].ID == id && h.Slots[i].Active {
			return &h.Slots[i]
		}
	}
	return nil
}

// FreeSlot returns the lowest inactive slot id, or -1.
func (h *Header) FreeSlot() int {
	for id := 0; id < h.MaxSlots(); id++ {
		if h.Slot(id) == nil {
			return id
		}
	}
	return -1
}

func (h *Header) prepareSlot(id int) (*Slot, error) {
	if id < 0 || id >= h.MaxSlots() {
		return nil, driver.OptionErrorf("key slot %d out of range [0, %d)", id, h.MaxSlots())
	}
	if h.Slot(id) != nil {
		return nil, driver.OptionErrorf("key slot %d is already active", id)
	}
	if h.Version == 2 {
		return h.newSlotV2(id)
	}
	for i := range h.Slots {
		if h.Slots[i].ID != id {
			continue
		}
		s := h.Slots[i]
		// An inactive LUKS1 slot's offset was never checked: it must not
		// lead the new key material over the header, the payload or
		// another slot.
		end := s.Offset + s.materialLen()
		if s.Offset < v1HeaderSize || h.PayloadOffset > 0 && end > h.PayloadOffset {
			return nil, driver.Corruptf("", v1SlotsOff+int64(id)*v1SlotSize+40, "key slot %d area [%d, %d) lies in the header or the payload", id, s.Offset, end)
		}
		for _, o := range h.Slots {
			if o.Active && s.Offset < o.Offset+o.Size && o.Offset < end {
				return nil, driver.Corruptf("", v1SlotsOff+int64(id)*v1SlotSize+40, "key slot %d area overlaps slot %d", id, o.ID)
			}
		}
		return &s, nil
	}
	return nil, driver.OptionErrorf("key slot %d does not exist", id)
}

// SlotsOpenedBy lists the active slots pass opens.
func (h *Header) SlotsOpenedBy(r io.ReaderAt, pass []byte) ([]int, error) {
	var ids []int
	for i := range h.Slots {
		s := &h.Slots[i]
		if !s.Active {
			continue
		}
		key, err := h.trySlot(r, s, pass)
		if err != nil {
			return nil, err
		}
		if key != nil {
			wipe(key)
			ids = append(ids, s.ID)
		}
	}
	return ids, nil
}
