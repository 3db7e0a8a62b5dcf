package luks

import (
	"bytes"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strconv"

	"github.com/vdisk/vdisk/driver"
)

// LUKS2 binary header layout (big-endian).
const (
	magic2          = "SKUL\xba\xbe"
	v2BinSize       = 4096
	v2OffHdrSize    = 8
	v2OffSeqID      = 16
	v2OffLabel      = 24
	v2OffCsumAlg    = 72
	v2OffSalt       = 104
	v2OffUUID       = 168
	v2OffSubsystem  = 208
	v2OffHdrOffset  = 256
	v2OffCsum       = 448
	v2MinHdrSize    = 16 << 10
	v2MaxHdrSize    = 4 << 20 // JSON area up to 4 MiB - 4 KiB, as cryptsetup allows
	v2MaxSlots      = 32
	v2MaxSegments   = 32
	v2MaxDigests    = 32
	v2DefaultHdr    = 16 << 10
	v2DefaultAreaSz = 16<<20 - 2*v2DefaultHdr // cryptsetup's keyslots_size: data at 16 MiB
)

// v2State is what a LUKS2 header keeps beyond the common fields, so that
// it is written back with everything it held (tokens, unknown keys).
type v2State struct {
	hdrSize   int64
	seqid     uint64
	label     string
	subsystem string
	csumAlg   string
	meta      map[string]json.RawMessage
	digestID  string
	digest    map[string]json.RawMessage
	areaSize  int64 // config.keyslots_size
}

type jArea struct {
	Type       string `json:"type"`
	Offset     string `json:"offset"`
	Size       string `json:"size"`
	Encryption string `json:"encryption"`
	KeySize    int    `json:"key_size"`
}

type jKDF struct {
	Type       string `json:"type"`
	Hash       string `json:"hash,omitempty"`
	Iterations int    `json:"iterations,omitempty"`
	Time       int    `json:"time,omitempty"`
	Memory     int    `json:"memory,omitempty"`
	CPUs       int    `json:"cpus,omitempty"`
	Salt       string `json:"salt"`
}

type jKeyslot struct {
	Type    string `json:"type"`
	KeySize int    `json:"key_size"`
	AF      struct {
		Type    string `json:"type"`
		Stripes int    `json:"stripes"`
		Hash    string `json:"hash"`
	} `json:"af"`
	Area jArea `json:"area"`
	KDF  jKDF  `json:"kdf"`
}

type jSegment struct {
	Type       string `json:"type"`
	Offset     string `json:"offset"`
	Size       string `json:"size"`
	IVTweak    string `json:"iv_tweak"`
	Encryption string `json:"encryption"`
	SectorSize int    `json:"sector_size"`
}

type jDigest struct {
	Type       string   `json:"type"`
	Keyslots   []string `json:"keyslots"`
	Segments   []string `json:"segments"`
	Hash       string   `json:"hash"`
	Iterations int      `json:"iterations"`
	Salt       string   `json:"salt"`
	Digest     string   `json:"digest"`
}

type jConfig struct {
	JSONSize     string `json:"json_size"`
	KeyslotsSize string `json:"keyslots_size"`
	Requirements *struct {
		Mandatory []string `json:"mandatory"`
	} `json:"requirements"`
}

// v2Copy is one verified header copy.
type v2Copy struct {
	bin  []byte
	json []byte
	seq  uint64
	size int64
}

