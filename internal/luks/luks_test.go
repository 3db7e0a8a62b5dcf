package luks

import (
	"bytes"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"strconv"
	"strings"
	"testing"

	"github.com/vdisk/vdisk/driver"
)

// memFile is a growable in-memory file; reads past the end return zeros up
// to size (a sparse file of that size).
type memFile struct {
	b    []byte
	size int64
}

func (m *memFile) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > m.size {
		return 0, errors.New("read past the end")
	}
	clear(p)
	if off < int64(len(m.b)) {
		copy(p, m.b[off:])
	}
	return len(p), nil
}

func (m *memFile) WriteAt(p []byte, off int64) (int, error) {
	if end := off + int64(len(p)); end > int64(len(m.b)) {
		m.b = append(m.b, make([]byte, end-int64(len(m.b)))...)
		m.size = max(m.size, end)
	}
	copy(m.b[off:], p)
	return len(p), nil
}

type seededRand struct{ r *rand.ChaCha8 }

func (s seededRand) Read(p []byte) (int, error) { return s.r.Read(p) }

func newRand(seed byte) seededRand { return seededRand{rand.NewChaCha8([32]byte{seed})} }

// TestPBKDF2Vectors checks RFC 6070's PBKDF2-HMAC-SHA1 vectors and one
// SHA-256 vector.
func TestPBKDF2Vectors(t *testing.T) {
	for _, c := range []struct {
		pass, salt string
		iter, n    int
		want       string
	}{
		{"password", "salt", 1, 20, "0c60c80f961f0e71f3a9b524af6012062fe037a6"},
		{"password", "salt", 2, 20, "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957"},
		{"password", "salt", 4096, 20, "4b007901b765489abead49d926f721d065a429c1"},
		{"passwordPASSWORDpassword", "saltSALTsaltSALTsaltSALTsaltSALTsalt", 4096, 25, "3d2eec4fe41c849b80c8d83662c0e44a8b291a964cf2f07038"},
	} {
		if got := hex.EncodeToString(PBKDF2(sha1.New, []byte(c.pass), []byte(c.salt), c.iter, c.n)); got != c.want {
			t.Errorf("PBKDF2(%q, %q, %d) = %s, want %s", c.pass, c.salt, c.iter, got, c.want)
		}
	}
	if got := hex.EncodeToString(PBKDF2(sha256.New, []byte("password"), []byte("salt"), 2, 32)); got != "ae4d0c95af6b46d32d0adff928f06dd02a303f8ef3c251dfd6e2d85a95474c43" {
		t.Errorf("PBKDF2-SHA256 = %s", got)
	}
}

// TestAFRoundTrip: merge undoes split for odd key and digest sizes.
func TestAFRoundTrip(t *testing.T) {
	for _, n := range []int{16, 32, 33, 64} {
		key := bytes.Repeat([]byte{byte(n)}, n)
		m, err := AFSplit(key, Stripes, sha1.New, newRand(1))
		if err != nil {
			t.Fatal(err)
		}
		got, err := AFMerge(m, n, Stripes, sha1.New)
		if err != nil || !bytes.Equal(got, key) {
			t.Fatalf("%d bytes: merge gives %x (%v)", n, got, err)
		}
		m[len(m)/2] ^= 1
		if got, _ := AFMerge(m, n, Stripes, sha1.New); bytes.Equal(got, key) {
			t.Fatal("a damaged stripe still merges to the key")
		}
	}
}

func makeVolume(t testing.TB, o CreateOptions, pass string) (*memFile, *Header, []byte) {
	t.Helper()
	f := &memFile{size: 20 << 20}
	o.Rand = newRand(7)
	if o.Iterations == 0 {
		o.Iterations = 1000
	}
	h, key, err := Create(f, o, []byte(pass))
	if err != nil {
		t.Fatal(err)
	}
	return f, h, key
}

var xtsSpec = Spec{"aes", "xts", "plain64", ""}

// TestDamagedSlot: a key slot whose material is damaged no longer opens
// (a clear wrong-passphrase error) while another slot still does; invalid
// slot fields are corruption.
func TestDamagedSlot(t *testing.T) {
	for _, v := range []int{1, 2} {
		f, h, key := makeVolume(t, CreateOptions{Version: v, Cipher: xtsSpec, KeyBytes: 64}, "zero")
		if err := h.SetSlot(f, 1, key, []byte("one"), KDF{Type: "pbkdf2", Hash: "sha256", Iterations: 1000}, newRand(2)); err != nil {
			t.Fatal(err)
		}
		s0 := h.Slot(0)
		f.b[s0.Offset+1000] ^= 0x40
		h2, err := Read(f, f.size, "v")
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := h2.Unlock(f, []byte("zero"), "v"); !errors.Is(err, ErrPassphrase) || !errors.Is(err, driver.ErrInvalidOption) {
			t.Fatalf("v%d: damaged slot: %v", v, err)
		}
		got, slot, err := h2.Unlock(f, []byte("one"), "v")
		if err != nil || slot != 1 || !bytes.Equal(got, key) {
			t.Fatalf("v%d: slot 1: %v %d", v, err, slot)
		}
	}
	// LUKS1 field damage.
	f, _, _ := makeVolume(t, CreateOptions{Version: 1, Cipher: xtsSpec, KeyBytes: 64}, "zero")
	for _, c := range []struct {
		name string
		off  int
		v    uint32
	}{
		{"state", v1SlotsOff, 0x12345678},
		{"stripes", v1SlotsOff + 44, 1 << 30},
		{"material past EOF", v1SlotsOff + 40, 1 << 31},
		{"key bytes", offKeyBytes, 1 << 30},
		{"overlap", v1SlotsOff + v1SlotSize + 40, 8},
	} {
		b := append([]byte(nil), f.b...)
		binary.BigEndian.PutUint32(b[c.off:], c.v)
		if c.name == "overlap" {
			binary.BigEndian.PutUint32(b[v1SlotsOff+v1SlotSize:], slotActive)
			binary.BigEndian.PutUint32(b[v1SlotsOff+v1SlotSize+4:], 1000)
		}
		if _, err := Read(&memFile{b, f.size}, f.size, "v"); !errors.Is(err, driver.ErrCorrupt) {
			t.Errorf("%s: %v", c.name, err)
		}
	}
}

