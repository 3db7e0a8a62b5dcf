package vboxcrypt

import (
	"bytes"
	"crypto/aes"
	"errors"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"golang.org/x/crypto/xts"
)

// refEncrypt is the independent oracle: x/crypto/xts per 512-byte sector,
// tweak = sector number of the virtual disk.
func refEncrypt(t *testing.T, dek, plain []byte, first uint64, enc bool) []byte {
	t.Helper()
	c, err := xts.NewCipher(aes.NewCipher, dek)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, len(plain))
	for i := 0; i < len(plain); i += 512 {
		if enc {
			c.Encrypt(out[i:i+512], plain[i:i+512], first+uint64(i/512))
		} else {
			c.Decrypt(out[i:i+512], plain[i:i+512], first+uint64(i/512))
		}
	}
	return out
}

func TestCipherMatchesReference(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, cipher := range []string{XTS128, XTS256} {
		dek := make([]byte, KeyLenOf(cipher))
		for i := range dek {
			dek[i] = byte(r.Uint32())
		}
		c, err := NewCipher(cipher, dek)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range []int{512, 4096, parallelMin, parallelMin + 3*512, 1 << 20} {
			plain := make([]byte, n)
			for i := range plain {
				plain[i] = byte(r.Uint32())
			}
			first := uint64(r.IntN(1 << 30))
			got := make([]byte, n)
			c.Encrypt(got, plain, first)
			if want := refEncrypt(t, dek, plain, first, true); !bytes.Equal(got, want) {
				t.Fatalf("%s n=%d: encryption differs from x/crypto/xts per sector", cipher, n)
			}
			c.Decrypt(got, got, first)
			if !bytes.Equal(got, plain) {
				t.Fatalf("%s n=%d: in-place decryption does not give the plaintext back", cipher, n)
			}
		}
	}
	if _, err := NewCipher(XTS256, make([]byte, 32)); err == nil {
		t.Fatal("a 32-byte key for XTS256 was accepted")
	}
}

// memImage is a tiny driver.Image: 4 KiB units over a map, optionally with
// a parent (then partial writes into unheld units ask for a fill).
type memImage struct {
	mu     sync.Mutex
	size   int64
	units  map[int64][]byte
	parent bool
	zero   map[int64]bool
}

const unit = 4096

func (m *memImage) Size() int64 { return m.size }
func (m *memImage) Status(off, n int64) (driver.Extent, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	u := off / unit
	l := min(n, (u+1)*unit-off)
	switch {
	case m.units[u] != nil:
		return driver.Extent{State: driver.Data, Length: l, Offset: off + 1<<20}, nil
	case m.zero[u]:
		return driver.Extent{State: driver.Zero, Length: l, Offset: -1}, nil
	}
	return driver.Extent{State: driver.Unallocated, Length: l, Offset: -1}, nil
}
func (m *memImage) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i := 0; i < len(p); {
		u, o := (off+int64(i))/unit, (off+int64(i))%unit
		n := copy(p[i:], make([]byte, unit-o))
		if b := m.units[u]; b != nil {
			copy(p[i:i+n], b[o:])
		}
		i += n
	}
	return len(p), nil
}
func (m *memImage) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	end := off + int64(len(p))
	if m.parent {
		hs, he := off/unit*unit, (end+unit-1)/unit*unit
		if (off%unit != 0 && m.units[off/unit] == nil) || (end%unit != 0 && m.units[(end-1)/unit] == nil) {
			return 0, driver.NeedFill("mem", hs, he)
		}
	}
	for i := 0; i < len(p); {
		u, o := (off+int64(i))/unit, (off+int64(i))%unit
		if m.units[u] == nil {
			m.units[u] = make([]byte, unit)
		}
		n := copy(m.units[u][o:], p[i:])
		i += n
	}
	return len(p), nil
}
func (m *memImage) Flush() error { return nil }
func (m *memImage) Close() error { return nil }
func (m *memImage) Info() driver.Info {
	return driver.Info{Format: "mem", VirtualSize: m.size, ClusterSize: unit}
}
func (m *memImage) Parent() *driver.ParentRef {
	if m.parent {
		return &driver.ParentRef{Name: "base"}
	}
	return nil
}