// readCopy reads and verifies the header copy at off; nil when it is not
// a valid copy (wrong magic, bad size or checksum).
func readCopy(r io.ReaderAt, size, off int64, magic string) (*v2Copy, error) {
	if off < 0 || off > size-v2BinSize {
		return nil, fmt.Errorf("no room for a header at %d", off)
	}
	bin := make([]byte, v2BinSize)
	if err := driver.ReadFullAt(r, bin, off); err != nil {
		return nil, err
	}
	be := binary.BigEndian
	if string(bin[:6]) != magic || be.Uint16(bin[6:]) != 2 {
		return nil, fmt.Errorf("no LUKS2 header magic at %d", off)
	}
	hs := be.Uint64(bin[v2OffHdrSize:])
	if hs < v2MinHdrSize || hs > v2MaxHdrSize || hs&(hs-1) != 0 {
		return nil, fmt.Errorf("header size %d is not a power of two from 16 KiB to 4 MiB", hs)
	}
	if int64(hs) > size-off {
		return nil, fmt.Errorf("header of %d bytes at %d runs past the end of the file (%d bytes)", hs, off, size)
	}
	if be.Uint64(bin[v2OffHdrOffset:]) != uint64(off) {
		return nil, fmt.Errorf("header at %d says it is at %d", off, be.Uint64(bin[v2OffHdrOffset:]))
	}
	js := make([]byte, hs-v2BinSize)
	if err := driver.ReadFullAt(r, js, off+v2BinSize); err != nil {
		return nil, err
	}
	alg := cstr(bin[v2OffCsumAlg : v2OffCsumAlg+32])
	hf, err := HashFunc(alg)
	if err != nil {
		return nil, fmt.Errorf("checksum: %v", err)
	}
	want := append([]byte(nil), bin[v2OffCsum:v2OffCsum+64]...)
	clear(bin[v2OffCsum : v2OffCsum+64])
	d := hf()
	d.Write(bin)
	d.Write(js)
	sum := d.Sum(nil)
	copy(bin[v2OffCsum:], want)
	if subtle.ConstantTimeCompare(sum, want[:len(sum)]) != 1 {
		return nil, fmt.Errorf("header checksum mismatch at %d", off)
	}
	end := bytes.IndexByte(js, 0)
	if end < 0 {
		return nil, fmt.Errorf("JSON area at %d is not NUL-terminated", off+v2BinSize)
	}
	return &v2Copy{bin: bin, json: js[:end], seq: be.Uint64(bin[v2OffSeqID:]), size: int64(hs)}, nil
}

func readV2(r io.ReaderAt, size int64, name string) (*Header, error) {
	primary, perr := readCopy(r, size, 0, Magic)
	var secondary *v2Copy
	var serr error
	if primary != nil {
		secondary, serr = readCopy(r, size, primary.size, magic2)
	} else {
		// The second copy sits at one of the allowed header sizes.
		for off := int64(v2MinHdrSize); off <= v2MaxHdrSize && secondary == nil; off *= 2 {
			secondary, serr = readCopy(r, size, off, magic2)
		}
	}
	c := primary
	if c == nil || secondary != nil && secondary.seq > c.seq {
		c = secondary
	}
	if c == nil {
		return nil, driver.Corruptf(name, 0, "no valid LUKS2 header copy (primary: %v; secondary: %v)", perr, serr)
	}
	h, err := parseV2JSON(c, size, name)
	if err != nil {
		return nil, err
	}
	return h, nil
}

func num(s string) (int64, error) {
	n, err := strconv.ParseUint(s, 10, 63)
	return int64(n), err
}

func b64(s string) ([]byte, error) { return base64.StdEncoding.DecodeString(s) }

