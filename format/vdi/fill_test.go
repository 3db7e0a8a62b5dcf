package vdi

import (
	"bytes"
	"errors"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// Layout of the images the fill tests make with the driver alone (no
// container, no parent opened): 64 KiB blocks, a short last block.
//
//	block 0: free   block 1: data   block 2: zero   block 3 (8 KiB): free
const (
	fbs       = 64 << 10
	fLast     = 8 << 10
	fillSize  = 3*fbs + fLast
	fillParUU = "01234567-89ab-cdef-0123-456789abcdef"
)

// newFillImage creates the image above through the driver: a differencing
// image (recording a parent that is never opened) or a base image.
func newFillImage(t *testing.T, diff bool) (*image, *memfs.FS) {
	t.Helper()
	st := memfs.New()
	vals, err := driver.ParseOptions("vdi", Format.CreateOptions, []driver.KV{{Key: "block_size", Value: "64K"}})
	if err != nil {
		t.Fatal(err)
	}
	p := &driver.CreateParams{Storage: st, Name: "/f.vdi", Size: fillSize, Options: vals}
	if diff {
		p.ParentRef = &driver.ParentRef{UUID: fillParUU, ModUUID: fillParUU}
	}
	img, err := Format.Create(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	im := img.(*image)
	t.Cleanup(func() { im.Close() })
	if _, err := im.WriteAt(disktest.Fill(fbs, 0x11), fbs); err != nil {
		t.Fatal(err)
	}
	if err := im.WriteZeroes(2*fbs, fbs, true); err != nil {
		t.Fatal(err)
	}
	want := []uint32{entFree, 0, entZero, entFree}
	if !diff {
		// Zeroing a free block of a base image changes nothing.
		want[2] = entFree
	}
	for b, e := range want {
		if got := im.entry(int64(b)); got != e {
			t.Fatalf("setup: block %d has entry %#x, want %#x", b, got, e)
		}
	}
	return im, st
}

// fillCases are writes into the image above: fill is the range a
// differencing image must ask for ([0, 0) for none).
var fillCases = []struct {
	name   string
	off, n int64
	fill   [2]int64 // differencing image
}{
	{"head partial free", 100, 2*fbs - 100, [2]int64{0, 2 * fbs}},
	{"inside a free block", 100, 200, [2]int64{0, fbs}},
	{"tail partial free (short last block)", fbs, 2*fbs + 100, [2]int64{fbs, fillSize}},
	{"tail partial free, head in data", fbs + 100, 2*fbs - 100 + 1, [2]int64{fbs + 100, fillSize}},
	{"both ends partial free", 100, fillSize - 200, [2]int64{0, fillSize}},
	{"head partial free, tail in data", 512, fbs, [2]int64{0, fbs + 512}},
	{"whole free block", 0, fbs, [2]int64{}},
	{"whole short last block", 3 * fbs, fLast, [2]int64{}},
	{"whole blocks across all kinds", 0, fillSize, [2]int64{}},
	{"partial data block", fbs + 4096, 100, [2]int64{}},
	{"partial zero block", 2*fbs + 100, 300, [2]int64{}},
	{"zero block to whole free block", 2*fbs + 100, fbs - 100 + fLast, [2]int64{}},
}

// TestFillError: in a differencing image a write covering part of a free
// block writes nothing and asks for the whole partially covered free blocks
// at its ends (and everything between); the write extended to that range
// succeeds. Zero blocks and data blocks never ask, and neither does a
// base image (its free blocks read zeros).
func TestFillError(t *testing.T) {
	for _, c := range fillCases {
		t.Run("diff/"+c.name, func(t *testing.T) {
			im, st := newFillImage(t, true)
			p := disktest.Fill(int(c.n), 0x5a)
			before, _ := st.ReadFile("/f.vdi")
			mod := im.ModificationUUID()
			entries := append([]uint32(nil), im.bmap...)
			n, err := im.WriteAt(p, c.off)
			if c.fill == [2]int64{} {
				if err != nil || n != len(p) {
					t.Fatalf("write: %d, %v", n, err)
				}
				checkFillContent(t, im, p, c.off, nil, 0, 0)
				return
			}
			fe, ok := driver.AsFill(err)
			if !ok || n != 0 {
				t.Fatalf("write: %d, %v; want a FillError", n, err)
			}
			if fe.Off != c.fill[0] || fe.Off+fe.Len != c.fill[1] || fe.File != "/f.vdi" {
				t.Fatalf("fill [%d, %d) of %s, want [%d, %d)", fe.Off, fe.Off+fe.Len, fe.File, c.fill[0], c.fill[1])
			}
			after, _ := st.ReadFile("/f.vdi")
			if !bytes.Equal(before, after) || im.ModificationUUID() != mod {
				t.Fatal("a write answered with a FillError changed the file or the modification UUID")
			}
			for b, e := range entries {
				if im.entry(int64(b)) != e {
					t.Fatalf("a write answered with a FillError changed block %d", b)
				}
			}
			// The container's second call: the range as the chain shows
			// it (the image's own blocks, a made-up parent's content in its
			// free blocks), p inside.
			view := ownContent()
			par := disktest.Fill(fillSize, 0xc3)
			copy(view[:fbs], par)
			copy(view[3*fbs:], par[3*fbs:])
			buf := bytes.Clone(view[fe.Off : fe.Off+fe.Len])
			copy(buf[c.off-fe.Off:], p)
			if n, err := im.WriteAt(buf, fe.Off); err != nil || n != len(buf) {
				t.Fatalf("filled write: %d, %v", n, err)
			}
			checkFillContent(t, im, p, c.off, view, fe.Off, fe.Off+fe.Len)
		})
		t.Run("base/"+c.name, func(t *testing.T) {
			im, _ := newFillImage(t, false)
			p := disktest.Fill(int(c.n), 0x5a)
			if n, err := im.WriteAt(p, c.off); err != nil || n != len(p) {
				t.Fatalf("write: %d, %v", n, err)
			}
			checkFillContent(t, im, p, c.off, nil, 0, 0)
		})
	}
}

// ownContent is what the image made by newFillImage holds itself: the
// data block, zeros elsewhere.
func ownContent() []byte {
	b := make([]byte, fillSize)
	copy(b[fbs:], disktest.Fill(fbs, 0x11))
	return b
}

// checkFillContent checks the whole image reads its own content with p at
// off, where the free blocks (0 and 3) inside [fillOff, fillEnd) now hold
// view's content (the chain's, written by a filled write). Free runs read
// zeros here: the driver alone shows no parent.
func checkFillContent(t *testing.T, im *image, p []byte, off int64, view []byte, fillOff, fillEnd int64) {
	t.Helper()
	disktest.CheckImage(t, im, disktest.FillWant(ownContent(), fbs, []int64{0, 3}, p, off, view, fillOff, fillEnd), fbs)
}

// TestFillWriteZeroes: WriteZeroes follows the same rule as WriteAt: a
// partial free block of a differencing image needs a fill (nothing is
// written), whole free blocks become zero blocks; a base image and zero
// blocks never ask.
func TestFillWriteZeroes(t *testing.T) {
	for _, c := range []struct {
		name   string
		off, n int64
		unmap  bool
		fill   [2]int64
		zero   []int64 // diff: blocks that are zero blocks afterwards
	}{
		{"head partial free", 100, 2*fbs - 100, true, [2]int64{0, 2 * fbs}, nil},
		{"tail partial free", fbs, 2*fbs + 512, false, [2]int64{fbs, fillSize}, nil},
		{"both ends partial free", 512, fillSize - 1024, true, [2]int64{0, fillSize}, nil},
		{"inside a free block", 512, 512, false, [2]int64{0, fbs}, nil},
		{"whole blocks, unmap", 0, fillSize, true, [2]int64{}, []int64{0, 1, 2, 3}},
		{"whole blocks", 0, fillSize, false, [2]int64{}, []int64{0, 2, 3}},
		{"partial data and zero blocks", fbs + 512, fbs, true, [2]int64{}, []int64{2}},
	} {
		t.Run("diff/"+c.name, func(t *testing.T) {
			im, st := newFillImage(t, true)
			before, _ := st.ReadFile("/f.vdi")
			err := im.WriteZeroes(c.off, c.n, c.unmap)
			if c.fill == [2]int64{} {
				if err != nil {
					t.Fatal(err)
				}
				for _, b := range c.zero {
					if e := im.entry(b); e != entZero {
						t.Fatalf("block %d has entry %#x, want a zero block", b, e)
					}
				}
				want := disktest.Fill(fbs, 0x11)
				clear(want[max(0, c.off-fbs):min(fbs, c.off+c.n-fbs)])
				got := make([]byte, fbs)
				if e := im.entry(1); allocated(e) {
					if _, err := im.ReadAt(got, fbs); err != nil {
						t.Fatal(err)
					}
				}
				if !bytes.Equal(got, want) {
					t.Fatal("the data block reads wrong after WriteZeroes")
				}
				return
			}
			fe, ok := driver.AsFill(err)
			if !ok || fe.Off != c.fill[0] || fe.Off+fe.Len != c.fill[1] {
				t.Fatalf("WriteZeroes: %v, want a fill of [%d, %d)", err, c.fill[0], c.fill[1])
			}
			if after, _ := st.ReadFile("/f.vdi"); !bytes.Equal(before, after) {
				t.Fatal("a WriteZeroes answered with a FillError changed the file")
			}
		})
		t.Run("base/"+c.name, func(t *testing.T) {
			im, _ := newFillImage(t, false)
			if err := im.WriteZeroes(c.off, c.n, c.unmap); err != nil {
				t.Fatal(err)
			}
			for b := int64(0); b < 4; b++ {
				if e := im.entry(b); b != 1 && allocated(e) {
					t.Fatalf("zeroing allocated block %d of a base image", b)
				}
			}
		})
	}
}

// TestDiscardFrees: Discard makes every whole block of the range free, in
// a base image too, zero blocks included; partial blocks stay as they are;
// a fixed image refuses.
func TestDiscardFrees(t *testing.T) {
	for _, diff := range []bool{false, true} {
		im, _ := newFillImage(t, diff)
		if _, err := im.WriteAt(disktest.Fill(fbs, 0x22), 0); err != nil {
			t.Fatal(err)
		}
		// Block 2 becomes a zero block (in the base too).
		if _, err := im.WriteAt(disktest.Fill(fbs, 0x33), 2*fbs); err != nil {
			t.Fatal(err)
		}
		if err := im.WriteZeroes(2*fbs, fbs, true); err != nil {
			t.Fatal(err)
		}
		if e := im.entry(2); e != entZero {
			t.Fatalf("diff=%v: block 2 has entry %#x, want a zero block", diff, e)
		}
		if err := im.Discard(100, fillSize-100); err != nil {
			t.Fatal(err)
		}
		want := []uint32{0, entFree, entFree, entFree}
		for b, e := range want {
			if got := im.entry(int64(b)); (e == entFree) != (got == entFree) {
				t.Fatalf("diff=%v: block %d has entry %#x after discard", diff, b, got)
			}
		}
		got := make([]byte, fbs)
		if _, err := im.ReadAt(got, 0); err != nil || !bytes.Equal(got, disktest.Fill(fbs, 0x22)) {
			t.Fatalf("diff=%v: the partly discarded block changed (%v)", diff, err)
		}
		if im.count != 1 {
			t.Fatalf("diff=%v: %d blocks allocated after discard, want 1", diff, im.count)
		}
	}
	st := memfs.New()
	vals, _ := driver.ParseOptions("vdi", Format.CreateOptions, []driver.KV{{Key: "static", Value: "on"}})
	img, err := Format.Create(ctx, &driver.CreateParams{Storage: st, Name: "/s.vdi", Size: 1 << 20, Options: vals})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if err := img.(driver.Discarder).Discard(0, 1<<20); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("discard on a fixed image: %v", err)
	}
}
