package vhd_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/memfs"
)

var bigE = binary.BigEndian

// sum recomputes the checksum of the structure at b (n bytes, checksum at
// sumOff).
func sum(b []byte, n, sumOff int) {
	var s uint32
	for i := 0; i < n; i++ {
		if i >= sumOff && i < sumOff+4 {
			continue
		}
		s += uint32(b[i])
	}
	bigE.PutUint32(b[sumOff:], ^s)
}

// img is a raw image file being tampered with.
type img struct{ b []byte }

func (m *img) footerAt(off int) []byte { return m.b[off : off+512] }
func (m *img) hdr() []byte {
	off := int(bigE.Uint64(m.b[16:]))
	return m.b[off : off+1024]
}
func (m *img) fixFooters() {
	sum(m.b[:512], 512, 64)
	copy(m.b[len(m.b)-512:], m.b[:512])
}
func (m *img) fixHeader()  { sum(m.hdr(), 1024, 36) }
func (m *img) batOff() int { return int(bigE.Uint64(m.hdr()[16:])) }

// makeImage builds an image on memfs and returns its bytes.
func makeImage(t testing.TB, size int64, backing bool, opts ...string) []byte {
	t.Helper()
	st := memfs.New()
	if backing {
		b := create(t, st, "/base.vhd", size, "", "force_size=on")
		b.WriteAt(bytes.Repeat([]byte{7}, 5000), 0)
		b.Close()
	}
	name := "/x.vhd"
	bk := ""
	if backing {
		bk = "base.vhd"
	}
	d := create(t, st, name, size, bk, opts...)
	d.WriteAt(bytes.Repeat([]byte{0xab}, 3000), 100)
	d.WriteAt(bytes.Repeat([]byte{0xcd}, 3000), size-3000)
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := st.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func openBytes(t testing.TB, b []byte, ro bool) (*vdisk.Disk, error) {
	st := memfs.New()
	if err := st.WriteFile("/x.vhd", b); err != nil {
		t.Fatal(err)
	}
	return vdisk.Open(ctx, "/x.vhd", &vdisk.OpenOptions{Format: "vpc", Storage: st, ReadOnly: ro, NoBacking: true})
}

// TestHostileHeaders: every bad field is an error (ErrCorrupt, or
// ErrUnsupported for valid but unhandled values), never a panic or a huge
// allocation.
func TestHostileHeaders(t *testing.T) {
	dyn := makeImage(t, 1<<20, false, "block_size=64K", "force_size=on")
	diff := makeImage(t, 1<<20, true, "block_size=64K")
	fixed := makeImage(t, 1<<20, false, "subformat=fixed", "force_size=on")
	cases := []struct {
		name   string
		base   []byte
		tamper func(m *img)
		want   error
	}{
		{"short file", dyn, func(m *img) { m.b = m.b[:300] }, driver.ErrCorrupt},
		{"no cookie", dyn, func(m *img) { copy(m.b, "xxxxxxxx"); copy(m.b[len(m.b)-512:], "xxxxxxxx") }, driver.ErrCorrupt},
		{"disk type 7", dyn, func(m *img) { bigE.PutUint32(m.b[60:], 7); m.fixFooters() }, driver.ErrUnsupported},
		{"disk type 0", dyn, func(m *img) { bigE.PutUint32(m.b[60:], 0); m.fixFooters() }, driver.ErrUnsupported},
		{"size over 2040 GiB", dyn, func(m *img) { bigE.PutUint64(m.b[48:], 3<<40); m.fixFooters() }, driver.ErrUnsupported},
		{"header offset past EOF", dyn, func(m *img) { bigE.PutUint64(m.b[16:], 1<<40); m.fixFooters() }, driver.ErrCorrupt},
		{"header offset -1", dyn, func(m *img) { bigE.PutUint64(m.b[16:], ^uint64(0)); m.fixFooters() }, driver.ErrCorrupt},
		{"header offset 0", dyn, func(m *img) { bigE.PutUint64(m.b[16:], 0); m.fixFooters() }, driver.ErrCorrupt},
		{"no cxsparse", dyn, func(m *img) { copy(m.hdr(), "nothing!"); m.fixHeader() }, driver.ErrCorrupt},
		{"block size 0", dyn, func(m *img) { bigE.PutUint32(m.hdr()[32:], 0); m.fixHeader() }, driver.ErrCorrupt},
		{"block size 3000", dyn, func(m *img) { bigE.PutUint32(m.hdr()[32:], 3000); m.fixHeader() }, driver.ErrCorrupt},
		{"block size 256", dyn, func(m *img) { bigE.PutUint32(m.hdr()[32:], 256); m.fixHeader() }, driver.ErrCorrupt},
		{"block size 2^31", dyn, func(m *img) { bigE.PutUint32(m.hdr()[32:], 1<<31); m.fixHeader() }, driver.ErrUnsupported},
		{"entries 0xFFFFFFFF", dyn, func(m *img) { bigE.PutUint32(m.hdr()[28:], 0xFFFFFFFF); m.fixHeader() }, driver.ErrCorrupt},
		{"entries x block size overflow", dyn, func(m *img) {
			bigE.PutUint32(m.hdr()[28:], 0x80000000)
			bigE.PutUint32(m.hdr()[32:], 1<<28)
			m.fixHeader()
		}, driver.ErrCorrupt},
		{"entries past EOF", dyn, func(m *img) { bigE.PutUint32(m.hdr()[28:], 1<<20); m.fixHeader() }, driver.ErrCorrupt},
		{"entries too few", dyn, func(m *img) { bigE.PutUint32(m.hdr()[28:], 2); m.fixHeader() }, driver.ErrCorrupt},
		{"BAT offset past EOF", dyn, func(m *img) { bigE.PutUint64(m.hdr()[16:], 1<<50); m.fixHeader() }, driver.ErrCorrupt},
		{"BAT offset -1", dyn, func(m *img) { bigE.PutUint64(m.hdr()[16:], ^uint64(0)); m.fixHeader() }, driver.ErrCorrupt},
		{"BAT over header", dyn, func(m *img) { bigE.PutUint64(m.hdr()[16:], 600); m.fixHeader() }, driver.ErrCorrupt},
		{"parent name unpaired surrogate", diff, func(m *img) {
			h := m.hdr()
			bigE.PutUint16(h[64:], 0xD800)
			bigE.PutUint16(h[66:], 'a')
			m.fixHeader()
		}, driver.ErrCorrupt},
		{"parent name lone low surrogate", diff, func(m *img) { bigE.PutUint16(m.hdr()[66:], 0xDC00); m.fixHeader() }, driver.ErrCorrupt},
		{"parent name control char", diff, func(m *img) { bigE.PutUint16(m.hdr()[64:], 0x1); m.fixHeader() }, driver.ErrCorrupt},
		{"locator offset past EOF", diff, func(m *img) { bigE.PutUint64(m.hdr()[576+16:], 1<<40); m.fixHeader() }, driver.ErrCorrupt},
		{"locator offset -1", diff, func(m *img) { bigE.PutUint64(m.hdr()[576+16:], ^uint64(0)); m.fixHeader() }, driver.ErrCorrupt},
		{"locator length past EOF", diff, func(m *img) {
			h := m.hdr()
			bigE.PutUint32(h[576+4:], 1<<30)
			bigE.PutUint32(h[576+8:], 1<<20)
			m.fixHeader()
		}, driver.ErrCorrupt},
		{"locator length over space", diff, func(m *img) { bigE.PutUint32(m.hdr()[576+4:], 0); m.fixHeader() }, driver.ErrCorrupt},
		{"locator length huge", diff, func(m *img) {
			h := m.hdr()
			bigE.PutUint32(h[576+4:], 0xFFFFFFFF)
			bigE.PutUint32(h[576+8:], 0xFFFFFFFF)
			m.fixHeader()
		}, driver.ErrCorrupt},
		{"locator odd UTF-16", diff, func(m *img) { bigE.PutUint32(m.hdr()[576+24+8:], 7); m.fixHeader() }, driver.ErrCorrupt},
		{"locator bad UTF-16", diff, func(m *img) {
			off := bigE.Uint64(m.hdr()[576+24+16:])
			binary.LittleEndian.PutUint16(m.b[off:], 0xDBFF)
		}, driver.ErrCorrupt},
		{"locator over BAT", diff, func(m *img) { bigE.PutUint64(m.hdr()[576+16:], uint64(m.batOff())); m.fixHeader() }, driver.ErrCorrupt},
		{"no parent at all", diff, func(m *img) {
			h := m.hdr()
			clear(h[40:56])
			clear(h[64 : 576+48])
			m.fixHeader()
		}, driver.ErrCorrupt},
		{"fixed truncated", fixed, func(m *img) {
			f := append([]byte(nil), m.b[len(m.b)-512:]...)
			m.b = append(m.b[:len(m.b)-4096], f...)
		}, driver.ErrCorrupt},
		{"fixed size over data", fixed, func(m *img) {
			bigE.PutUint64(m.b[len(m.b)-512+48:], 2<<20)
			sum(m.b[len(m.b)-512:], 512, 64)
		}, driver.ErrCorrupt},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			m := &img{b: append([]byte(nil), c.base...)}
			c.tamper(m)
			d, err := openBytes(t, m.b, true)
			if err == nil {
				d.Close()
				t.Fatalf("opened; want %v", c.want)
			}
			if !errors.Is(err, c.want) {
				t.Fatalf("err = %v; want %v", err, c.want)
			}
		})
	}
}

