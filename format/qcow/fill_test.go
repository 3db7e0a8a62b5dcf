package qcow

import (
	"bytes"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// Layout of the images the fill tests make with the driver alone (no
// container, no parent opened): 4 KiB clusters, a short last cluster.
//
//	cluster 0: unallocated  1: data  2: compressed  3 (1 KiB): unallocated
const (
	fcs      = 4096
	fLast    = 1024
	fillSize = 3*fcs + fLast
)

// compressible is cluster 2's content.
var compressible = bytes.Repeat([]byte("compressed cluster two. "), fcs/24+1)[:fcs]

// newFillImage creates the image above through the driver: with a
// backing file name (a parent that is never opened) or without.
func newFillImage(t *testing.T, diff bool) (*image, *memfs.FS) {
	t.Helper()
	withGeometry(t, 12, 9)
	st := memfs.New()
	vals, err := driver.ParseOptions("qcow", Format.CreateOptions, nil)
	if err != nil {
		t.Fatal(err)
	}
	p := &driver.CreateParams{Storage: st, Name: "/f.qcow", Size: fillSize, Options: vals}
	if diff {
		p.ParentRef = &driver.ParentRef{Name: "parent.qcow"}
	}
	img, err := Format.Create(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	im := img.(*image)
	t.Cleanup(func() { im.Close() })
	if _, err := im.WriteAt(disktest.Fill(fcs, 0x11), fcs); err != nil {
		t.Fatal(err)
	}
	if err := im.WriteCompressed(compressible, 2*fcs); err != nil {
		t.Fatal(err)
	}
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}
	for c, k := range []kind{kUnalloc, kNormal, kCompressed, kUnalloc} {
		if got := kindOf(entryOf(t, im, int64(c))); got != k {
			t.Fatalf("setup: cluster %d has kind %d, want %d", c, got, k)
		}
	}
	return im, st
}

func entryOf(t *testing.T, im *image, c int64) uint64 {
	t.Helper()
	var e [1]uint64
	if _, err := im.entries(c, e[:]); err != nil {
		t.Fatal(err)
	}
	return e[0]
}

// fillCases are writes into the image above: fill is the range an image
// with a backing file must ask for ([0, 0) for none).
var fillCases = []struct {
	name   string
	off, n int64
	fill   [2]int64
}{
	{"head partial unallocated", 100, 2*fcs - 100, [2]int64{0, 2 * fcs}},
	{"inside an unallocated cluster", 100, 200, [2]int64{0, fcs}},
	{"tail partial unallocated (short last cluster)", fcs, 2*fcs + 100, [2]int64{fcs, fillSize}},
	{"tail partial unallocated, head in data", fcs + 100, 2*fcs - 100 + 1, [2]int64{fcs + 100, fillSize}},
	{"both ends partial unallocated", 100, fillSize - 200, [2]int64{0, fillSize}},
	{"head partial unallocated, tail in data", 512, fcs, [2]int64{0, fcs + 512}},
	{"head partial unallocated, tail in compressed", 700, 2 * fcs, [2]int64{0, 2*fcs + 700}},
	{"whole unallocated cluster", 0, fcs, [2]int64{}},
	{"whole short last cluster", 3 * fcs, fLast, [2]int64{}},
	{"whole clusters across all kinds", 0, fillSize, [2]int64{}},
	{"partial data cluster", fcs + 1000, 100, [2]int64{}},
	{"partial compressed cluster", 2*fcs + 100, 300, [2]int64{}},
	{"compressed to whole last cluster", 2*fcs + 100, fcs - 100 + fLast, [2]int64{}},
	{"data to compressed", fcs + 5, fcs, [2]int64{}},
}

// TestFillError: in an image with a backing file a write covering part of
// an unallocated cluster writes nothing and asks for the whole partially
// covered clusters at its ends (and everything between); the write
// extended to that range succeeds. Data and compressed clusters never ask
// (compressed ones are inflated and rewritten), and neither does an image
// without a backing file (its unallocated clusters read zeros).
func TestFillError(t *testing.T) {
	for _, c := range fillCases {
		t.Run("diff/"+c.name, func(t *testing.T) {
			im, st := newFillImage(t, true)
			p := disktest.Fill(int(c.n), 0x5a)
			before, _ := st.ReadFile("/f.qcow")
			ents := []uint64{entryOf(t, im, 0), entryOf(t, im, 1), entryOf(t, im, 2), entryOf(t, im, 3)}
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
			if fe.Off != c.fill[0] || fe.Off+fe.Len != c.fill[1] || fe.File != "/f.qcow" {
				t.Fatalf("fill [%d, %d) of %s, want [%d, %d)", fe.Off, fe.Off+fe.Len, fe.File, c.fill[0], c.fill[1])
			}
			after, _ := st.ReadFile("/f.qcow")
			if !bytes.Equal(before, after) {
				t.Fatal("a write answered with a FillError changed the file")
			}
			for i, e := range ents {
				if got := entryOf(t, im, int64(i)); got != e {
					t.Fatalf("a write answered with a FillError changed cluster %d's entry", i)
				}
			}
			// The container's second call: the range as the chain shows
			// it (the image's own clusters, a made-up parent's content in
			// its unallocated ones), p inside.
			view := ownContent()
			par := disktest.Fill(fillSize, 0xc3)
			copy(view[:fcs], par)
			copy(view[3*fcs:], par[3*fcs:])
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

// ownContent is what the image made by newFillImage holds itself.
func ownContent() []byte {
	b := make([]byte, fillSize)
	copy(b[fcs:], disktest.Fill(fcs, 0x11))
	copy(b[2*fcs:], compressible)
	return b
}

// checkFillContent checks the whole image reads its own content with p at
// off, where the unallocated clusters (0 and 3) inside [fillOff, fillEnd)
// now hold view's content (the chain's, written by a filled write).
// Unallocated runs read zeros here: the driver alone shows no parent.
// Written compressed clusters are normal ones afterwards.
func checkFillContent(t *testing.T, im *image, p []byte, off int64, view []byte, fillOff, fillEnd int64) {
	t.Helper()
	disktest.CheckImage(t, im, disktest.FillWant(ownContent(), fcs, []int64{0, 3}, p, off, view, fillOff, fillEnd), fcs)
	if off < 3*fcs && off+int64(len(p)) > 2*fcs && kindOf(entryOf(t, im, 2)) != kNormal {
		t.Fatal("a written compressed cluster is still compressed")
	}
}

// TestZeroWritesAllocateNothing: in an image without a backing file,
// writes of zeros into unallocated clusters allocate nothing; in one with
// a backing file they allocate (the format has no zero clusters).
func TestZeroWritesAllocateNothing(t *testing.T) {
	im, st := newFillImage(t, false)
	before, _ := st.ReadFile("/f.qcow")
	if _, err := im.WriteAt(make([]byte, fcs+100), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(make([]byte, 10), 3*fcs+5); err != nil {
		t.Fatal(err)
	}
	after, _ := st.ReadFile("/f.qcow")
	if len(after) != len(before) || entryOf(t, im, 0) != 0 || entryOf(t, im, 3) != 0 {
		t.Fatal("zero writes allocated clusters in a base image")
	}
	im2, _ := newFillImage(t, true)
	if _, err := im2.WriteAt(make([]byte, fcs), 0); err != nil {
		t.Fatal(err)
	}
	if entryOf(t, im2, 0) == 0 {
		t.Fatal("a zero write over a backing file allocated nothing")
	}
}