// fixV2 rewrites the JSON of the primary LUKS2 header copy with edit
// applied (and the header size set to hdrSize when not 0), fixing the
// checksum; the secondary copy is destroyed so the primary is read.
func fixV2(t testing.TB, b []byte, hdrSize uint64, edit func(string) string) []byte {
	t.Helper()
	be := binary.BigEndian
	hs := be.Uint64(b[v2OffHdrSize:])
	js := cstr(b[v2BinSize:hs])
	out := append([]byte(nil), b...)
	clear(out[hs : hs+8]) // secondary magic
	if hdrSize == 0 {
		hdrSize = hs
	}
	if n := min(hdrSize, 8<<20); uint64(len(out)) < n {
		out = append(out, make([]byte, n-uint64(len(out)))...)
	}
	be.PutUint64(out[v2OffHdrSize:], hdrSize)
	njs := edit(js)
	clear(out[v2BinSize:min(hdrSize, uint64(len(out)))])
	copy(out[v2BinSize:], njs)
	clear(out[v2OffCsum : v2OffCsum+64])
	d := sha256.New()
	d.Write(out[:min(hdrSize, uint64(len(out)))])
	copy(out[v2OffCsum:], d.Sum(nil))
	return out
}

// TestHostileV2: LUKS2 headers claiming a huge header, JSON area, key
// slot area or Argon2 memory are refused with a clear error, within a
// small heap.
func TestHostileV2(t *testing.T) {
	f, _, _ := makeVolume(t, CreateOptions{Version: 2, Cipher: xtsSpec, KeyBytes: 64}, "p")
	good := f.b[:2*v2DefaultHdr]
	if _, err := Read(&memFile{good, f.size}, f.size, "v"); err != nil {
		t.Fatal(err)
	}
	same := func(s string) string { return s }
	for _, c := range []struct {
		name    string
		hdrSize uint64
		edit    func(string) string
		want    string
	}{
		{"hdr_size 1 TiB", 1 << 40, same, "no valid LUKS2 header"},
		{"hdr_size 4 MiB, json_size 12 KiB", 4 << 20, same, "json_size"},
		{"hdr_size not a power of two", 20000, same, "no valid LUKS2 header"},
		{"keyslot area 1 EiB", 0, func(s string) string { return strings.Replace(s, `"size":"258048"`, `"size":"1152921504606846976"`, 1) }, "outside the file"},
		{"keyslot offset 1 EiB", 0, func(s string) string {
			return strings.Replace(s, `"offset":"32768"`, `"offset":"1152921504606846976"`, 1)
		}, "outside the file"},
		{"keyslots_size huge", 0, func(s string) string {
			return strings.Replace(s, `"keyslots_size":"16744448"`, `"keyslots_size":"9223372036854775807"`, 1)
		}, "keyslots_size"},
		{"argon2 memory 1 TiB", 0, func(s string) string {
			i := strings.Index(s, `"kdf":{`)
			j := strings.Index(s[i:], "}")
			return s[:i] + `"kdf":{"type":"argon2id","time":4,"memory":1073741824,"cpus":4,"salt":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="` + s[i+j:]
		}, "memory cost"},
		{"argon2 threads", 0, func(s string) string {
			i := strings.Index(s, `"kdf":{`)
			j := strings.Index(s[i:], "}")
			return s[:i] + `"kdf":{"type":"argon2i","time":4,"memory":1024,"cpus":100000,"salt":"AAAA"` + s[i+j:]
		}, "parallelism"},
		{"many keyslots", 0, func(s string) string {
			var b strings.Builder
			for i := 0; i < 40; i++ {
				b.WriteString(`"` + strconv.Itoa(100+i) + `":{},`)
			}
			return strings.Replace(s, `"keyslots":{`, `"keyslots":{`+b.String(), 1)
		}, "keyslots"},
		{"two segments", 0, func(s string) string {
			return strings.Replace(s, `"segments":{`, `"segments":{"1":{"type":"crypt"},`, 1)
		}, "segments"},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := fixV2(t, good, c.hdrSize, c.edit)
			var err error
			var h *Header
			grow := heapGrowth(func() { h, err = Read(&memFile{b, f.size}, f.size, "v") })
			if err == nil && c.want != "" {
				t.Fatalf("opened; want an error with %q", c.want)
			}
			if err == nil {
				// The area size is checked against the file only where it
				// matters: the material read is bounded by key bytes.
				_, _, err = h.Unlock(&memFile{b, f.size}, []byte("p"), "v")
				t.Logf("%s: unlock: %v", c.name, err)
			} else if !strings.Contains(err.Error(), c.want) || !(errors.Is(err, driver.ErrCorrupt) || errors.Is(err, driver.ErrUnsupported)) {
				t.Fatalf("error %v; want one with %q", err, c.want)
			}
			if grow > 64<<20 {
				t.Fatalf("heap grew by %d bytes", grow)
			}
			t.Logf("%v (heap +%d KiB)", err, grow>>10)
		})
	}
}
