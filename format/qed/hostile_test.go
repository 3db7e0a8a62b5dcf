package qed

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math"
	"runtime"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// goodImage is a small valid image: 4 KiB clusters, 1-cluster tables,
// data in clusters 1 and 2 (cluster 0 unallocated).
func goodImage(t *testing.T) []byte {
	st := memfs.New()
	d := createQED(t, st, "/g.qed", 64<<10, "", "", disktest.KVs("cluster_size=4k", "table_size=1")...)
	disktest.MustWrite(t, d, nil, disktest.Fill(8192, 0x42), 4096)
	disktest.MustClose(t, d)
	b, err := st.ReadFile("/g.qed")
	if err != nil {
		t.Fatal(err)
	}
	// header 0, L1 4k, data 8k and 12k, L2 16k.
	if len(b) != 20<<10 || binary.LittleEndian.Uint64(b[4096:]) != 16<<10 {
		t.Fatalf("unexpected layout: %d bytes, L1[0] %#x", len(b), binary.LittleEndian.Uint64(b[4096:]))
	}
	return b
}

// TestHostileHeaders: damaged or hostile header fields give ErrCorrupt
// (ErrUnsupported for unknown features) naming the problem, without a big
// allocation.
func TestHostileHeaders(t *testing.T) {
	good := goodImage(t)
	le := binary.LittleEndian
	u32 := func(off int, v uint32) func([]byte) []byte {
		return func(b []byte) []byte { le.PutUint32(b[off:], v); return b }
	}
	u64 := func(off int, v uint64) func([]byte) []byte {
		return func(b []byte) []byte { le.PutUint64(b[off:], v); return b }
	}
	for _, c := range []struct {
		name   string
		mutate func([]byte) []byte
		want   error
		msg    string
	}{
		{"bad magic", u32(0, 0x00444552), driver.ErrCorrupt, "magic"},
		{"short file", func(b []byte) []byte { return b[:40] }, driver.ErrCorrupt, "too small"},
		{"unknown feature", u64(16, 0x10), driver.ErrUnsupported, "feature"},
		{"cluster size 0", u32(4, 0), driver.ErrCorrupt, "cluster size"},
		{"cluster size 3000", u32(4, 3000), driver.ErrCorrupt, "cluster size"},
		{"cluster size 2K", u32(4, 2048), driver.ErrCorrupt, "cluster size"},
		{"cluster size 128M", u32(4, 128<<20), driver.ErrCorrupt, "cluster size"},
		{"table size 0", u32(8, 0), driver.ErrCorrupt, "table size"},
		{"table size 3", u32(8, 3), driver.ErrCorrupt, "table size"},
		{"table size 32", u32(8, 32), driver.ErrCorrupt, "table size"},
		{"header size 0", u32(12, 0), driver.ErrCorrupt, "header size"},
		{"header size huge", u32(12, 0xFFFFFFFF), driver.ErrCorrupt, "header size"},
		{"image size odd", u64(48, 1000), driver.ErrCorrupt, "multiple of 512"},
		{"image size past the maximum", u64(48, 1<<31), driver.ErrCorrupt, "exceeds the maximum"},
		{"image size 2^63", u64(48, 1<<63), driver.ErrCorrupt, "exceeds the maximum"},
		{"L1 misaligned", u64(40, 4097), driver.ErrCorrupt, "L1 table offset"},
		{"L1 inside the header", u64(40, 0), driver.ErrCorrupt, "L1 table offset"},
		{"L1 past EOF", u64(40, 1<<40), driver.ErrCorrupt, "L1 table offset"},
		{"L1 offset wraps", u64(40, ^uint64(4095)), driver.ErrCorrupt, "L1 table offset"},
		{"table size x cluster size past EOF", func(b []byte) []byte {
			// 64 MiB clusters, 16-cluster tables: a 1 GiB L1 table in a
			// 20 KiB file.
			le.PutUint32(b[4:], 64<<20)
			le.PutUint32(b[8:], 16)
			return b
		}, driver.ErrCorrupt, "header size"},
		{"table size x cluster size, header fits", func(b []byte) []byte {
			le.PutUint32(b[8:], 16) // 64 KiB L1 table at 4 KiB in a 20 KiB file
			return b
		}, driver.ErrCorrupt, "L1 table offset"},
		{"backing name outside the header", func(b []byte) []byte {
			le.PutUint64(b[16:], featBacking)
			le.PutUint32(b[56:], 4000)
			le.PutUint32(b[60:], 200)
			return b
		}, driver.ErrCorrupt, "outside"},
		{"backing name huge", func(b []byte) []byte {
			le.PutUint64(b[16:], featBacking)
			le.PutUint32(b[56:], 64)
			le.PutUint32(b[60:], 0xFFFFFF00)
			return b
		}, driver.ErrCorrupt, "outside"},
		{"backing name empty", func(b []byte) []byte {
			le.PutUint64(b[16:], featBacking)
			le.PutUint32(b[56:], 64)
			return b
		}, driver.ErrCorrupt, "backing file name of 0 bytes"},
	} {
		t.Run(c.name, func(t *testing.T) {
			st := memfs.New()
			st.WriteFile("/h.qed", c.mutate(bytes.Clone(good)))
			var ms0, ms1 runtime.MemStats
			runtime.ReadMemStats(&ms0)
			_, err := Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/h.qed", ReadOnly: true})
			runtime.ReadMemStats(&ms1)
			if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.msg) || !strings.Contains(err.Error(), "/h.qed") {
				t.Fatalf("got %v, want %v mentioning %q and the file", err, c.want, c.msg)
			}
			if a := ms1.TotalAlloc - ms0.TotalAlloc; a > 1<<20 {
				t.Fatalf("refusing the header allocated %d bytes", a)
			}
		})
	}
}

