package vhd_test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unicode/utf16"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/memfs"
	"github.com/vdisk/vdisk/storage/osfs"
)

// TestDiscardAndZero: whole blocks are unmapped (a dynamic block then
// reads zeros, a differencing one the parent); zeroing a differencing
// block reads zeros over the parent (whatever the parent holds: the driver
// does not look); partial ranges are zero-filled.
func TestDiscardAndZero(t *testing.T) {
	st := memfs.New()
	const bs = 64 << 10
	base := create(t, st, "/base.vhd", 1<<20, "", "force_size=on", "block_size=64K")
	pb := bytes.Repeat([]byte{0x11}, 1<<20)
	base.WriteAt(pb, 0)
	alloc := func(d *vdisk.Disk) int64 {
		res, err := d.Check(ctx, driver.RepairNone)
		if err != nil {
			t.Fatal(err)
		}
		return res.AllocatedClusters
	}
	if n := alloc(base); n != 16 {
		t.Fatalf("base has %d blocks", n)
	}
	// Dynamic: discard and zero whole blocks free them.
	base.Discard(2*bs, bs)
	base.WriteZeroes(3*bs, bs, true)
	base.WriteZeroes(4*bs+100, 1000, true) // partial: zero-filled
	if n := alloc(base); n != 14 {
		t.Fatalf("after discard/zero: %d blocks", n)
	}
	got := disktest.ReadAll(t, base)
	want := append([]byte(nil), pb...)
	clear(want[2*bs : 4*bs])
	clear(want[4*bs+100 : 4*bs+1100])
	mustEqual(t, "dynamic", got, want)
	base.Close()

	d := create(t, st, "/top.vhd", 0, "base.vhd", "block_size=64K")
	d.WriteAt(bytes.Repeat([]byte{0x22}, 3*bs), 5*bs)
	d.Discard(5*bs, bs)                    // shows the parent again
	d.WriteZeroes(6*bs, bs, true)          // reads zeros over the parent
	d.WriteZeroes(9*bs, bs, false)         // unallocated: a block of zeros
	d.WriteZeroes(2*bs, bs, true)          // the parent reads zeros, which the driver does not know: a block of zeros
	d.WriteZeroes(10*bs+512, 700, true)    // partial
	d.WriteAt([]byte{0x33, 0x33}, 11*bs+1) // partial sector, filled from the parent
	copy(want[5*bs:], pb[:bs])
	clear(want[6*bs : 7*bs])
	copy(want[7*bs:], bytes.Repeat([]byte{0x22}, bs))
	clear(want[9*bs : 10*bs])
	clear(want[10*bs+512 : 10*bs+1212])
	want[11*bs+1], want[11*bs+2] = 0x33, 0x33
	mustEqual(t, "diff", disktest.ReadAll(t, d), want)
	if n := alloc(d); n != 6 {
		t.Fatalf("diff has %d blocks, want 6", n)
	}
	// Compaction drops the block of zeros over the parent's zeros.
	if err := d.Compact(ctx, nil); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "diff compacted", disktest.ReadAll(t, d), want)
	if n := alloc(d); n != 5 {
		t.Fatalf("compacted diff has %d blocks, want 5", n)
	}
	// Status: only what the child holds is data in the child.
	e, _ := d.Status(5*bs, bs)
	if e.Depth != 1 {
		t.Fatalf("discarded block: %+v", e)
	}
	e, _ = d.Status(11*bs, bs)
	if e.Depth != 0 || e.Length != 512 {
		t.Fatalf("partial sector: %+v", e)
	}
	e, _ = d.Status(11*bs+512, bs-512)
	if e.Depth != 1 || e.Length != bs-512 {
		t.Fatalf("rest of the block: %+v", e)
	}
	checkClean(t, d)
	d.Close()
	d = openDisk(t, st, "/top.vhd", true)
	mustEqual(t, "diff reopened", disktest.ReadAll(t, d), want)
	d.Close()
}