// TestBadTableEntries: BAT entries past the end of the file, into the
// metadata or into another block open (so that check can repair them),
// fail when their block is read, and are repaired by check -r all.
func TestBadTableEntries(t *testing.T) {
	base := makeImage(t, 1<<20, false, "block_size=64K", "force_size=on")
	for _, c := range []struct {
		name   string
		tamper func(m *img, bat []byte)
		block  int64
	}{
		{"past EOF", func(m *img, bat []byte) { bigE.PutUint32(bat[4*3:], 1<<24) }, 3},
		{"into header", func(m *img, bat []byte) { bigE.PutUint32(bat[4*3:], 1) }, 3},
		{"into BAT", func(m *img, bat []byte) { bigE.PutUint32(bat[4*3:], uint32(m.batOff()/512)) }, 3},
		{"same block twice", func(m *img, bat []byte) { copy(bat[4*3:4*3+4], bat[0:4]) }, 3},
		{"overlapping", func(m *img, bat []byte) { bigE.PutUint32(bat[4*3:], bigE.Uint32(bat)+1) }, 3},
	} {
		t.Run(c.name, func(t *testing.T) {
			m := &img{b: append([]byte(nil), base...)}
			c.tamper(m, m.b[m.batOff():])
			d, err := openBytes(t, m.b, false)
			if err != nil {
				t.Fatalf("open: %v", err)
			}
			defer d.Close()
			buf := make([]byte, 512)
			if _, err := d.ReadAt(buf, c.block*64<<10); !errors.Is(err, driver.ErrCorrupt) {
				t.Fatalf("reading the bad block: %v", err)
			}
			if _, err := d.ReadAt(buf, 100); err != nil || buf[0] != 0xab {
				t.Fatalf("good block: %v %x", err, buf[0])
			}
			res, err := d.Check(ctx, driver.RepairNone)
			if err != nil || res.Corruptions != 1 {
				t.Fatalf("check: %+v %v", res, err)
			}
			res, err = d.Check(ctx, driver.RepairAll)
			if err != nil || res.Corruptions != 0 || res.CorruptionsFixed != 1 {
				t.Fatalf("repair: %+v %v %v", res, err, res.Messages)
			}
			if _, err := d.ReadAt(buf, c.block*64<<10); err != nil {
				t.Fatalf("after repair: %v", err)
			}
			// Writing the repaired block must not clobber the others.
			w := bytes.Repeat([]byte{0x5a}, 64<<10)
			if _, err := d.WriteAt(w, c.block*64<<10); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 3000)
			d.ReadAt(got, 100)
			if !bytes.Equal(got, bytes.Repeat([]byte{0xab}, 3000)) {
				t.Fatal("block 0 damaged")
			}
			checkClean(t, d)
		})
	}
}

