package vmdk

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// fillGrain is the grain of the images these tests make (qemu's).
const fillGrain = 64 << 10

// newDriverImage creates /t.vmdk of size bytes with the driver itself (no
// container), recording a parent when withParent, with grain 2 holding
// data and grain 5 written, then zeroed with unmap: a zeroed grain where
// zeroed grains are enabled, else unallocated in a base and zeros
// allocated in a delta disk. It
// returns the open image and its storage.
func newDriverImage(t *testing.T, size int64, withParent, zeroed bool) (*image, *memfs.FS) {
	t.Helper()
	st := memfs.New()
	p := &driver.CreateParams{Storage: st, Name: "/t.vmdk", Size: size,
		Options: driver.Values{"zeroed_grain": zeroed}}
	if withParent {
		p.ParentRef = &driver.ParentRef{Name: "base.vmdk", Format: "vmdk"}
		p.ParentInfo = &driver.ParentInfo{Format: "vmdk", Size: size, UUID: "1234abcd"}
	}
	img, err := Format.Create(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	im := img.(*image)
	t.Cleanup(func() { im.Close() })
	if got := im.Parent() != nil; got != withParent {
		t.Fatalf("image records a parent: %v, want %v", got, withParent)
	}
	if _, err := im.WriteAt(disktest.Fill(fillGrain, 0x22), 2*fillGrain); err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(disktest.Fill(fillGrain, 0x55), 5*fillGrain); err != nil {
		t.Fatal(err)
	}
	if err := im.WriteZeroes(5*fillGrain, fillGrain, true); err != nil {
		t.Fatal(err)
	}
	g5 := driver.Zero
	if !zeroed {
		g5 = driver.Unallocated
		if withParent {
			g5 = driver.Data
		}
	}
	for g, want := range map[int64]driver.State{0: driver.Unallocated, 2: driver.Data, 5: g5} {
		if x, err := im.Status(g*fillGrain, fillGrain); err != nil || x.State != want || x.Length != fillGrain {
			t.Fatalf("grain %d: %+v %v, want %v", g, x, err, want)
		}
	}
	return im, st
}

// fillCase is one partial write and the range the driver must ask to have
// filled ([0, 0) for none).
type fillCase struct {
	name           string
	off, n         int64
	fillOff, fillE int64
}

const G = fillGrain

// size of the images of the fill tests: ten grains and a short 11th one.
const fillSize = 10*G + 4096

var fillCases = []fillCase{
	{"partial head", G + 100, G - 100, G, 2 * G},
	{"partial tail", 3 * G, G + 100, 3 * G, 5 * G},
	{"partial head and tail", 3*G + 100, G + 200, 3 * G, 5 * G},
	{"inside one grain", G + 100, 200, G, 2 * G},
	{"head in data, tail unallocated", 2*G + 100, G, 2*G + 100, 4 * G},
	{"head unallocated, tail in data", G + 512, G + 512, G, 2*G + 1024},
	{"head and tail unallocated around data", G + 512, 2*G + 1024, G, 4 * G},
	{"short last grain, partial", 10*G + 512, 512, 10 * G, fillSize},
	{"short last grain, whole", 10 * G, 4096, 0, 0},
	{"whole grains", 3 * G, 2 * G, 0, 0},
	{"whole grains across data", G, 3 * G, 0, 0},
	{"partial data grain", 2*G + 100, 50, 0, 0},
	{"partial zeroed grain", 5*G + 10, 100, 0, 0},
	{"zeroed grain head, unallocated tail", 5*G + 10, G, 5*G + 10, 7 * G},
	{"unallocated head, zeroed grain tail", 4*G + 10, G, 4 * G, 5*G + 10},
}

// TestWriteNeedsFill: a write into part of an unallocated grain of a
// delta disk writes nothing and asks for the whole grains (FillError);
// the write re-issued over those grains succeeds. Data grains, zeroed
// grains (the image's own zeros), whole grains and images without a
// parent never ask.
func TestWriteNeedsFill(t *testing.T) {
	for _, withParent := range []bool{true, false} {
		for _, zeroed := range []bool{true, false} {
			for _, c := range fillCases {
				t.Run(fmt.Sprintf("parent=%v/zeroed=%v/%s", withParent, zeroed, c.name), func(t *testing.T) {
					testWriteFill(t, c, withParent, zeroed)
				})
			}
		}
	}
}

func testWriteFill(t *testing.T, c fillCase, withParent, zeroed bool) {
	im, st := newDriverImage(t, fillSize, withParent, zeroed)
	want := make([]byte, fillSize)
	copy(want[2*G:], disktest.Fill(G, 0x22))
	if !withParent {
		c.fillOff, c.fillE = 0, 0 // an image without a parent fills zeros itself
	}
	p := disktest.Fill(int(c.n), 0x77)
	before, _ := st.ReadFile("/t.vmdk")
	cid := im.UUID()
	n, err := im.WriteAt(p, c.off)
	fe, fill := driver.AsFill(err)
	if c.fillE == 0 {
		if err != nil || n != len(p) {
			t.Fatalf("write: %d %v", n, err)
		}
		copy(want[c.off:], p)
	} else {
		if !fill || n != 0 {
			t.Fatalf("write: %d %v, want a fill of [%d, %d)", n, err, c.fillOff, c.fillE)
		}
		if fe.Off != c.fillOff || fe.Off+fe.Len != c.fillE || fe.File != "/t.vmdk" {
			t.Fatalf("fill %+v, want [%d, %d)", fe, c.fillOff, c.fillE)
		}
		// Nothing was written, not even a new CID.
		after, _ := st.ReadFile("/t.vmdk")
		if !bytes.Equal(before, after) || im.UUID() != cid {
			t.Fatal("a write that asked for a fill changed the file")
		}
		// The container fills around p from the chain (here a
		// parent of 0x5a bytes) and writes the whole grains.
		buf := bytes.Repeat([]byte{0x5a}, int(c.fillE-c.fillOff))
		for off := c.fillOff; off < c.fillE; {
			x, err := im.Status(off, c.fillE-off)
			if err != nil {
				t.Fatal(err)
			}
			if x.State != driver.Unallocated {
				copy(buf[off-c.fillOff:], want[off:off+x.Length]) // the layer's own data
			}
			off += x.Length
		}
		copy(buf[c.off-c.fillOff:], p)
		if n, err := im.WriteAt(buf, c.fillOff); err != nil || n != len(buf) {
			t.Fatalf("filled write: %d %v", n, err)
		}
		copy(want[c.fillOff:], buf)
	}
	checkContent(t, im, want, withParent)
}

// checkContent compares what the image holds with want: Data and Zero
// runs must match; unallocated runs were never written (zero in want) and
// read as zeros from the driver, which never reads a parent.
func checkContent(t *testing.T, im *image, want []byte, withParent bool) {
	t.Helper()
	got := make([]byte, len(want))
	if _, err := im.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	for off := int64(0); off < int64(len(want)); {
		x, err := im.Status(off, int64(len(want))-off)
		if err != nil {
			t.Fatal(err)
		}
		seg, w := got[off:off+x.Length], want[off:off+x.Length]
		switch x.State {
		case driver.Unallocated:
			if !driver.IsZero(seg) {
				t.Fatalf("unallocated run at %d does not read as zeros", off)
			}
			if !driver.IsZero(w) {
				t.Fatalf("run at %d is unallocated but was written (parent %v)", off, withParent)
			}
		default:
			if !bytes.Equal(seg, w) {
				t.Fatalf("%v run [%d, %d) differs", x.State, off, off+x.Length)
			}
		}
		off += x.Length
	}
}

// TestWriteZeroesNeedsFill: WriteZeroes asks for a fill (changing
// nothing) only where part of an unallocated grain of a delta disk would
// need the parent's content; whole grains become zeroed grains, and
// without a parent unallocated grains already read as zeros.
func TestWriteZeroesNeedsFill(t *testing.T) {
	for _, withParent := range []bool{true, false} {
		for _, zeroed := range []bool{true, false} {
			for _, c := range fillCases {
				for _, unmap := range []bool{false, true} {
					t.Run(fmt.Sprintf("parent=%v/zeroed=%v/%s/unmap=%v", withParent, zeroed, c.name, unmap), func(t *testing.T) {
						testZeroFill(t, c, withParent, zeroed, unmap)
					})
				}
			}
		}
	}
}

func testZeroFill(t *testing.T, c fillCase, withParent, zeroed, unmap bool) {
	im, st := newDriverImage(t, fillSize, withParent, zeroed)
	want := make([]byte, fillSize)
	copy(want[2*G:], disktest.Fill(G, 0x22))
	if !withParent {
		c.fillOff, c.fillE = 0, 0
	}
	before, _ := st.ReadFile("/t.vmdk")
	err := im.WriteZeroes(c.off, c.n, unmap)
	fe, fill := driver.AsFill(err)
	if c.fillE == 0 {
		if err != nil {
			t.Fatalf("write zeroes: %v", err)
		}
		clear(want[c.off : c.off+c.n])
	} else {
		if !fill {
			t.Fatalf("write zeroes: %v, want a fill of [%d, %d)", err, c.fillOff, c.fillE)
		}
		if fe.Off != c.fillOff || fe.Off+fe.Len != c.fillE {
			t.Fatalf("fill %+v, want [%d, %d)", fe, c.fillOff, c.fillE)
		}
		if after, _ := st.ReadFile("/t.vmdk"); !bytes.Equal(before, after) {
			t.Fatal("a zeroing that asked for a fill changed the file")
		}
		return
	}
	checkContent(t, im, want, withParent)
	// Whole unallocated grains of a delta disk read zeros
	// now, whatever the parent holds.
	if withParent {
		for g := (c.off + G - 1) / G; (g+1)*G <= c.off+c.n; g++ {
			if x, _ := im.Status(g*G, G); x.State == driver.Unallocated {
				t.Fatalf("grain %d of a delta disk is unallocated after zeroing", g)
			}
		}
	}
}

// TestDiscard: every whole grain inside the range becomes unallocated
// (data and zeroed grains alike), parts of grains stay, and the tables
// reach the file (reopen). The image passes our check and qemu-img check
// (which counts no leaked grains for VMDK) and reads as qemu reads it.
func TestDiscard(t *testing.T) {
	for _, withParent := range []bool{true, false} {
		t.Run(fmt.Sprint("parent=", withParent), func(t *testing.T) {
			im, st := newDriverImage(t, fillSize, withParent, true)
			// Grains 1..4 and the short last one hold data, 5 is zeroed.
			for _, g := range []int64{1, 3, 4} {
				if _, err := im.WriteAt(disktest.Fill(G, byte(0x30+g)), g*G); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := im.WriteAt(disktest.Fill(4096, 0x3a), 10*G); err != nil {
				t.Fatal(err)
			}
			// [G+100, 5G+G) covers grains 2..5 whole, grain 1 partly.
			if err := im.Discard(G+100, 5*G-100); err != nil {
				t.Fatal(err)
			}
			// The short last grain counts as whole.
			if err := im.Discard(10*G, 4096); err != nil {
				t.Fatal(err)
			}
			// A range inside one grain discards nothing.
			if err := im.Discard(3*G+10, 100); err != nil {
				t.Fatal(err)
			}
			want := map[int64]driver.State{0: driver.Unallocated, 1: driver.Data, 2: driver.Unallocated, 3: driver.Unallocated,
				4: driver.Unallocated, 5: driver.Unallocated, 6: driver.Unallocated, 10: driver.Unallocated}
			check := func(im *image) {
				t.Helper()
				for g, st := range want {
					if x, err := im.Status(g*G, min(G, fillSize-g*G)); err != nil || x.State != st {
						t.Fatalf("grain %d: %+v %v, want %v", g, x, err, st)
					}
				}
				b := make([]byte, G)
				if _, err := im.ReadAt(b, G); err != nil || !bytes.Equal(b, disktest.Fill(G, 0x31)) {
					t.Fatalf("grain 1 changed: %v", err)
				}
			}
			check(im)
			res, err := im.Check(ctx, driver.RepairNone)
			if err != nil || res.Corruptions != 0 || res.AllocatedClusters != 1 {
				t.Fatalf("check: %+v %v", res, err)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			img, err := Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/t.vmdk"})
			if err != nil {
				t.Fatal(err)
			}
			im = img.(*image)
			defer im.Close()
			check(im)
			// A discarded grain is written again from scratch.
			if !withParent {
				if _, err := im.WriteAt(disktest.Fill(100, 0x44), 3*G+7); err != nil {
					t.Fatal(err)
				}
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			if withParent {
				return
			}
			qemutest.Require(t)
			dir := t.TempDir()
			saveAll(t, st, dir)
			f := filepath.Join(dir, "t.vmdk")
			qemutest.Check(t, "vmdk", f)
			ref := make([]byte, fillSize)
			copy(ref[G:], disktest.Fill(G, 0x31))
			copy(ref[3*G+7:], disktest.Fill(100, 0x44))
			raw := filepath.Join(dir, "t.raw")
			if err := os.WriteFile(raw, ref, 0o644); err != nil {
				t.Fatal(err)
			}
			if !qemutest.Compare(t, "vmdk", f, "raw", raw) {
				t.Fatal("qemu reads the discarded image differently")
			}
		})
	}
}

// TestReadUnallocatedZeros: the driver never reads a parent; unallocated
// runs of a delta disk read as zeros when asked.
func TestReadUnallocatedZeros(t *testing.T) {
	im, _ := newDriverImage(t, fillSize, true, false)
	b := bytes.Repeat([]byte{0xee}, 3*G)
	if _, err := im.ReadAt(b, G); err != nil {
		t.Fatal(err)
	}
	if !driver.IsZero(b[:G]) || !bytes.Equal(b[G:2*G], disktest.Fill(G, 0x22)) || !driver.IsZero(b[2*G:]) {
		t.Fatal("content differs")
	}
}