// TestCompact: blocks that read zeros (dynamic) or the parent's content
// (differencing) are dropped and the file shrinks; content is unchanged
// and qemu reads the result.
func TestCompact(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	f := filepath.Join(dir, "c.vhd")
	st := osfs.New()
	const bs = 2 << 20
	d := create(t, st, f, 32<<20, "", "force_size=on")
	m := model.New(32 << 20)
	for i := int64(0); i < 16; i++ {
		p := bytes.Repeat([]byte{byte(i + 1)}, 100000)
		if i%3 == 0 {
			clear(p)
		}
		d.WriteAt(p, i*bs+12345)
		m.Write(p, i*bs+12345)
	}
	d.Discard(4*bs, bs)
	m.Zero(4*bs, bs)
	before := disktest.FileSize(t, st, f)
	var last int64
	if err := d.Compact(ctx, func(done, total int64) { last = done }); err != nil {
		t.Fatal(err)
	}
	if last == 0 {
		t.Error("no progress reported")
	}
	after := disktest.FileSize(t, st, f)
	// Header, table, then 9 blocks, each one's data 4 KiB aligned (its
	// bitmap right before it, the footer after the last).
	if want := int64(4096) + 8*(bs+4096) + bs + 512; after != want {
		t.Errorf("file %d bytes after compact (was %d), want %d", after, before, want)
	}
	(&model.Harness{Seed: -1}).Verify(t, d, m)
	checkClean(t, d)
	// Writes after compaction land behind the packed blocks.
	p := bytes.Repeat([]byte{0xee}, 4096)
	d.WriteAt(p, 30<<20)
	m.Write(p, 30<<20)
	d.Close()
	ref := filepath.Join(dir, "c.raw")
	os.WriteFile(ref, m.Data, 0o644)
	if !qemutest.Compare(t, "vpc", f, "raw", ref) {
		t.Fatal("qemu reads the compacted image differently")
	}

	// Differencing: blocks equal to the parent go.
	ms := memfs.New()
	b := create(t, ms, "/b.vhd", 8<<20, "", "force_size=on", "block_size=64K")
	pat := bytes.Repeat([]byte{0x44}, 8<<20)
	b.WriteAt(pat, 0)
	b.Close()
	c := create(t, ms, "/c.vhd", 0, "b.vhd", "block_size=64K")
	c.WriteAt(pat[:4<<20], 0)              // same as the parent
	c.WriteAt([]byte{1, 2, 3}, 5<<20)      // different
	c.WriteAt(make([]byte, 64<<10), 6<<20) // zeros over the parent: different
	if err := c.Compact(ctx, nil); err != nil {
		t.Fatal(err)
	}
	res, _ := c.Check(ctx, driver.RepairNone)
	if res.AllocatedClusters != 2 {
		t.Fatalf("%d blocks after compacting the diff, want 2", res.AllocatedClusters)
	}
	want := append([]byte(nil), pat...)
	copy(want[5<<20:], []byte{1, 2, 3})
	clear(want[6<<20 : 6<<20+64<<10])
	mustEqual(t, "diff after compact", disktest.ReadAll(t, c), want)
	c.Close()
}

