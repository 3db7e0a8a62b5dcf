package vhd

import (
	"context"
	"strings"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/memfs"
)

func TestGeometryTable(t *testing.T) {
	// Geometries qemu-img 7.2 writes for these sizes (see TestSizesMatchQemu
	// for the live comparison).
	for _, c := range []struct {
		size int64
		g    driver.CHS
		virt int64
	}{
		{10 << 20, driver.CHS{Cylinders: 302, Heads: 4, Sectors: 17}, 10514432},
		{1 << 30, driver.CHS{Cylinders: 2081, Heads: 16, Sectors: 63}, 1073995776},
		{100000000, driver.CHS{Cylinders: 958, Heads: 12, Sectors: 17}, 100061184},
		{7000, driver.CHS{Cylinders: 1, Heads: 4, Sectors: 17}, 34816},
		{0, driver.CHS{}, 0},
	} {
		g, virt, err := createGeometry(c.size, false)
		if err != nil || g != c.g || virt != c.virt {
			t.Errorf("%d: %+v %d %v; want %+v %d", c.size, g, virt, err, c.g, c.virt)
		}
	}
	g, virt, _ := createGeometry(7000, true)
	if g != maxCHS || virt != 7168 {
		t.Errorf("force: %+v %d", g, virt)
	}
	if _, _, err := createGeometry(2041<<30, true); err == nil {
		t.Error("2041 GiB accepted")
	}
}

func TestFooterRoundTrip(t *testing.T) {
	f := footer{features: featReserved, version: formatVersion, dataOffset: 512, curSize: 1 << 30, diskType: diskDynamic, uuid: newUUID()}
	copy(f.creatorApp[:], "vdsk")
	f.setCHS(driver.CHS{Cylinders: 2081, Heads: 16, Sectors: 63})
	b := f.marshal()
	g, cookie, ok := parseFooter(b)
	if !cookie || !ok || g != f {
		t.Fatalf("round trip: %+v %v %v", g, cookie, ok)
	}
	b[100] ^= 1
	if _, _, ok := parseFooter(b); ok {
		t.Fatal("checksum missed a flipped bit")
	}
	h := header{dataOffset: noOffset, tableOffset: 1536, version: formatVersion, maxEntries: 9, blockSize: 1 << 21}
	h.locators[1] = locator{code: platW2ru, space: 1024, length: 20, offset: 4096}
	hb := h.marshal()
	h2, cookie, ok := parseHeader(hb)
	if !cookie || !ok || h2 != h {
		t.Fatalf("header round trip: %+v", h2)
	}
}

func TestUUIDAndNames(t *testing.T) {
	u := newUUID()
	s := formatUUID(u)
	if v, err := parseUUID(s); err != nil || v != u || len(s) != 36 || s[14] != '4' {
		t.Fatalf("%s: %v", s, err)
	}
	if v, err := parseUUID("{" + strings.ToUpper(s) + "}"); err != nil || v != u {
		t.Fatal("braces/upper case")
	}
	for _, bad := range []string{"", "xyz", s[:35], s + "0"} {
		if _, err := parseUUID(bad); err == nil {
			t.Errorf("parsed %q", bad)
		}
	}
	if formatUUID([16]byte{}) != "" {
		t.Error("zero UUID should read as not recorded")
	}
	for in, want := range map[string]string{`.\base.vhd`: "base.vhd", `..\x\b.vhd`: "../x/b.vhd", `.\.\a\b.vhd`: "a/b.vhd", "c.vhd": "c.vhd"} {
		if got := fromWindowsRel(in); got != want {
			t.Errorf("fromWindowsRel(%q) = %q", in, got)
		}
	}
	for in, want := range map[string]string{"base.vhd": `.\base.vhd`, "../x/b.vhd": `..\x\b.vhd`, "a/b.vhd": `.\a\b.vhd`} {
		if got := toWindowsRel(in); got != want {
			t.Errorf("toWindowsRel(%q) = %q", in, got)
		}
	}
	name := "dísk-€-😀.vhd"
	for _, bigEndian := range []bool{true, false} {
		got, err := decodeUTF16(append(encodeUTF16(name, bigEndian), 0, 0, 'x', 0), bigEndian)
		if err != nil || got != name {
			t.Errorf("UTF-16 round trip: %q %v", got, err)
		}
	}
	for _, bad := range [][]byte{{0xD8, 0x00}, {0xDC, 0x00, 0, 'a'}, {0, 1}, {0, 'a', 0}} {
		if _, err := decodeUTF16(bad, true); err == nil {
			t.Errorf("decoded %x", bad)
		}
	}
}

// TestTrimWaitsForAllocations: a flush that cuts freed blocks off the end
// of the file leaves alone a block being allocated (reserved, its BAT
// entry not yet written).
func TestTrimWaitsForAllocations(t *testing.T) {
	st := memfs.New()
	vals, _ := driver.ParseOptions("vpc", Format.CreateOptions, []driver.KV{{Key: "block_size", Value: "64K"}})
	di, err := create(context.Background(), &driver.CreateParams{Storage: st, Name: "/t.vhd", Size: 1 << 20, Options: vals})
	if err != nil {
		t.Fatal(err)
	}
	im := di.(*image)
	defer im.Close()
	p := make([]byte, 64<<10)
	p[0] = 1
	if _, err := im.WriteAt(p, 0); err != nil {
		t.Fatal(err)
	}
	if err := im.Discard(0, 64<<10); err != nil || !im.tailFreed {
		t.Fatalf("discard of the last block: %v, tailFreed %v", err, im.tailFreed)
	}
	im.mu.Lock()
	pos, _, err := im.reserveLocked()
	im.inflight++
	if err == nil {
		err = im.trimTailLocked()
	}
	end := im.end
	im.inflight--
	im.mu.Unlock()
	if err != nil || end != pos+im.bmSize+im.bs {
		t.Fatalf("trim moved the end to %d under a block reserved at %d (%v)", end, pos, err)
	}
	// Once nothing is in flight, the next flush trims.
	if err := im.Flush(); err != nil || im.end != im.metaEnd {
		t.Fatalf("flush: end %d, metadata ends at %d (%v)", im.end, im.metaEnd, err)
	}
}
