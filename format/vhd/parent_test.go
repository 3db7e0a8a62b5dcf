package vhd_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/faultfs"
	"github.com/vdisk/vdisk/storage/memfs"
)

const parentSize = 4 << 20

// heldRanges are the byte ranges the child of makeParentSet holds (its
// writes rounded out to sectors): a partial block, a whole block and a
// single sector.
var heldRanges = [][2]int64{{4608, 105472}, {128 << 10, 192 << 10}, {1<<20 + 512, 1<<20 + 1024}}

// makeParentSet creates, in st under dir, base1.vhd and base2.vhd (each
// filled with its own pattern) and child.vhd, a differencing image of
// base1 holding heldRanges. It returns base2's UUID.
func makeParentSet(t *testing.T, st driver.Storage, dir string) string {
	t.Helper()
	for i, n := range []string{"base1.vhd", "base2.vhd"} {
		b := create(t, st, filepath.Join(dir, n), parentSize, "", "force_size=on", "block_size=64K")
		disktest.MustWrite(t, b, nil, patterned(parentSize, byte(0x10*(i+1))), 0)
		disktest.MustClose(t, b)
	}
	b := openDisk(t, st, filepath.Join(dir, "base2.vhd"), true)
	u2 := ident(t, b).UUID()
	b.Close()
	c := create(t, st, filepath.Join(dir, "child.vhd"), 0, "base1.vhd", "block_size=64K")
	disktest.MustWrite(t, c, nil, disktest.Fill(100000, 0xC1), 5000)
	disktest.MustWrite(t, c, nil, disktest.Fill(64<<10, 0xC2), 128<<10)
	disktest.MustWrite(t, c, nil, disktest.Fill(512, 0xC3), 1<<20+512)
	disktest.MustClose(t, c)
	return u2
}

// patterned is n bytes that differ from sector to sector.
func patterned(n int, seed byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = seed ^ byte(i/512) ^ byte(i>>16)
	}
	return p
}

// overlay is base with the held ranges taken from top.
func overlay(base, top []byte) []byte {
	out := bytes.Clone(base)
	for _, r := range heldRanges {
		copy(out[r[0]:r[1]], top[r[0]:r[1]])
	}
	return out
}

func readChain(t *testing.T, st driver.Storage, name string, noBacking bool) ([]byte, int) {
	t.Helper()
	d, err := vdisk.Open(ctx, name, &vdisk.OpenOptions{Storage: st, ReadOnly: true, NoBacking: noBacking, AllowUnsafeBacking: true})
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	defer d.Close()
	return disktest.ReadAll(t, d), len(d.Layers())
}