// TestResize: fixed and dynamic images grow (with the block table moving
// when it has no room) and shrink; the new range reads zeros; qemu reads
// the result.
func TestResize(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	small := []int64{12 << 20, 3 << 20, 5<<20 + 512, 20 << 20}
	// With 64 KiB blocks the table of a 4 MiB disk has room for 8 MiB:
	// growing to 20 MiB moves it to the end of the file.
	moving := []int64{20 << 20, 3 << 20, 5<<20 + 512, 30 << 20}
	for _, c := range []struct {
		name  string
		steps []int64
		opts  []string
	}{
		{"dynamic", small, []string{"force_size=on"}},
		{"dynamic-chs", small, nil},
		{"dynamic-64k", moving, []string{"block_size=64K", "force_size=on"}},
		{"dynamic-64k-chs", moving, []string{"block_size=64K"}},
		{"fixed", small, []string{"subformat=fixed", "force_size=on"}},
		{"fixed-chs", small, []string{"subformat=fixed"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := filepath.Join(dir, c.name+".vhd")
			d := create(t, nil, f, 4<<20, "", c.opts...)
			size := d.Size()
			m := model.New(size)
			p := bytes.Repeat([]byte{0x5c}, int(size))
			d.WriteAt(p, 0)
			m.Write(p, 0)
			for _, ns := range c.steps {
				if err := d.Resize(ctx, ns, "off"); err != nil {
					t.Fatalf("resize to %d: %v", ns, err)
				}
				got := d.Size()
				if got < ns || got > ns+ns/50+(1<<20) {
					t.Fatalf("resize to %d gave %d", ns, got)
				}
				nm := model.New(got)
				copy(nm.Data, m.Data)
				m = nm
				(&model.Harness{Seed: -1}).Verify(t, d, m)
				w := bytes.Repeat([]byte{byte(ns >> 20)}, 70000)
				d.WriteAt(w, got-70000)
				m.Write(w, got-70000)
				checkClean(t, d)
			}
			d.Close()
			d = openDisk(t, nil, f, true)
			(&model.Harness{Seed: -1}).Verify(t, d, m)
			d.Close()
			if qs := qemuSize(t, f); qs != int64(len(m.Data)) {
				t.Fatalf("qemu size %d, vdisk %d", qs, len(m.Data))
			}
			ref := filepath.Join(dir, c.name+".raw")
			os.WriteFile(ref, m.Data, 0o644)
			if !qemutest.Compare(t, "vpc", f, "raw", ref) {
				t.Fatal("qemu reads the resized image differently")
			}
			os.Remove(ref)
		})
	}
	// A differencing image shrunk and grown again reads zeros, not the
	// parent, in the range that came back.
	st := memfs.New()
	b := create(t, st, "/b.vhd", 4<<20, "", "force_size=on")
	b.WriteAt(bytes.Repeat([]byte{0x66}, 4<<20), 0)
	b.Close()
	d := create(t, st, "/d.vhd", 0, "b.vhd")
	if err := d.Resize(ctx, 1<<20, "off"); err != nil {
		t.Fatal(err)
	}
	if err := d.Resize(ctx, 6<<20, "off"); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 6<<20)
	copy(want, bytes.Repeat([]byte{0x66}, 1<<20))
	mustEqual(t, "diff after resize", disktest.ReadAll(t, d), want)
	checkClean(t, d)
	d.Close()
}

