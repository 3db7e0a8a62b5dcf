package vhdx

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// smallImage is a valid 8 MiB dynamic image with 1 MiB blocks and data in
// a few blocks.
func smallImage(t testing.TB) []byte {
	mem := memfs.New()
	d := createVHDX(t, mem, "/s.vhdx", 8<<20, "", disktest.KVs("block_size=1M")...)
	disktest.MustWrite(t, d, nil, disktest.Fill(5000, 0x11), 1000)
	disktest.MustWrite(t, d, nil, disktest.Fill(4096, 0x22), 5<<20)
	disktest.MustClose(t, d)
	b, err := mem.ReadFile("/s.vhdx")
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// layout of images vdisk makes with the default 1 MiB log.
const (
	tBATOff  = 2 * mib
	tMetaOff = 3 * mib
)

// openBytes opens b as an image read-only.
func openBytes(t testing.TB, b []byte, ro bool) (*vdisk.Disk, error) {
	mem := memfs.New()
	f, err := mem.Open("/h.vhdx", driver.ReadWrite|driver.Create)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt(b, 0)
	f.Close()
	return vdisk.Open(ctx, "/h.vhdx", &vdisk.OpenOptions{Storage: mem, ReadOnly: ro, Format: "vhdx"})
}

// rewriteHeaders applies fn to both headers and fixes their checksums.
func rewriteHeaders(b []byte, fn func(h *header)) {
	for _, off := range []int{header1Off, header2Off} {
		h := parseHeader(b[off : off+headerSize])
		fn(&h)
		copy(b[off:], h.marshal())
	}
}

func rewriteRegions(b []byte, fn func(r []regionEntry) []regionEntry) {
	for _, off := range []int{region1Off, region2Off} {
		ents, _ := parseRegionTable(b[off : off+regionSize])
		copy(b[off:], marshalRegionTable(fn(ents)))
	}
}

// metaItemAt finds an item's offset in the file.
func metaItemAt(b []byte, id guid) int {
	n := int(binary.LittleEndian.Uint16(b[tMetaOff+10:]))
	for i := 0; i < n; i++ {
		e := b[tMetaOff+32+32*i:]
		if bytes.Equal(e[:16], id[:]) {
			return tMetaOff + int(binary.LittleEndian.Uint32(e[16:]))
		}
	}
	panic("no item")
}

// TestHostile: damaged images fail to open with a clear corrupt or
// unsupported error naming the problem, never a panic or a huge
// allocation; damaged BAT entries open and fail only where used.
func TestHostile(t *testing.T) {
	base := smallImage(t)
	if d, err := openBytes(t, base, true); err != nil {
		t.Fatal(err)
	} else {
		d.Close()
	}
	le := binary.LittleEndian
	for _, c := range []struct {
		name string
		mod  func(b []byte) []byte
		want error
		msg  string
	}{
		{"truncated", func(b []byte) []byte { return b[:500<<10] }, driver.ErrCorrupt, "too small"},
		{"no-signature", func(b []byte) []byte { b[0] = 'X'; return b }, driver.ErrCorrupt, "file type identifier"},
		{"headers-bad-crc", func(b []byte) []byte { b[header1Off+100]++; b[header2Off+100]++; return b }, driver.ErrCorrupt, "neither VHDX header"},
		{"log-outside-file", func(b []byte) []byte {
			rewriteHeaders(b, func(h *header) { h.logOffset = 1 << 40 })
			return b
		}, driver.ErrCorrupt, "log of"},
		{"log-huge", func(b []byte) []byte {
			rewriteHeaders(b, func(h *header) { h.logLength = 0xFFF00000 })
			return b
		}, driver.ErrCorrupt, "log of"},
		{"region-overlap", func(b []byte) []byte {
			rewriteRegions(b, func(r []regionEntry) []regionEntry { r[0].off = tMetaOff; return r })
			return b
		}, driver.ErrCorrupt, "overlaps"},
		{"region-in-log", func(b []byte) []byte {
			rewriteRegions(b, func(r []regionEntry) []regionEntry { r[0].off = mib; return r })
			return b
		}, driver.ErrCorrupt, "overlaps"},
		{"region-unknown-required", func(b []byte) []byte {
			rewriteRegions(b, func(r []regionEntry) []regionEntry {
				return append(r, regionEntry{newGUID(), 5 * mib, mib, true})
			})
			return b
		}, driver.ErrUnsupported, "required region"},
		{"region-count-huge", func(b []byte) []byte {
			le.PutUint32(b[region1Off+8:], 1<<30)
			le.PutUint32(b[region2Off+8:], 1<<30)
			return b
		}, driver.ErrCorrupt, "region table"},
		{"block-size-not-pow2", func(b []byte) []byte {
			le.PutUint32(b[metaItemAt(b, guidFileParam):], 3<<20)
			return b
		}, driver.ErrCorrupt, "power of two"},
		{"disk-size-huge", func(b []byte) []byte {
			le.PutUint64(b[metaItemAt(b, guidDiskSize):], 1<<62)
			return b
		}, driver.ErrCorrupt, "virtual disk size"},
		{"bat-too-small", func(b []byte) []byte {
			le.PutUint64(b[metaItemAt(b, guidDiskSize):], 60<<40)
			return b
		}, driver.ErrCorrupt, "BAT region"},
		{"sector-size", func(b []byte) []byte {
			le.PutUint32(b[metaItemAt(b, guidLogical):], 1000)
			return b
		}, driver.ErrCorrupt, "logical sector size"},
		{"meta-count-huge", func(b []byte) []byte { le.PutUint16(b[tMetaOff+10:], 0xFFFF); return b }, driver.ErrCorrupt, "metadata table"},
		{"meta-item-outside", func(b []byte) []byte { le.PutUint32(b[tMetaOff+32+16:], 0xFFFFFF00); return b }, driver.ErrCorrupt, "outside"},
		{"meta-unknown-required", func(b []byte) []byte {
			g := newGUID()
			copy(b[tMetaOff+32:], g[:])
			return b
		}, driver.ErrUnsupported, "required metadata item"},
		{"parent-without-locator", func(b []byte) []byte {
			le.PutUint32(b[metaItemAt(b, guidFileParam)+4:], fpHasParent)
			return b
		}, driver.ErrCorrupt, "parent locator"},
	} {
		t.Run(c.name, func(t *testing.T) {
			d, err := openBytes(t, c.mod(bytes.Clone(base)), true)
			if err == nil {
				d.Close()
				t.Fatal("opened")
			}
			if !errors.Is(err, c.want) || !bytes.Contains([]byte(err.Error()), []byte(c.msg)) {
				t.Fatalf("error %v, want %v mentioning %q", err, c.want, c.msg)
			}
		})
	}
}

// TestHostileBAT: BAT entries past the end of the file, into metadata or
// into another block, or in an invalid state, open; reading those blocks
// fails with ErrCorrupt, check counts them and check -r all repairs them.
func TestHostileBAT(t *testing.T) {
	b := smallImage(t)
	le := binary.LittleEndian
	good := le.Uint64(b[tBATOff:])                // block 0, allocated
	le.PutUint64(b[tBATOff+8:], 1<<40|stFull)     // past EOF
	le.PutUint64(b[tBATOff+16:], tMetaOff|stFull) // into metadata
	le.PutUint64(b[tBATOff+24:], good)            // into block 0
	le.PutUint64(b[tBATOff+32:], 4)               // invalid state
	d, err := openBytes(t, b, false)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	for blk := int64(1); blk <= 4; blk++ {
		if _, err := d.ReadAt(buf, blk<<20); !errors.Is(err, driver.ErrCorrupt) {
			t.Fatalf("block %d: read error %v", blk, err)
		}
	}
	res, err := d.Check(ctx, driver.RepairNone)
	if err != nil || res.Corruptions != 4 {
		t.Fatalf("check: %+v %v", res, err)
	}
	res, err = d.Check(ctx, driver.RepairAll)
	if err != nil || res.CorruptionsFixed != 4 {
		t.Fatalf("repair: %+v %v", res, err)
	}
	if _, err := d.ReadAt(buf, 1<<20); err != nil || !driver.IsZero(buf) {
		t.Fatalf("after repair: %v", err)
	}
	if _, err := d.ReadAt(buf, 0); err != nil || buf[1000] != 0x11 {
		t.Fatalf("block 0 after repair: %v", err)
	}
	disktest.MustClose(t, d)
}

// TestHostileLog: a log entry (valid checksum) writing outside the file
// or into the log refuses the image; one writing into the BAT replays.
func TestHostileLog(t *testing.T) {
	base := smallImage(t)
	g := newGUID()
	withEntry := func(off int64, data []byte) []byte {
		b := bytes.Clone(base)
		rewriteHeaders(b, func(h *header) { h.logGUID = g })
		e := encodeEntry(1, 0, g, int64(len(b)), int64(len(b)), []logWrite{{off, data}})
		copy(b[mib:], e)
		return b
	}
	page := make([]byte, 4096)
	for _, off := range []int64{1 << 40, mib + 4096} {
		if d, err := openBytes(t, withEntry(off, page), true); err == nil || !errors.Is(err, driver.ErrCorrupt) {
			if d != nil {
				d.Close()
			}
			t.Fatalf("entry at %d: %v", off, err)
		}
	}
	// An entry claiming the file was 2 TiB longer.
	huge := bytes.Clone(base)
	rewriteHeaders(huge, func(h *header) { h.logGUID = g })
	copy(huge[mib:], encodeEntry(1, 0, g, int64(len(huge)), int64(len(huge))+2<<40, []logWrite{{tBATOff, page}}))
	if d, err := openBytes(t, huge, false); err == nil || !errors.Is(err, driver.ErrCorrupt) {
		if d != nil {
			d.Close()
		}
		t.Fatalf("entry growing the file by 2 TiB: %v", err)
	}
	// A replayed entry clearing the BAT's first page: the data is gone.
	b := withEntry(tBATOff, page)
	for _, ro := range []bool{true, false} {
		d, err := openBytes(t, b, ro)
		if err != nil {
			t.Fatal(err)
		}
		got := disktest.ReadAll(t, d)
		if !driver.IsZero(got) {
			t.Fatalf("ro=%v: the replayed BAT still shows data", ro)
		}
		if topImage(d).replayedInMemory != ro {
			t.Fatalf("ro=%v: replayed in memory = %v", ro, !ro)
		}
		disktest.MustClose(t, d)
	}
}