func TestImageReadWrite(t *testing.T) {
	dek := make([]byte, 64)
	for i := range dek {
		dek[i] = byte(i)
	}
	c, _ := NewCipher(XTS256, dek)
	inner := &memImage{size: 1 << 20, units: map[int64][]byte{}, zero: map[int64]bool{}}
	inner.zero[10] = true
	img, err := Wrap(inner, "mem", c)
	if err != nil {
		t.Fatal(err)
	}
	model := make([]byte, inner.size)
	r := rand.New(rand.NewPCG(3, 4))
	for i := 0; i < 1000; i++ {
		off := r.Int64N(inner.size - 1)
		n := 1 + r.Int64N(min(9000, inner.size-off))
		if i%4 == 0 { // sector-aligned
			off &^= 511
			n = (n + 511) &^ 511
			n = min(n, inner.size-off)
		}
		p := make([]byte, n)
		for j := range p {
			p[j] = byte(r.Uint32())
		}
		keep := append([]byte(nil), p...)
		if _, err := img.WriteAt(p, off); err != nil {
			t.Fatalf("write %d+%d: %v", off, n, err)
		}
		if !bytes.Equal(p, keep) {
			t.Fatal("WriteAt changed the caller's buffer")
		}
		copy(model[off:], p)
		// Read back a random range through the filter.
		ro := r.Int64N(inner.size - 1)
		rn := 1 + r.Int64N(min(9000, inner.size-ro))
		st, _ := img.Status(ro, rn)
		if st.State != driver.Data {
			continue
		}
		if st.Offset != -1 {
			t.Fatal("a Data run of an encrypted image reports a file offset")
		}
		got := make([]byte, st.Length)
		if _, err := img.ReadAt(got, ro); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, model[ro:ro+st.Length]) {
			t.Fatalf("read %d+%d differs from what was written", ro, st.Length)
		}
	}
	// Every held unit, decrypted independently, is the model.
	for u, b := range inner.units {
		want := model[u*unit : (u+1)*unit]
		if got := refEncrypt(t, dek, b, uint64(u*unit/512), false); !bytes.Equal(got, want) {
			t.Fatalf("unit %d: stored bytes are not the model under x/crypto/xts with sector tweaks", u)
		}
	}
}

func TestImageFill(t *testing.T) {
	c, _ := NewCipher(XTS128, make([]byte, 32))
	inner := &memImage{size: 64 << 10, units: map[int64][]byte{}, parent: true}
	img, _ := Wrap(inner, "mem", c)
	for _, tc := range []struct {
		off, n   int64
		fill     bool
		fo, flen int64
	}{
		{100, 10, true, 0, unit},           // a partial sector in an unheld unit over the parent: the unit is filled
		{512, 512, true, 0, unit},          // a whole sector, part of an unheld unit: the inner image asks
		{0, unit, false, 0, 0},             // a whole unit
		{unit + 10, 600, true, unit, unit}, // two partial sectors
	} {
		_, err := img.WriteAt(make([]byte, tc.n), tc.off)
		fe, ok := driver.AsFill(err)
		if ok != tc.fill {
			t.Fatalf("write %d+%d: %v, fill wanted: %v", tc.off, tc.n, err, tc.fill)
		}
		if ok && (fe.Off != tc.fo || fe.Len != tc.flen) {
			t.Fatalf("write %d+%d: fill [%d,+%d), want [%d,+%d)", tc.off, tc.n, fe.Off, fe.Len, tc.fo, tc.flen)
		}
	}
	// Inside a held unit, a partial sector is composed from the old one.
	if _, err := img.WriteAt([]byte("hello"), 700); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 512)
	if _, err := img.ReadAt(got, 512); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 512)
	copy(want[700-512:], "hello")
	if !bytes.Equal(got, want) {
		t.Fatal("partial write in a held unit lost the rest of the sector")
	}
	if _, err := Wrap(&memImage{size: 1000}, "odd", c); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("odd size: %v", err)
	}
}