// vdiskCheck runs vdisk's check on the image alone and fails on any
// problem.
func vdiskCheck(t *testing.T, st driver.Storage, name string) {
	t.Helper()
	d, err := vdisk.Open(ctx, name, &vdisk.OpenOptions{Storage: st, NoBacking: true, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	res, err := d.Check(ctx, driver.RepairNone)
	if err != nil || res.Corruptions != 0 || res.Leaks != 0 || res.CheckErrors != 0 {
		t.Fatalf("vdisk check %s: %+v %v", name, res, err)
	}
}

// locators decodes the parent name and the W2ku/W2ru locators of a raw
// image.
func locators(t *testing.T, raw []byte) (string, map[string]string, map[string]uint32) {
	t.Helper()
	h := raw[512:1536]
	locs, spaces := map[string]string{}, map[string]uint32{}
	for i := 0; i < 8; i++ {
		e := h[576+24*i:]
		code := string(e[:4])
		if code == "\x00\x00\x00\x00" {
			if !driver.IsZero(e[:24]) {
				t.Errorf("locator %d is not cleared: %x", i, e[:24])
			}
			continue
		}
		off, n := binary.BigEndian.Uint64(e[16:]), binary.BigEndian.Uint32(e[8:])
		spaces[code] = binary.BigEndian.Uint32(e[4:])
		if int(off)+int(n) > len(raw) {
			t.Fatalf("locator %s past the end of the file", code)
		}
		locs[code] = utf16le(raw[off : off+uint64(n)])
	}
	return utf16be(h[64:576]), locs, spaces
}

func reparenter(t *testing.T, d *vdisk.Disk) driver.Reparenter {
	t.Helper()
	rp, ok := vdisk.As[driver.Reparenter](d.Top())
	if !ok {
		t.Fatal("the VHD image is not a driver.Reparenter")
	}
	return rp
}

// TestSetParent: rebasing a differencing image onto another parent (by a
// relative, an absolute or a very long name, with and without UUID) and
// making it standalone keep what the image holds, record the reference
// as VHD readers expect it, and leave a file qemu-img and vdisk's check
// accept.
func TestSetParent(t *testing.T) {
	qemutest.Require(t)
	long := strings.Repeat("d", 120)
	longRel := filepath.Join(long+"1", long+"2", long+"3", long+"4", strings.Repeat("p", 200)+".vhd")
	cases := []struct {
		name string
		// parent is the new parent's file relative to the directory
		// ("" makes the image standalone); the file is a copy of base2.
		parent  string
		absRef  bool // the reference names it by its absolute path
		noUUID  bool
		wantRel string // the W2ru locator
	}{
		{name: "other-parent", parent: "base2.vhd", wantRel: `.\base2.vhd`},
		{name: "absolute-name", parent: "sub/b2.vhd", absRef: true, wantRel: `.\sub\b2.vhd`},
		{name: "no-uuid", parent: "base2.vhd", noUUID: true, wantRel: `.\base2.vhd`},
		{name: "long-path", parent: longRel, wantRel: `.\` + strings.ReplaceAll(longRel, "/", `\`)},
		{name: "standalone"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			u2 := makeParentSet(t, nil, dir)
			child := filepath.Join(dir, "child.vhd")
			oldChain, _ := readChain(t, nil, child, false)
			held, _ := readChain(t, nil, child, true)
			base2, _ := readChain(t, nil, filepath.Join(dir, "base2.vhd"), true)
			var ref *driver.ParentRef
			var want []byte
			var wantLayers int
			if c.parent != "" {
				p := filepath.Join(dir, c.parent)
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					t.Fatal(err)
				}
				if p != filepath.Join(dir, "base2.vhd") {
					b, _ := os.ReadFile(filepath.Join(dir, "base2.vhd"))
					if err := os.WriteFile(p, b, 0o644); err != nil {
						t.Fatal(err)
					}
				}
				ref = &driver.ParentRef{Name: c.parent, Format: "vpc", UUID: u2}
				if c.absRef {
					ref.Name = p
				}
				if c.noUUID {
					ref.UUID = ""
				}
				want, wantLayers = overlay(base2, oldChain), 2
			} else {
				want, wantLayers = overlay(make([]byte, parentSize), oldChain), 1
			}

			d := openDisk(t, nil, child, false)
			if err := d.SetParent(ref); err != nil {
				t.Fatalf("set parent: %v", err)
			}
			// The open image reports the new reference at once.
			if got := d.Top().ParentRef(); (got == nil) != (ref == nil) {
				t.Fatalf("Parent() %+v after SetParent(%+v)", got, ref)
			}
			disktest.MustClose(t, d)

			raw, err := os.ReadFile(child)
			if err != nil {
				t.Fatal(err)
			}
			name, locs, spaces := locators(t, raw)
			r := openDisk(t, nil, child, true)
			got := r.Top().ParentRef()
			s := spec(r)
			r.Close()
			if c.parent == "" {
				if got != nil || s.Type != "dynamic" || name != "" || len(locs) != 0 || !driver.IsZero(raw[512+40:512+60]) {
					t.Fatalf("standalone: parent %+v, type %s, name %q, locators %q", got, s.Type, name, locs)
				}
			} else {
				wantUUID := u2
				if c.noUUID {
					wantUUID = ""
				}
				if got == nil || got.Name != filepath.ToSlash(c.parent) || got.UUID != wantUUID || s.Type != "differencing" {
					t.Fatalf("parent %+v (type %s), want %s %s", got, s.Type, c.parent, wantUUID)
				}
				if name != filepath.Base(c.parent) || locs["W2ku"] != filepath.Join(dir, c.parent) || locs["W2ru"] != c.wantRel {
					t.Fatalf("name %q, locators %q", name, locs)
				}
				for code, sp := range spaces {
					if sp < 1024 || sp%512 != 0 || int(sp) < 2*len([]rune(locs[code])) {
						t.Errorf("locator %s has space %d for %q", code, sp, locs[code])
					}
				}
			}
			vdiskCheck(t, nil, child)
			if after, _ := readChain(t, nil, child, true); !bytes.Equal(after, held) {
				t.Fatalf("what the image holds changed (%s)", firstDiff(after, held))
			}
			gotChain, n := readChain(t, nil, child, false)
			if n != wantLayers {
				t.Fatalf("chain of %d layers, want %d", n, wantLayers)
			}
			mustEqual(t, "chain", gotChain, want)
			// qemu reads the file (a differencing image as a dynamic one,
			// ignoring bitmaps): what the image holds, zeros elsewhere.
			if qs := qemuSize(t, child); qs != parentSize {
				t.Fatalf("qemu-img info: size %d", qs)
			}
			mustEqual(t, "qemu-img convert", qemutest.Raw(t, "vpc", child), held)
		})
	}
}

// TestSetParentReusesSpace: rebasing back and forth does not make the file
// grow each time (the old locators' space is taken again), and the data
// written in between stays.
func TestSetParentReusesSpace(t *testing.T) {
	st := memfs.New()
	u2 := makeParentSet(t, st, "/vm")
	b1 := openDisk(t, st, "/vm/base1.vhd", true)
	u1 := ident(t, b1).UUID()
	b1.Close()
	refs := []*driver.ParentRef{{Name: "base2.vhd", UUID: u2}, {Name: "base1.vhd", UUID: u1}}
	var sizes []int64
	for i := 0; i < 6; i++ {
		d := openDisk(t, st, "/vm/child.vhd", false)
		if err := d.SetParent(refs[i%2]); err != nil {
			t.Fatal(err)
		}
		// A new block after the locators.
		disktest.MustWrite(t, d, nil, disktest.Fill(64<<10, byte(i+1)), int64(i+20)<<16)
		disktest.MustClose(t, d)
		sizes = append(sizes, disktest.FileSize(t, st, "/vm/child.vhd"))
		vdiskCheck(t, st, "/vm/child.vhd")
		r := openDisk(t, st, "/vm/child.vhd", true)
		if ref := r.Top().ParentRef(); ref.Name != refs[i%2].Name || ref.UUID != refs[i%2].UUID {
			t.Fatalf("round %d: parent %+v", i, ref)
		}
		got := disktest.ReadAll(t, r)
		r.Close()
		for j := 0; j <= i; j++ {
			if !bytes.Equal(got[(j+20)<<16:(j+21)<<16], disktest.Fill(64<<10, byte(j+1))) {
				t.Fatalf("round %d: block written in round %d lost", i, j)
			}
		}
	}
	// Each round adds one 64 KiB block (and its bitmap, right before its
	// 4 KiB aligned data); the locators are appended once, then alternate
	// between the two places.
	rs := int64(64<<10 + 4096)
	for i := 1; i < len(sizes); i++ {
		if sizes[i]-sizes[i-1] != rs {
			t.Fatalf("file sizes %v: round %d grew by %d, want %d", sizes, i, sizes[i]-sizes[i-1], rs)
		}
	}
}

// TestSetParentDynamic: a dynamic image given a parent becomes a
// differencing image of it; its blocks stay and the rest shows the
// parent.
func TestSetParentDynamic(t *testing.T) {
	st := memfs.New()
	u2 := makeParentSet(t, st, "/vm")
	d := create(t, st, "/vm/solo.vhd", parentSize, "", "force_size=on", "block_size=64K")
	disktest.MustWrite(t, d, nil, disktest.Fill(1000, 0x5A), 70000)
	if err := d.SetParent(&driver.ParentRef{Name: "base2.vhd", UUID: u2}); err != nil {
		t.Fatal(err)
	}
	disktest.MustClose(t, d)
	vdiskCheck(t, st, "/vm/solo.vhd")
	r := openDisk(t, st, "/vm/solo.vhd", true)
	defer r.Close()
	if s := spec(r); s.Type != "differencing" || s.ParentUUID != u2 || len(r.Layers()) != 2 || r.Size() != parentSize {
		t.Fatalf("info %+v, %d layers, size %d", s, len(r.Layers()), r.Size())
	}
	want, _ := readChain(t, st, "/vm/base2.vhd", true)
	clear(want[64<<10 : 128<<10]) // the block the dynamic image holds
	copy(want[70000:], disktest.Fill(1000, 0x5A))
	mustEqual(t, "rebased dynamic image", disktest.ReadAll(t, r), want)
}

// TestSetParentRefused: read-only images, fixed images, names a VHD cannot
// record; a refused change leaves the file as it was.
func TestSetParentRefused(t *testing.T) {
	st := memfs.New()
	u2 := makeParentSet(t, st, "/vm")
	before, _ := st.ReadFile("/vm/child.vhd")
	ro := openDisk(t, st, "/vm/child.vhd", true)
	for _, ref := range []*driver.ParentRef{nil, {Name: "base2.vhd", UUID: u2}} {
		if err := reparenter(t, ro).SetParent(ref); !errors.Is(err, driver.ErrReadOnly) {
			t.Fatalf("read-only SetParent(%v): %v", ref, err)
		}
	}
	em, _ := vdisk.As[driver.Emptier](ro.Top())
	if err := em.MakeEmpty(); !errors.Is(err, driver.ErrReadOnly) {
		t.Fatalf("read-only MakeEmpty: %v", err)
	}
	ro.Close()

	d := openDisk(t, st, "/vm/child.vhd", false)
	for _, c := range []struct {
		ref  *driver.ParentRef
		want error
	}{
		{&driver.ParentRef{Name: strings.Repeat("n", 300) + ".vhd"}, driver.ErrInvalidOption},
		{&driver.ParentRef{Name: "s3://bucket/base.vhd"}, driver.ErrUnsupported},
		{&driver.ParentRef{Name: "base.raw", Format: "raw"}, driver.ErrUnsupported},
		{&driver.ParentRef{}, driver.ErrInvalidOption},
	} {
		if err := reparenter(t, d).SetParent(c.ref); !errors.Is(err, c.want) {
			t.Errorf("SetParent(%+v): %v, want %v", c.ref, err, c.want)
		}
	}
	disktest.MustClose(t, d)
	if after, _ := st.ReadFile("/vm/child.vhd"); !bytes.Equal(after, before) {
		t.Fatal("a refused SetParent changed the file")
	}

	f := create(t, st, "/vm/fixed.vhd", 1<<20, "", "subformat=fixed")
	if err := reparenter(t, f).SetParent(&driver.ParentRef{Name: "base2.vhd"}); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("fixed: %v", err)
	}
	if err := reparenter(t, f).SetParent(nil); err != nil {
		t.Fatalf("fixed, standalone already: %v", err)
	}
	if em, _ := vdisk.As[driver.Emptier](f.Top()); !errors.Is(em.MakeEmpty(), driver.ErrUnsupported) {
		t.Fatal("fixed MakeEmpty did not fail")
	}
	f.Close()
}

// TestMakeEmpty: every block of a differencing image becomes unallocated
// (the parent shows through), the file shrinks to its metadata, and the
// image stays usable; a dynamic image reads zeros.
func TestMakeEmpty(t *testing.T) {
	st := memfs.New()
	makeParentSet(t, st, "/vm")
	// A new differencing image of base1 is all metadata.
	c := create(t, st, "/vm/empty.vhd", 0, "base1.vhd", "block_size=64K")
	meta := disktest.FileSize(t, st, "/vm/empty.vhd")
	c.Close()
	for _, name := range []string{"/vm/child.vhd", "/vm/base2.vhd"} {
		d := openDisk(t, st, name, false)
		em, ok := vdisk.As[driver.Emptier](d.Top())
		if !ok {
			t.Fatal("the VHD image is not a driver.Emptier")
		}
		if err := em.MakeEmpty(); err != nil {
			t.Fatal(err)
		}
		if err := d.Flush(); err != nil {
			t.Fatal(err)
		}
		want := make([]byte, parentSize)
		if name == "/vm/child.vhd" {
			want, _ = readChain(t, st, "/vm/base1.vhd", true)
			if sz := disktest.FileSize(t, st, name); sz != meta {
				t.Errorf("emptied differencing image is %d bytes, want %d", sz, meta)
			}
		}
		mustEqual(t, "emptied "+name, disktest.ReadAll(t, d), want)
		disktest.MustWrite(t, d, nil, disktest.Fill(3000, 0x77), 200000)
		copy(want[200000:], disktest.Fill(3000, 0x77))
		disktest.MustClose(t, d)
		vdiskCheck(t, st, name)
		got, _ := readChain(t, st, name, false)
		mustEqual(t, "written after emptying "+name, got, want)
	}
}

// TestCrashSetParent: a crash at any point of a rebase, of making the
// image standalone or of emptying it leaves an image that opens and reads
// either what it read before or what it reads after, with nothing worse
// than leaked space to repair.
func TestCrashSetParent(t *testing.T) {
	mem := memfs.New()
	u2 := makeParentSet(t, mem, "/vm")
	oldChain, _ := readChain(t, mem, "/vm/child.vhd", false)
	base1, _ := readChain(t, mem, "/vm/base1.vhd", true)
	base2, _ := readChain(t, mem, "/vm/base2.vhd", true)
	c0 := openDisk(t, mem, "/vm/child.vhd", true)
	oldRef := c0.Top().ParentRef()
	c0.Close()
	longRef := &driver.ParentRef{Name: strings.Repeat("x/", 399) + "base2.vhd"}
	for _, c := range []struct {
		name   string
		op     func(d *vdisk.Disk) error
		want   []byte
		newRef *driver.ParentRef
	}{
		{"rebase", func(d *vdisk.Disk) error {
			return d.SetParent(&driver.ParentRef{Name: "base2.vhd", UUID: u2})
		}, overlay(base2, oldChain), &driver.ParentRef{Name: "base2.vhd", UUID: u2}},
		{"rebase-long", func(d *vdisk.Disk) error {
			return d.SetParent(longRef)
		}, nil, longRef}, // the parent is not found afterwards: opened alone
		{"standalone", func(d *vdisk.Disk) error { return d.SetParent(nil) }, overlay(make([]byte, parentSize), oldChain), nil},
		{"make-empty", func(d *vdisk.Disk) error {
			em, _ := vdisk.As[driver.Emptier](d.Top())
			if err := em.MakeEmpty(); err != nil {
				return err
			}
			return d.Flush()
		}, base1, oldRef},
	} {
		t.Run(c.name, func(t *testing.T) {
			run := func(k int) (*faultfs.FS, error) {
				ffs := faultfs.New(mem.Clone())
				d, err := vdisk.Open(ctx, "/vm/child.vhd", &vdisk.OpenOptions{Storage: ffs})
				if err != nil {
					t.Fatal(err)
				}
				if k > 0 {
					ffs.CrashAfterWrites(k)
				} else {
					ffs.Reset()
				}
				err = c.op(d)
				d.Close()
				return ffs, err
			}
			ffs, err := run(0)
			if err != nil {
				t.Fatal(err)
			}
			total := ffs.Writes()
			if total < 2 {
				t.Fatalf("only %d write operations", total)
			}
			for k := 0; k <= total; k++ {
				ffs := ffs
				if k > 0 {
					ffs, _ = run(k)
				}
				what := fmt.Sprintf("crash after write %d of %d", k, total)
				if k == 0 {
					what = "no crash"
				}
				st := ffs.Durable()
				d, err := vdisk.Open(ctx, "/vm/child.vhd", &vdisk.OpenOptions{Storage: st, ReadOnly: true, NoBacking: c.want == nil, AllowUnsafeBacking: true})
				if err != nil {
					t.Fatalf("%s: the image does not open: %v", what, err)
				}
				got := disktest.ReadAll(t, d)
				ref := d.Layers()[0].ParentRef()
				d.Close()
				if !sameRef(ref, oldRef) && !sameRef(ref, c.newRef) {
					t.Fatalf("%s: parent %+v is neither the old %+v nor the new %+v", what, ref, oldRef, c.newRef)
				}
				if c.want == nil {
					// Alone, the image reads what it holds either way.
					held, _ := readChain(t, mem, "/vm/child.vhd", true)
					mustEqual(t, what, got, held)
				} else if !bytes.Equal(got, oldChain) && !bytes.Equal(got, c.want) {
					t.Fatalf("%s: reads neither the old nor the new content (%s / %s)", what, firstDiff(got, oldChain), firstDiff(got, c.want))
				}
				rw, err := vdisk.Open(ctx, "/vm/child.vhd", &vdisk.OpenOptions{Storage: st, NoBacking: true})
				if err != nil {
					t.Fatalf("%s: no read-write open: %v", what, err)
				}
				res, err := rw.Check(ctx, driver.RepairNone)
				if err != nil || res.Corruptions != 0 {
					t.Fatalf("%s: check: %+v %v", what, res, err)
				}
				if res, err = rw.Check(ctx, driver.RepairAll); err != nil || res.Corruptions+res.Leaks != 0 {
					t.Fatalf("%s: repair: %+v %v", what, res, err)
				}
				rw.Close()
			}
		})
	}
}

func sameRef(a, b *driver.ParentRef) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.Name == b.Name && a.UUID == b.UUID
}