func parseV2JSON(c *v2Copy, size int64, name string) (*Header, error) {
	jsonOff := int64(v2BinSize)
	bad := func(format string, args ...any) error {
		return driver.Corruptf(name, jsonOff, "LUKS2 metadata: "+format, args...)
	}
	st := &v2State{hdrSize: c.size, seqid: c.seq,
		label:     cstr(c.bin[v2OffLabel : v2OffLabel+48]),
		subsystem: cstr(c.bin[v2OffSubsystem : v2OffSubsystem+48]),
		csumAlg:   cstr(c.bin[v2OffCsumAlg : v2OffCsumAlg+32])}
	if err := json.Unmarshal(c.json, &st.meta); err != nil {
		return nil, bad("%v", err)
	}
	h := &Header{Version: 2, UUID: cstr(c.bin[v2OffUUID : v2OffUUID+40]), v2: st}
	var cfg jConfig
	var keyslots, segments, digests map[string]json.RawMessage
	for k, dst := range map[string]any{"config": &cfg, "keyslots": &keyslots, "segments": &segments, "digests": &digests} {
		raw, ok := st.meta[k]
		if !ok {
			return nil, bad("no %s object", k)
		}
		if err := json.Unmarshal(raw, dst); err != nil {
			return nil, bad("%s: %v", k, err)
		}
	}
	if cfg.Requirements != nil && len(cfg.Requirements.Mandatory) > 0 {
		return nil, driver.Unsupportedf(name, "LUKS2 mandatory requirements %q (an unfinished reencryption?)", cfg.Requirements.Mandatory)
	}
	js, err := num(cfg.JSONSize)
	if err != nil || js != c.size-v2BinSize {
		return nil, bad("config json_size %q does not match the header size %d", cfg.JSONSize, c.size)
	}
	if st.areaSize, err = num(cfg.KeyslotsSize); err != nil || st.areaSize > size {
		return nil, bad("config keyslots_size %q is invalid or larger than the file", cfg.KeyslotsSize)
	}
	if len(keyslots) > v2MaxSlots || len(segments) > v2MaxSegments || len(digests) > v2MaxDigests {
		return nil, bad("%d keyslots, %d segments, %d digests (at most %d each)", len(keyslots), len(segments), len(digests), v2MaxSlots)
	}
	// One crypt segment: a volume in reencryption has more.
	if len(segments) != 1 {
		return nil, driver.Unsupportedf(name, "LUKS2 volume with %d segments (only one is supported)", len(segments))
	}
	var segID string
	var seg jSegment
	for id, raw := range segments {
		segID = id
		if err := json.Unmarshal(raw, &seg); err != nil {
			return nil, bad("segment %s: %v", id, err)
		}
	}
	if seg.Type != "crypt" {
		return nil, driver.Unsupportedf(name, "LUKS2 segment type %q", seg.Type)
	}
	if h.Cipher, err = ParseEncryption(seg.Encryption); err != nil {
		return nil, driver.Unsupportedf(name, "LUKS2 segment cipher: %v", err)
	}
	h.SectorSize = seg.SectorSize
	if h.SectorSize < 512 || h.SectorSize > 4096 || h.SectorSize&(h.SectorSize-1) != 0 {
		return nil, bad("segment sector size %d", seg.SectorSize)
	}
	if h.PayloadOffset, err = num(seg.Offset); err != nil || h.PayloadOffset%int64(h.SectorSize) != 0 {
		return nil, bad("segment offset %q", seg.Offset)
	}
	h.DataSize = -1
	if seg.Size != "dynamic" {
		if h.DataSize, err = num(seg.Size); err != nil || h.DataSize%int64(h.SectorSize) != 0 {
			return nil, bad("segment size %q", seg.Size)
		}
	}
	if seg.IVTweak != "" {
		t, err := strconv.ParseUint(seg.IVTweak, 10, 64)
		if err != nil {
			return nil, bad("segment iv_tweak %q", seg.IVTweak)
		}
		h.IVTweak = t
	}
	// The digest that covers the segment.
	ids := make([]string, 0, len(digests))
	for id := range digests {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	var dg jDigest
	for _, id := range ids {
		var d jDigest
		if err := json.Unmarshal(digests[id], &d); err != nil {
			return nil, bad("digest %s: %v", id, err)
		}
		for _, s := range d.Segments {
			if s == segID {
				dg, st.digestID = d, id
			}
		}
	}
	if st.digestID == "" {
		return nil, bad("no digest covers segment %s", segID)
	}
	if err := json.Unmarshal(digests[st.digestID], &st.digest); err != nil {
		return nil, bad("digest %s: %v", st.digestID, err)
	}
	if dg.Type != "pbkdf2" {
		return nil, driver.Unsupportedf(name, "LUKS2 digest type %q", dg.Type)
	}
	h.Digest = Digest{Hash: dg.Hash, Iterations: dg.Iterations}
	if h.Digest.Salt, err = b64(dg.Salt); err != nil {
		return nil, bad("digest salt: %v", err)
	}
	if h.Digest.Value, err = b64(dg.Digest); err != nil || len(h.Digest.Value) == 0 || len(h.Digest.Value) > 64 {
		return nil, bad("digest value %q", dg.Digest)
	}
	if _, err := HashFunc(dg.Hash); err != nil {
		return nil, driver.Unsupportedf(name, "LUKS2 digest: %v", err)
	}
	if dg.Iterations < 1 || int64(dg.Iterations) > MaxIterations || len(h.Digest.Salt) == 0 || len(h.Digest.Salt) > 1024 {
		return nil, bad("digest iterations %d or salt of %d bytes", dg.Iterations, len(h.Digest.Salt))
	}
	inDigest := map[string]bool{}
	for _, k := range dg.Keyslots {
		inDigest[k] = true
	}
	for id, raw := range keyslots {
		n, err := strconv.Atoi(id)
		if err != nil || n < 0 || n >= v2MaxSlots {
			return nil, bad("keyslot id %q", id)
		}
		var k jKeyslot
		if err := json.Unmarshal(raw, &k); err != nil {
			return nil, bad("keyslot %s: %v", id, err)
		}
		s := Slot{ID: n, raw: raw}
		if k.Type != "luks2" || !inDigest[id] {
			// Reencryption and unbound key slots do not open the volume;
			// kept as they are.
			h.Slots = append(h.Slots, s)
			continue
		}
		s.Active = true
		s.Stripes, s.AFHash = k.AF.Stripes, k.AF.Hash
		if k.AF.Type != "luks1" || s.Stripes != Stripes {
			return nil, bad("keyslot %s: anti-forensic %q with %d stripes", id, k.AF.Type, s.Stripes)
		}
		if _, err := HashFunc(s.AFHash); err != nil {
			return nil, driver.Unsupportedf(name, "LUKS2 keyslot %s: %v", id, err)
		}
		if k.Area.Type != "raw" {
			return nil, driver.Unsupportedf(name, "LUKS2 keyslot %s area type %q", id, k.Area.Type)
		}
		if s.Cipher, err = ParseEncryption(k.Area.Encryption); err != nil {
			return nil, driver.Unsupportedf(name, "LUKS2 keyslot %s cipher: %v", id, err)
		}
		s.KeyBytes = k.Area.KeySize
		if !s.Cipher.ValidKeyBytes(s.KeyBytes) {
			return nil, bad("keyslot %s area key of %d bytes for %s", id, s.KeyBytes, s.Cipher)
		}
		if s.Offset, err = num(k.Area.Offset); err != nil {
			return nil, bad("keyslot %s area offset %q", id, k.Area.Offset)
		}
		if s.Size, err = num(k.Area.Size); err != nil {
			return nil, bad("keyslot %s area size %q", id, k.Area.Size)
		}
		if h.KeyBytes == 0 {
			h.KeyBytes = k.KeySize
		}
		if k.KeySize != h.KeyBytes || !h.Cipher.ValidKeyBytes(h.KeyBytes) {
			return nil, bad("keyslot %s key_size %d does not fit %s", id, k.KeySize, h.Cipher)
		}
		if err := checkSlotArea(&s, size, 2*c.size, name, jsonOff); err != nil {
			return nil, err
		}
		s.KDF = KDF{Type: k.KDF.Type, Hash: k.KDF.Hash, Iterations: k.KDF.Iterations, Time: k.KDF.Time, MemoryKiB: k.KDF.Memory, Threads: k.KDF.CPUs}
		if s.KDF.Salt, err = b64(k.KDF.Salt); err != nil {
			return nil, bad("keyslot %s salt: %v", id, err)
		}
		// Bounded here, before any derivation: a hostile memory cost is
		// refused with a clear message.
		if err := s.KDF.Check(); err != nil {
			return nil, driver.Errorf(driver.ErrCorrupt, name, jsonOff, "LUKS2 keyslot %s: %v", id, err)
		}
		h.Slots = append(h.Slots, s)
	}
	sort.Slice(h.Slots, func(i, j int) bool { return h.Slots[i].ID < h.Slots[j].ID })
	if h.KeyBytes == 0 {
		return nil, bad("no key slot opens segment %s", segID)
	}
	return h, nil
}

// newSlotV2 lays out a new key slot id in a free part of the keyslots
// area, with the segment's cipher (as cryptsetup does).
func (h *Header) newSlotV2(id int) (*Slot, error) {
	st := h.v2
	s := &Slot{ID: id, Stripes: Stripes, AFHash: h.Digest.Hash, Cipher: h.Cipher, KeyBytes: h.KeyBytes}
	s.Size = (s.materialLen() + 4095) &^ 4095
	lo, hi := 2*st.hdrSize, 2*st.hdrSize+st.areaSize
	for off := lo; off+s.Size <= hi; off += 4096 {
		free := true
		for _, o := range h.Slots {
			if o.Size > 0 && off < o.Offset+o.Size && o.Offset < off+s.Size {
				free, off = false, max(off, (o.Offset+o.Size+4095)&^4095-4096)
				break
			}
		}
		if free {
			s.Offset = off
			return s, nil
		}
	}
	return nil, driver.OptionErrorf("no room for another key slot in the %d-byte LUKS2 keyslots area", st.areaSize)
}

func (h *Header) slotJSON(s *Slot) (json.RawMessage, error) {
	if s.raw != nil {
		return s.raw, nil
	}
	var k jKeyslot
	k.Type, k.KeySize = "luks2", h.KeyBytes
	k.AF.Type, k.AF.Stripes, k.AF.Hash = "luks1", s.Stripes, s.AFHash
	k.Area = jArea{Type: "raw", Offset: strconv.FormatInt(s.Offset, 10), Size: strconv.FormatInt(s.Size, 10),
		Encryption: s.Cipher.String(), KeySize: s.KeyBytes}
	k.KDF = jKDF{Type: s.KDF.Type, Salt: base64.StdEncoding.EncodeToString(s.KDF.Salt)}
	if s.KDF.Type == "pbkdf2" {
		k.KDF.Hash, k.KDF.Iterations = s.KDF.Hash, s.KDF.Iterations
	} else {
		k.KDF.Time, k.KDF.Memory, k.KDF.CPUs = s.KDF.Time, s.KDF.MemoryKiB, s.KDF.Threads
	}
	return json.Marshal(k)
}

func (h *Header) writeV2(w io.WriterAt) error {
	st := h.v2
	keyslots := map[string]json.RawMessage{}
	var bound []string
	for i := range h.Slots {
		s := &h.Slots[i]
		raw, err := h.slotJSON(s)
		if err != nil {
			return err
		}
		id := strconv.Itoa(s.ID)
		keyslots[id] = raw
		if s.Active {
			bound = append(bound, id)
		}
	}
	sort.Slice(bound, func(i, j int) bool { a, _ := strconv.Atoi(bound[i]); b, _ := strconv.Atoi(bound[j]); return a < b })
	if bound == nil {
		bound = []string{}
	}
	var err error
	if st.meta["keyslots"], err = json.Marshal(keyslots); err != nil {
		return err
	}
	if st.digest["keyslots"], err = json.Marshal(bound); err != nil {
		return err
	}
	var digests map[string]json.RawMessage
	if err := json.Unmarshal(st.meta["digests"], &digests); err != nil {
		return err
	}
	if digests[st.digestID], err = json.Marshal(st.digest); err != nil {
		return err
	}
	if st.meta["digests"], err = json.Marshal(digests); err != nil {
		return err
	}
	js, err := json.Marshal(st.meta)
	if err != nil {
		return err
	}
	if int64(len(js)) >= st.hdrSize-v2BinSize {
		return fmt.Errorf("LUKS2 metadata of %d bytes does not fit the %d-byte JSON area", len(js), st.hdrSize-v2BinSize)
	}
	st.seqid++
	for _, cp := range []struct {
		magic string
		off   int64
	}{{Magic, 0}, {magic2, st.hdrSize}} {
		b := make([]byte, st.hdrSize)
		be := binary.BigEndian
		copy(b, cp.magic)
		be.PutUint16(b[6:], 2)
		be.PutUint64(b[v2OffHdrSize:], uint64(st.hdrSize))
		be.PutUint64(b[v2OffSeqID:], st.seqid)
		copy(b[v2OffLabel:v2OffLabel+48], st.label)
		copy(b[v2OffCsumAlg:v2OffCsumAlg+32], st.csumAlg)
		if _, err := io.ReadFull(rand.Reader, b[v2OffSalt:v2OffSalt+64]); err != nil {
			return err
		}
		copy(b[v2OffUUID:v2OffUUID+40], h.UUID)
		copy(b[v2OffSubsystem:v2OffSubsystem+48], st.subsystem)
		be.PutUint64(b[v2OffHdrOffset:], uint64(cp.off))
		copy(b[v2BinSize:], js)
		hf, err := HashFunc(st.csumAlg)
		if err != nil {
			return err
		}
		d := hf()
		d.Write(b)
		copy(b[v2OffCsum:v2OffCsum+64], d.Sum(nil))
		if _, err := w.WriteAt(b, cp.off); err != nil {
			return err
		}
	}
	return nil
}