// TestHostileTables: L1 and L2 entries past the end of the file,
// misaligned or cross-linked. The image opens without a scan; reading or
// writing the damaged range fails with ErrCorrupt naming it (the rest
// reads); check reports the damage, and the repaired image reads (the
// cleared ranges as zeros) and checks clean.
func TestHostileTables(t *testing.T) {
	good := goodImage(t)
	le := binary.LittleEndian
	for _, c := range []struct {
		name    string
		mutate  func([]byte)
		bad     int64 // a virtual offset that must fail to read (-1: none)
		cleared [2]int64
	}{
		{"L1 entry past EOF", func(b []byte) { le.PutUint64(b[4096:], 1<<40) }, 4096, [2]int64{0, 64 << 10}},
		{"L1 entry misaligned", func(b []byte) { le.PutUint64(b[4096:], 16<<10+8) }, 4096, [2]int64{0, 64 << 10}},
		{"L2 entry past EOF", func(b []byte) { le.PutUint64(b[16<<10+8:], 1<<50) }, 4096, [2]int64{4096, 8192}},
		{"L2 entry misaligned", func(b []byte) { le.PutUint64(b[16<<10+16:], 8<<10+512) }, 8192, [2]int64{8192, 12288}},
		{"L2 entries cross-linked", func(b []byte) { le.PutUint64(b[16<<10+16:], 8<<10) }, -1, [2]int64{8192, 12288}},
		{"L2 entry at the L1 table", func(b []byte) { le.PutUint64(b[16<<10+24:], 4<<10) }, -1, [2]int64{12288, 16384}},
	} {
		t.Run(c.name, func(t *testing.T) {
			st := memfs.New()
			b := bytes.Clone(good)
			c.mutate(b)
			st.WriteFile("/h.qed", b)
			d := openQED(t, st, "/h.qed", true)
			if c.bad >= 0 {
				_, err := d.ReadAt(make([]byte, 512), c.bad)
				if !errors.Is(err, driver.ErrCorrupt) || !strings.Contains(err.Error(), "/h.qed") {
					t.Fatalf("reading the damaged range: %v", err)
				}
			}
			res, err := d.Check(ctx, driver.RepairNone)
			if err != nil || res.Corruptions == 0 {
				t.Fatalf("check: %+v %v", res, err)
			}
			disktest.MustClose(t, d)

			d = openQED(t, st, "/h.qed", false)
			if c.bad >= 0 {
				if _, err := d.WriteAt([]byte{1}, c.bad); !errors.Is(err, driver.ErrCorrupt) {
					t.Fatalf("writing the damaged range: %v", err)
				}
			}
			// Once check has seen the damage, writes wait for a repair.
			if res, err := d.Check(ctx, driver.RepairNone); err != nil || res.Corruptions == 0 {
				t.Fatalf("check read-write: %+v %v", res, err)
			}
			if _, err := d.WriteAt([]byte{1}, 60<<10); !errors.Is(err, driver.ErrCorrupt) {
				t.Fatalf("writing after check found damage: %v", err)
			}
			res, err = d.Check(ctx, driver.RepairAll)
			if err != nil || res.Corruptions != 0 || res.CorruptionsFixed == 0 {
				t.Fatalf("repair: %+v %v", res, err)
			}
			want := make([]byte, 64<<10)
			copy(want[4096:], disktest.Fill(8192, 0x42))
			clear(want[c.cleared[0]:c.cleared[1]])
			if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
				t.Fatal("content after the repair")
			}
			disktest.MustWrite(t, d, nil, []byte{1}, 60<<10)
			disktest.MustClose(t, d)
			d = openQED(t, st, "/h.qed", true)
			if res, err := d.Check(ctx, driver.RepairNone); err != nil || res.Corruptions+res.Leaks != 0 {
				t.Fatalf("check after the repair: %+v %v %q", res, err, res.Messages)
			}
			disktest.MustClose(t, d)
		})
	}
}

// TestHugeImage: the largest sizes QED allows open and read without
// memory in proportion to the virtual size.
func TestHugeImage(t *testing.T) {
	st := memfs.New()
	size := maxImageSize(1<<20, 16) // 2^62: only the L1 table is read
	if size != 1<<62 {
		t.Fatalf("max size %d", size)
	}
	if mx := maxImageSize(64<<20, 16); mx != math.MaxInt64&^511 {
		t.Fatalf("the largest geometry's maximum %d does not saturate", mx)
	}
	d := createQED(t, st, "/huge.qed", size, "", "", disktest.KVs("cluster_size=1M", "table_size=16")...)
	disktest.MustWrite(t, d, nil, []byte{7}, size-1)
	disktest.MustClose(t, d)
	d = openQED(t, st, "/huge.qed", true)
	e, err := d.Status(0, size)
	if err != nil || e.State != driver.Unallocated || e.Length != size-1<<20 {
		t.Fatalf("status %+v %v", e, err)
	}
	p := make([]byte, 1)
	if _, err := d.ReadAt(p, size-1); err != nil || p[0] != 7 {
		t.Fatalf("last byte %v %v", p, err)
	}
	disktest.MustClose(t, d)
	if _, err := vdisk.Create(ctx, "/too.qed", &vdisk.CreateOptions{Format: "qed", Size: 1 << 40, Storage: st,
		Options: disktest.KVs("cluster_size=4k", "table_size=1")}); !errors.Is(err, driver.ErrInvalidOption) {
		t.Fatalf("creating past the maximum: %v", err)
	}
}
