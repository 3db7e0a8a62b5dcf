package qcow

import (
	"bytes"
	"encoding/binary"
	"errors"
	"runtime"
	"strings"
	"testing"

	"github.com/klauspost/compress/flate"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// goodImage makes a 64 KiB image with 4 KiB clusters: cluster 0 data,
// cluster 1 compressed, the rest unallocated. It returns the file and the
// file offsets of the L1 table and the L2 table.
func goodImage(t *testing.T) (b []byte, l1, l2 int64) {
	t.Helper()
	withGeometry(t, 12, 9)
	st := memfs.New()
	d := createQcow(t, st, "/g.qcow", 64<<10, "")
	disktest.MustWrite(t, d, nil, disktest.Fill(4096, 0x11), 0)
	if err := topImage(d).WriteCompressed(bytes.Repeat([]byte("abcd"), 1024), 4096); err != nil {
		t.Fatal(err)
	}
	im := topImage(d)
	disktest.MustClose(t, d)
	b, _ = st.ReadFile("/g.qcow")
	l1 = im.lo.l1Off
	l2 = int64(binary.BigEndian.Uint64(b[l1:]))
	return b, l1, l2
}

func openBytes(t *testing.T, b []byte, ro bool) (*image, error) {
	t.Helper()
	st := memfs.New()
	st.WriteFile("/h.qcow", b)
	img, err := Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/h.qcow", ReadOnly: ro})
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { img.Close() })
	return img.(*image), nil
}

// TestHostileHeaders: damaged or hostile header fields give ErrCorrupt (or
// ErrUnsupported for a version or encryption we do not read) naming the
// problem, fast and without a big allocation.
func TestHostileHeaders(t *testing.T) {
	good, _, _ := goodImage(t)
	be := binary.BigEndian
	u32 := func(off int, v uint32) func([]byte) []byte {
		return func(b []byte) []byte { be.PutUint32(b[off:], v); return b }
	}
	u64 := func(off int, v uint64) func([]byte) []byte {
		return func(b []byte) []byte { be.PutUint64(b[off:], v); return b }
	}
	u8 := func(off int, v byte) func([]byte) []byte {
		return func(b []byte) []byte { b[off] = v; return b }
	}
	for _, c := range []struct {
		name   string
		mutate func([]byte) []byte
		want   error
		msg    string
	}{
		{"bad magic", u32(0, 0x514649fa), driver.ErrCorrupt, "magic"},
		{"version 2", u32(4, 2), driver.ErrUnsupported, "qcow2"},
		{"version 7", u32(4, 7), driver.ErrUnsupported, "version 7"},
		{"short file", func(b []byte) []byte { return b[:40] }, driver.ErrCorrupt, "too small"},
		{"size 0", u64(24, 0), driver.ErrCorrupt, "too small"},
		{"size 1", u64(24, 1), driver.ErrCorrupt, "too small"},
		{"cluster_bits 8", u8(32, 8), driver.ErrCorrupt, "cluster_bits"},
		{"cluster_bits 17", u8(32, 17), driver.ErrCorrupt, "cluster_bits"},
		{"l2_bits 5", u8(33, 5), driver.ErrCorrupt, "l2_bits"},
		{"l2_bits 14", u8(33, 14), driver.ErrCorrupt, "l2_bits"},
		{"AES", u32(36, 1), driver.ErrUnsupported, "AES"},
		{"crypt 2", u32(36, 2), driver.ErrCorrupt, "encryption method"},
		{"size 2^64-1", u64(24, 1<<64-1), driver.ErrCorrupt, "too large"},
		{"L1 size overflow", func(b []byte) []byte {
			be.PutUint64(b[24:], 1<<62)
			b[32], b[33] = 9, 6
			return b
		}, driver.ErrCorrupt, "L1 entries"},
		{"L1 past EOF", u64(24, 1<<40), driver.ErrCorrupt, "past the end"},
		{"L1 offset past EOF", u64(40, 1<<50), driver.ErrCorrupt, "past the end"},
		{"L1 offset wraps", u64(40, 1<<64-8), driver.ErrCorrupt, "past the end"},
		{"L1 over the header", u64(40, 8), driver.ErrCorrupt, "overlaps the header"},
		{"backing name too long", func(b []byte) []byte {
			be.PutUint64(b[8:], 48)
			be.PutUint32(b[16:], 2000)
			return b
		}, driver.ErrCorrupt, "too long"},
		{"backing name past EOF", func(b []byte) []byte {
			be.PutUint64(b[8:], 1<<40)
			be.PutUint32(b[16:], 10)
			return b
		}, driver.ErrCorrupt, "past the end"},
	} {
		t.Run(c.name, func(t *testing.T) {
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			before := ms.TotalAlloc
			_, err := openBytes(t, c.mutate(bytes.Clone(good)), true)
			if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.msg) || !strings.Contains(err.Error(), "/h.qcow") {
				t.Fatalf("got %v, want %v mentioning %q and the file", err, c.want, c.msg)
			}
			runtime.ReadMemStats(&ms)
			if ms.TotalAlloc-before > 1<<20 {
				t.Fatalf("refusing the header allocated %d bytes", ms.TotalAlloc-before)
			}
		})
	}
}