// TestChecksumsAndFooters: checksum errors and a mismatched or missing
// footer open with a warning, are reported by check and rewritten by
// repair.
func TestChecksumsAndFooters(t *testing.T) {
	dyn := makeImage(t, 1<<20, false, "block_size=64K", "force_size=on")
	fixed := makeImage(t, 1<<20, false, "subformat=fixed", "force_size=on")
	for _, c := range []struct {
		name   string
		base   []byte
		tamper func(m *img)
		leaks  int
	}{
		{"footer copy checksum", dyn, func(m *img) { m.b[64] ^= 1 }, 0},
		{"end footer checksum", dyn, func(m *img) { m.b[len(m.b)-512+64] ^= 1 }, 0},
		{"end footer missing", dyn, func(m *img) { copy(m.b[len(m.b)-512:], make([]byte, 512)) }, 0},
		{"end footer cut off", dyn, func(m *img) { m.b = m.b[:len(m.b)-512] }, 0},
		{"footer copy missing", dyn, func(m *img) { copy(m.b, make([]byte, 512)) }, 0},
		{"footers differ", dyn, func(m *img) {
			f := m.footerAt(len(m.b) - 512)
			f[24]++ // time stamp
			sum(f, 512, 64)
		}, 0},
		{"header checksum", dyn, func(m *img) { m.hdr()[36] ^= 0x10 }, 0},
		{"fixed footer checksum", fixed, func(m *img) { m.b[len(m.b)-512+64] ^= 1 }, 0},
		{"trailing garbage", dyn, func(m *img) {
			f := append([]byte(nil), m.b[len(m.b)-512:]...)
			m.b = append(append(m.b[:len(m.b)-512], bytes.Repeat([]byte{9}, 70000)...), f...)
		}, 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			m := &img{b: append([]byte(nil), c.base...)}
			c.tamper(m)
			d, err := openBytes(t, m.b, false)
			if err != nil {
				t.Fatalf("open: %v", err)
			}
			defer d.Close()
			want := make([]byte, 3000)
			if _, err := d.ReadAt(want, 100); err != nil || want[0] != 0xab {
				t.Fatalf("read: %v", err)
			}
			res, err := d.Check(ctx, driver.RepairNone)
			if err != nil || res.Corruptions+res.Leaks == 0 || res.Leaks != c.leaks {
				t.Fatalf("check: %+v %v", res, err)
			}
			t.Log(res.Messages)
			res, err = d.Check(ctx, driver.RepairAll)
			if err != nil || res.Corruptions+res.Leaks != 0 {
				t.Fatalf("repair: %+v %v %v", res, err, res.Messages)
			}
			// Writes after the repair keep everything consistent.
			d.WriteAt([]byte("after"), 900<<10)
			checkClean(t, d)
			d.Close()
		})
	}
}

