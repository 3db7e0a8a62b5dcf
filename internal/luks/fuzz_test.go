package luks

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// fuzzFileSize is the size the fuzzed header's file claims: bytes past the
// input read as zeros, so key slot areas exist without being in the input.
const fuzzFileSize = 20 << 20

// ourHeaders are headers vdisk makes: LUKS1 (592 bytes) and LUKS2 (both
// copies, 32 KiB), deterministic.
func ourHeaders(t testing.TB) map[string][]byte {
	out := map[string][]byte{}
	for _, c := range []struct {
		name string
		o    CreateOptions
	}{
		{"luks1-xts", CreateOptions{Version: 1, Cipher: xtsSpec, KeyBytes: 64}},
		{"luks1-essiv", CreateOptions{Version: 1, Cipher: Spec{"aes", "cbc", "essiv", "sha256"}, KeyBytes: 16, Hash: "sha1"}},
		{"luks2-pbkdf2", CreateOptions{Version: 2, Cipher: xtsSpec, KeyBytes: 32, SectorSize: 4096}},
		{"luks2-argon2id", CreateOptions{Version: 2, Cipher: xtsSpec, KeyBytes: 64, KDF: "argon2id", ArgonMemoryKiB: 64, ArgonTime: 1}},
	} {
		f, h, _ := makeVolume(t, c.o, "fuzz")
		out[c.name] = append([]byte(nil), f.b[:h.HeaderEnd()]...)
	}
	return out
}

// TestFuzzSeeds keeps testdata/fuzz/FuzzLUKSHeader in step with
// ourHeaders (LUKS_WRITE_SEEDS=1 rewrites them) and checks that each seed
// parses.
func TestFuzzSeeds(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzLUKSHeader")
	if os.Getenv("LUKS_WRITE_SEEDS") != "" {
		os.MkdirAll(dir, 0o755)
		for name, b := range ourHeaders(t) {
			if err := os.WriteFile(filepath.Join(dir, name), []byte(fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	ents, err := os.ReadDir(dir)
	if err != nil || len(ents) < 4 {
		t.Fatalf("seed corpus missing in %s (%v); run with LUKS_WRITE_SEEDS=1", dir, err)
	}
	for name, b := range ourHeaders(t) {
		if _, err := Read(&memFile{b, fuzzFileSize}, fuzzFileSize, name); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
}

// FuzzLUKSHeader parses arbitrary header bytes: a parse error must be
// corruption or unsupported, never a panic; a header that parses is tried
// with a passphrase when its key derivation is cheap, and written back
// and parsed again.
func FuzzLUKSHeader(f *testing.F) {
	for _, b := range ourHeaders(f) {
		f.Add(b)
	}
	// Real headers: qemu's LUKS1 and cryptsetup's LUKS2. They are made in
	// a directory removed before fuzzing starts, not in f.TempDir, and not
	// in the fuzzer's workers (qemutest.FuzzWorker): the fuzzer kills its
	// workers when the time is up, before their cleanups run, also in the
	// middle of making the seeds.
	qemutest.Require(f)
	dir, err := os.MkdirTemp("", "vdisk-luks-seeds-")
	if err != nil {
		f.Fatal(err)
	}
	seeds := func() {
		q := filepath.Join(dir, "q.luks")
		QemuCreate(f, q, "64k", "fuzz", "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv")
		if b, err := os.ReadFile(q); err == nil {
			f.Add(b[:v1HeaderSize])
		}
		if _, err := os.Stat("/usr/sbin/cryptsetup"); err == nil || os.Getenv("CI") != "" {
			c, key := filepath.Join(dir, "c.img"), filepath.Join(dir, "key")
			os.WriteFile(c, make([]byte, 17<<20), 0o600)
			if err := os.WriteFile(key, []byte("fuzz"), 0o600); err != nil {
				f.Fatal(err)
			}
			if _, code := cryptsetup(f, "luksFormat", "--type", "luks2", "--batch-mode", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
				"--key-file", key, c); code == 0 {
				if b, err := os.ReadFile(c); err == nil {
					f.Add(b[:32<<10])
				}
			}
		}
	}
	if !qemutest.FuzzWorker() {
		seeds()
	}
	os.RemoveAll(dir)
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 8<<20 {
			return
		}
		r := &memFile{append([]byte(nil), data...), fuzzFileSize}
		fixChecksum(r.b)
		h, err := Read(r, fuzzFileSize, "fuzz")
		if err != nil {
			if !errors.Is(err, driver.ErrCorrupt) && !errors.Is(err, driver.ErrUnsupported) {
				t.Fatalf("unclear error: %v", err)
			}
			return
		}
		h.ActiveSlots()
		cheap := h.Digest.Iterations <= 5000
		for _, s := range h.Slots {
			if s.Active && (s.KDF.Iterations > 5000 || s.KDF.MemoryKiB > 1024 || s.KDF.Time > 4) {
				cheap = false
			}
		}
		if cheap {
			if key, _, err := h.Unlock(r, []byte("fuzz"), "fuzz"); err == nil {
				if _, err := h.NewCipher(key); err != nil {
					t.Fatalf("unlocked but no cipher: %v", err)
				}
			}
		}
		w := &memFile{size: fuzzFileSize}
		if err := h.Write(w); err != nil {
			return // e.g. LUKS2 metadata that no longer fits
		}
		if h.Version == 1 {
			if _, err := Read(w, fuzzFileSize, "rewritten"); err != nil {
				t.Fatalf("a parsed header written back does not parse: %v", err)
			}
		}
	})
}

// fixChecksum recomputes a LUKS2 primary header's checksum so that
// mutations of the JSON reach the parser.
func fixChecksum(b []byte) {
	if len(b) < v2BinSize || string(b[:6]) != Magic || b[7] != 2 {
		return
	}
	hs := binary.BigEndian.Uint64(b[v2OffHdrSize:])
	if hs < v2BinSize || hs > uint64(len(b)) {
		return
	}
	clear(b[v2OffCsum : v2OffCsum+64])
	d := sha256.New()
	d.Write(b[:hs])
	copy(b[v2OffCsum:], d.Sum(nil))
}