// deflate compresses p with qemu's window.
func deflate(t *testing.T, p []byte) []byte {
	var out bytes.Buffer
	w, err := flate.NewWriterWindow(&out, deflateWindow)
	if err != nil {
		t.Fatal(err)
	}
	w.Write(p)
	w.Close()
	return out.Bytes()
}

// TestHostileTables: bad L1 and L2 entries open (they are found when
// used, as in qemu) and then fail reads and writes with ErrCorrupt naming
// the problem, never panicking or allocating by a hostile count.
// Compressed streams that inflate to more than a cluster (a decompression
// bomb) read one cluster, as in qemu.
func TestHostileTables(t *testing.T) {
	good, l1, l2 := goodImage(t)
	be := binary.BigEndian
	comp := be.Uint64(good[l2+8:]) // cluster 1's entry
	lo := layout{cb: 12, cs: 4096, offMask: 1<<51 - 1}
	coff, clen := lo.compressed(comp)
	// The end of the file holds a stream that inflates to 1 MiB of zeros
	// and a garbage one.
	bomb := deflate(t, make([]byte, 1<<20))
	bombOff := int64(len(good))
	garbageOff := bombOff + int64(len(bomb))
	withStreams := append(append(bytes.Clone(good), bomb...), bytes.Repeat([]byte{0xff}, 100)...)
	short := deflate(t, make([]byte, 1000))
	shortOff := int64(len(withStreams))
	withStreams = append(withStreams, short...)
	entry := func(v uint64) func([]byte) []byte {
		return func(b []byte) []byte { be.PutUint64(b[l2+16:], v); return b } // cluster 2
	}
	for _, c := range []struct {
		name   string
		base   []byte
		mutate func([]byte) []byte
		msg    string // "" : reads fine
		at     int64  // where the bad cluster is
	}{
		{"L2 table past EOF", good, func(b []byte) []byte { be.PutUint64(b[l1:], 1<<40); return b }, "past the end of the file", 0},
		{"L2 table straddles EOF", good, func(b []byte) []byte { be.PutUint64(b[l1:], uint64(len(b)-100)); return b }, "past the end of the file", 0},
		{"L2 table over the L1 table", good, func(b []byte) []byte { be.PutUint64(b[l1:], 40); return b }, "header or L1", 0},
		{"data cluster past EOF", good, entry(1 << 40), "past the end", 8192},
		{"data cluster at 2^62", good, entry(1 << 62), "past the end", 8192},
		{"data cluster unaligned", good, entry(uint64(l2) + 3), "not sector-aligned", 8192},
		{"compressed length 0", good, entry(lo.compressedEntry(coff, 0)), "length 0", 8192},
		{"compressed stream past EOF", good, entry(lo.compressedEntry(int64(len(good))-10, 4000)), "past the end", 8192},
		{"compressed offset huge", good, entry(lo.compressedEntry(1<<50, 4095)), "past the end", 8192},
		{"compressed garbage", withStreams, entry(lo.compressedEntry(garbageOff, 100)), "does not inflate", 8192},
		{"compressed stream too short", withStreams, entry(lo.compressedEntry(shortOff, int64(len(short)))), "less than a cluster", 8192},
		{"compressed stream cut", good, entry(lo.compressedEntry(coff, clen/2)), "inflate", 8192},
		{"decompression bomb", withStreams, entry(lo.compressedEntry(bombOff, int64(len(bomb)))), "", 8192},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := c.mutate(bytes.Clone(c.base))
			im, err := openBytes(t, b, false)
			if err != nil {
				t.Fatalf("open: %v", err)
			}
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			before := ms.TotalAlloc
			p := make([]byte, 4096)
			_, err = im.ReadAt(p, c.at)
			runtime.ReadMemStats(&ms)
			if ms.TotalAlloc-before > 1<<20 {
				t.Fatalf("reading allocated %d bytes", ms.TotalAlloc-before)
			}
			if c.msg == "" {
				if err != nil || !driver.IsZero(p) {
					t.Fatalf("read: %v", err)
				}
				return
			}
			if !errors.Is(err, driver.ErrCorrupt) || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("read: %v, want ErrCorrupt mentioning %q", err, c.msg)
			}
			if _, err := im.Status(0, im.Size()); err != nil && !errors.Is(err, driver.ErrCorrupt) {
				t.Fatalf("status: %v", err)
			}
			// Partial and whole writes are refused too (compressed
			// clusters would be inflated first).
			for _, w := range [][2]int64{{c.at + 100, 10}, {c.at, 4096}} {
				if _, err := im.WriteAt(make([]byte, w[1]), w[0]); err == nil {
					if c.at != 8192 || !strings.Contains(c.name, "compressed") || w[1] != 4096 {
						t.Fatalf("write %v into a corrupt cluster succeeded", w)
					}
				} else if !errors.Is(err, driver.ErrCorrupt) {
					t.Fatalf("write %v: %v", w, err)
				}
			}
		})
	}
}