// TestDiffParent: the parent reference, locators, UUID check and Info of a
// differencing image.
func TestDiffParent(t *testing.T) {
	st := memfs.New()
	b := create(t, st, "/vms/base.vhd", 2<<20, "", "force_size=on")
	baseUUID := ident(t, b).UUID()
	b.Close()
	d := create(t, st, "/vms/child.vhd", 0, "base.vhd")
	checkClean(t, d)
	d.Close()
	d = openDisk(t, st, "/vms/child.vhd", false)
	checkClean(t, d)
	ref := d.Top().ParentRef()
	if ref == nil || ref.Name != "base.vhd" || ref.UUID != baseUUID || baseUUID == "" {
		t.Fatalf("parent ref %+v, base UUID %s", ref, baseUUID)
	}
	s := spec(d)
	if s.Type != "differencing" || s.ParentUUID != baseUUID || s.ParentName != "base.vhd" || s.CreatorApp != "vdsk" {
		t.Fatalf("info %+v", s)
	}
	js, _ := json.Marshal(d.Top().Info().Specific)
	for _, k := range []string{`"type":"differencing"`, `"parent-uuid"`, `"creator-app":"vdsk"`, `"block-size":2097152`, `"geometry"`} {
		if !strings.Contains(string(js), k) {
			t.Errorf("info JSON lacks %s: %s", k, js)
		}
	}
	d.Close()

	raw, _ := st.ReadFile("/vms/child.vhd")
	h := raw[512:1536]
	name := utf16be(h[64:576])
	if name != "base.vhd" {
		t.Errorf("parent unicode name %q", name)
	}
	locs := map[string]string{}
	for i := 0; i < 8; i++ {
		e := h[576+24*i:]
		code := string(e[:4])
		if code == "\x00\x00\x00\x00" {
			continue
		}
		off, n := binary.BigEndian.Uint64(e[16:]), binary.BigEndian.Uint32(e[8:])
		locs[code] = utf16le(raw[off : off+uint64(n)])
	}
	if locs["W2ku"] != "/vms/base.vhd" || locs["W2ru"] != `.\base.vhd` {
		t.Errorf("locators %q", locs)
	}

	// A parent with another UUID is refused.
	b = openDisk(t, st, "/vms/base.vhd", false)
	if err := b.SetUUID(vdisk.UUIDImage, "01234567-89ab-cdef-0123-456789abcdef"); err != nil {
		t.Fatal(err)
	}
	b.Close()
	_, err := vdisk.Open(ctx, "/vms/child.vhd", &vdisk.OpenOptions{Storage: st})
	if !errors.Is(err, driver.ErrCorrupt) || !strings.Contains(err.Error(), "UUID") {
		t.Fatalf("UUID mismatch: %v", err)
	}
	// Fixing the recorded parent UUID makes it open again.
	c, err := vdisk.Open(ctx, "/vms/child.vhd", &vdisk.OpenOptions{Storage: st, NoBacking: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetUUID(vdisk.UUIDParent, "01234567-89ab-cdef-0123-456789abcdef"); err != nil {
		t.Fatal(err)
	}
	c.Close()
	c = openDisk(t, st, "/vms/child.vhd", true)
	if len(c.Layers()) != 2 {
		t.Fatal("chain not found")
	}
	c.Close()

	// A parent in another directory (relative locator with "..").
	d, err = vdisk.Create(ctx, "/vms/sub/x.vhd", &vdisk.CreateOptions{Format: "vpc", Storage: st, Backing: "../base.vhd",
		BackingFormat: "vpc", AllowUnsafeBacking: true})
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	raw, _ = st.ReadFile("/vms/sub/x.vhd")
	if !bytes.Contains(raw, encodeLE(`..\base.vhd`)) {
		t.Error("W2ru locator lacks ..\\base.vhd")
	}
	d, err = vdisk.Open(ctx, "/vms/sub/x.vhd", &vdisk.OpenOptions{Storage: st, AllowUnsafeBacking: true})
	if err != nil || d.Layers()[1].Name != "/vms/base.vhd" {
		t.Fatalf("open: %v", err)
	}
	d.Close()

	// Without locators the parent's Unicode name is used.
	m := &img{b: append([]byte(nil), raw...)}
	clear(m.hdr()[576 : 576+48])
	m.fixHeader()
	st.WriteFile("/vms/y.vhd", m.b)
	d, err = vdisk.Open(ctx, "/vms/y.vhd", &vdisk.OpenOptions{Storage: st})
	if err != nil || d.Layers()[1].Name != "/vms/base.vhd" {
		t.Fatalf("open by unicode name: %v", err)
	}
	d.Close()

	// A fixed diff and a raw parent are refused.
	if _, err := vdisk.Create(ctx, "/vms/f.vhd", &vdisk.CreateOptions{Format: "vpc", Storage: st, Backing: "base.vhd",
		BackingFormat: "vpc", Options: disktest.KVs("subformat=fixed")}); !errors.Is(err, driver.ErrInvalidOption) {
		t.Fatalf("fixed diff: %v", err)
	}
	create(t, st, "/vms/r.raw", 0, "").Close()
}

func utf16be(b []byte) string {
	var u []uint16
	for i := 0; i+1 < len(b); i += 2 {
		c := binary.BigEndian.Uint16(b[i:])
		if c == 0 {
			break
		}
		u = append(u, c)
	}
	return string(utf16.Decode(u))
}

func utf16le(b []byte) string {
	var u []uint16
	for i := 0; i+1 < len(b); i += 2 {
		u = append(u, binary.LittleEndian.Uint16(b[i:]))
	}
	return string(utf16.Decode(u))
}

func encodeLE(s string) []byte {
	var out []byte
	for _, c := range utf16.Encode([]rune(s)) {
		out = binary.LittleEndian.AppendUint16(out, c)
	}
	return out
}

// TestInfoAndOptions: Info of fixed and dynamic images, the open option
// force_size_calc, and option errors.
func TestInfoAndOptions(t *testing.T) {
	st := memfs.New()
	d := create(t, st, "/a.vhd", 10<<20, "")
	s := spec(d)
	if s.Type != "dynamic" || s.SizeSource != "chs" || s.Geometry.Heads == 0 || s.BlockSize != 2<<20 || s.UUID == "" {
		t.Fatalf("%+v", s)
	}
	if d.Size() != int64(s.CurrentSize) || d.Size() != 10514432 {
		t.Fatalf("size %d, current %d", d.Size(), s.CurrentSize)
	}
	if inf := d.Top().Info(); inf.ClusterSize != 2<<20 || inf.Format != "vpc" {
		t.Fatalf("%+v", inf)
	}
	d.Close()
	d = create(t, st, "/b.vhd", 10<<20, "", "subformat=fixed", "force_size=on")
	s = spec(d)
	if s.Type != "fixed" || s.SizeSource != "current-size" || s.Geometry != (driver.CHS{Cylinders: 65535, Heads: 16, Sectors: 255}) {
		t.Fatalf("%+v", s)
	}
	if inf := d.Top().Info(); inf.ClusterSize != 0 {
		t.Fatalf("%+v", inf)
	}
	d.Close()
	// force_size_calc=chs reads a force_size image by its marker geometry
	// (as qemu does, the marker still means current size).
	d, err := vdisk.Open(ctx, "/b.vhd", &vdisk.OpenOptions{Format: "vpc", Storage: st, Options: disktest.KVs("force_size_calc=chs")})
	if err != nil || d.Size() != 10<<20 {
		t.Fatalf("force_size_calc=chs: %v", err)
	}
	d.Close()
	for _, bad := range [][]string{{"subformat=sparse"}, {"block_size=3K"}, {"block_size=1G"}, {"preallocation=full"}} {
		if _, err := vdisk.Create(ctx, "/c.vhd", &vdisk.CreateOptions{Format: "vpc", Size: 1 << 20, Storage: st, Options: disktest.KVs(bad...)}); !errors.Is(err, driver.ErrInvalidOption) {
			t.Errorf("%v: %v", bad, err)
		}
	}
	if _, err := vdisk.Create(ctx, "/c.vhd", &vdisk.CreateOptions{Format: "vpc", Size: 3 << 40, Storage: st}); !errors.Is(err, driver.ErrInvalidOption) {
		t.Errorf("3 TiB: %v", err)
	}
	// The Azure rule: a fixed image that is not a whole number of MiB gets
	// a warning saying how to make one that is.
	for _, c := range []struct {
		size int64
		opts []string
		warn bool
	}{
		{10 << 20, []string{"subformat=fixed"}, true},
		{10<<20 + 512, []string{"subformat=fixed", "force_size=on"}, true},
		{10 << 20, []string{"subformat=fixed", "force_size=on"}, false},
		{10<<20 + 512, nil, false},
	} {
		var logb bytes.Buffer
		d, err := vdisk.Create(ctx, "/az.vhd", &vdisk.CreateOptions{Format: "vpc", Size: c.size, Storage: st, Overwrite: true,
			Options: disktest.KVs(c.opts...), Logger: slog.New(slog.NewTextHandler(&logb, nil))})
		if err != nil {
			t.Fatal(err)
		}
		d.Close()
		got := strings.Contains(logb.String(), "Azure") && strings.Contains(logb.String(), "force_size=on")
		if got != c.warn {
			t.Errorf("%d %v: warning %v: %s", c.size, c.opts, got, logb.String())
		}
	}
	d = create(t, st, "/p.vhd", 3<<20, "", "subformat=fixed", "preallocation=full", "force_size=on")
	if a, _ := st.Stat("/p.vhd"); a.Allocated < 3<<20 {
		t.Errorf("preallocation=full allocated %d", a.Allocated)
	}
	d.Close()
}

// TestFixedStatusCache: a fixed image's data area is a raw file, and its
// status is cached as a raw image's is (one lseek per run boundary on a
// walk, none on the reads after it, its own changes seen at once).
func TestFixedStatusCache(t *testing.T) {
	disktest.StatusCache(t, "vpc", "subformat=fixed", "force_size=on")
}