func TestProbe(t *testing.T) {
	dyn := makeImage(t, 1<<20, false, "force_size=on")
	fixed := makeImage(t, 1<<20, false, "subformat=fixed", "force_size=on")
	p := func(b []byte) int {
		res := driver.ProbeAll(bytes.NewReader(b), int64(len(b)))
		for _, r := range res {
			if r.Format.Name == "vpc" {
				return r.Score
			}
		}
		return 0
	}
	if p(dyn) != 100 || p(fixed) != 100 {
		t.Fatalf("dynamic %d, fixed %d", p(dyn), p(fixed))
	}
	for _, b := range [][]byte{nil, []byte("con"), []byte("conectiy"), make([]byte, 4096), dyn[1:511], fixed[:len(fixed)-1]} {
		if s := p(b); s != 0 {
			t.Errorf("probe of %d bytes = %d", len(b), s)
		}
	}
	// Through the container: a fixed VHD probes as vpc, not raw.
	st := memfs.New()
	st.WriteFile("/f.img", fixed)
	d, err := vdisk.Open(ctx, "/f.img", &vdisk.OpenOptions{Storage: st, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if d.Top().Format.Name != "vpc" || d.Size() != 1<<20 {
		t.Fatalf("probed %s, size %d", d.Top().Format.Name, d.Size())
	}
	d.Close()
	if f, err := driver.Lookup("vhd"); err != nil || f.Name != "vpc" {
		t.Fatalf("alias: %v", err)
	}
}