// TestCreateAndInfo: create refuses what qemu refuses (a zero size, a
// backing name qemu could not read back) and Info reports the geometry.
func TestCreateAndInfo(t *testing.T) {
	st := memfs.New()
	if _, err := vdisk.Create(ctx, "/z.qcow", &vdisk.CreateOptions{Format: "qcow", Storage: st}); !errors.Is(err, driver.ErrInvalidOption) {
		t.Fatalf("create of size 0: %v", err)
	}
	vals, _ := driver.ParseOptions("qcow", Format.CreateOptions, nil)
	_, err := Format.Create(ctx, &driver.CreateParams{Storage: st, Name: "/l.qcow", Size: 1 << 20, Options: vals,
		ParentRef: &driver.ParentRef{Name: strings.Repeat("x", 1024)}})
	if !errors.Is(err, driver.ErrInvalidOption) {
		t.Fatalf("create with a 1024-byte backing name: %v", err)
	}
	d := createQcow(t, st, "/i.qcow", 5<<20+1, "")
	info := d.Top().Info()
	s, ok := info.Specific.(*Info)
	if info.Format != "qcow" || info.VirtualSize != 5<<20+512 || info.ClusterSize != 4096 || !ok ||
		s.ClusterBits != 12 || s.L2Bits != 9 || s.L1Size != 3 {
		t.Fatalf("info %+v %+v", info, info.Specific)
	}
	if d.Top().ParentRef() != nil {
		t.Fatal("a base image reports a parent")
	}
	disktest.MustClose(t, d)
	// A header size that is not a whole number of sectors reads as qemu
	// reads it: rounded down.
	b, _ := st.ReadFile("/i.qcow")
	binary.BigEndian.PutUint64(b[24:], 5<<20+700)
	im, err := openBytes(t, b, true)
	if err != nil || im.Size() != 5<<20+512 {
		t.Fatalf("odd header size: %v, size %d", err, im.Size())
	}
}
