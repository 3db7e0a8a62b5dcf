package qed

import (
	"bytes"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// Layout of the images the fill tests make with the driver alone (no
// container, no backing file opened): 4 KiB clusters, a short last one.
//
//	cluster 0: unallocated  1: data  2: zero  3 (2 KiB): unallocated
const (
	fcs      = 4 << 10
	fLast    = 2 << 10
	fillSize = 3*fcs + fLast
)

// newFillImage creates the image above through the driver: with a
// backing file recorded (never opened) or without.
func newFillImage(t *testing.T, backing bool) (*image, *memfs.FS) {
	t.Helper()
	st := memfs.New()
	vals, err := driver.ParseOptions("qed", Format.CreateOptions, disktest.KVs("cluster_size=4k"))
	if err != nil {
		t.Fatal(err)
	}
	p := &driver.CreateParams{Storage: st, Name: "/f.qed", Size: fillSize, Options: vals}
	if backing {
		p.ParentRef = &driver.ParentRef{Name: "never-opened.qed"}
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
	if err := im.WriteZeroes(2*fcs, fcs, true); err != nil {
		t.Fatal(err)
	}
	want := []int{kindUnalloc, kindData, kindZero, kindUnalloc}
	if !backing {
		// Zeroing an unallocated cluster of a base image changes nothing.
		want[2] = kindUnalloc
	}
	for c, k := range want {
		e, _, err := im.lookup(int64(c))
		if err != nil {
			t.Fatal(err)
		}
		if kindOf(e) != k {
			t.Fatalf("setup: cluster %d has entry %#x", c, e)
		}
	}
	return im, st
}

// fillCases are writes into the image above; fill is the range an image
// with a backing file must ask for ([0, 0) for none).
var fillCases = []struct {
	name   string
	off, n int64
	fill   [2]int64
}{
	{"head partial unallocated", 100, 2*fcs - 100, [2]int64{0, 2 * fcs}},
	{"inside an unallocated cluster", 100, 200, [2]int64{0, fcs}},
	{"tail partial unallocated (short last cluster)", fcs, 2*fcs + 100, [2]int64{fcs, fillSize}},
	{"tail partial, head in data", fcs + 100, 2*fcs - 100 + 1, [2]int64{fcs + 100, fillSize}},
	{"both ends partial unallocated", 100, fillSize - 200, [2]int64{0, fillSize}},
	{"head partial unallocated, tail in data", 512, fcs, [2]int64{0, fcs + 512}},
	{"whole unallocated cluster", 0, fcs, [2]int64{}},
	{"whole short last cluster", 3 * fcs, fLast, [2]int64{}},
	{"whole clusters of every kind", 0, fillSize, [2]int64{}},
	{"partial data cluster", fcs + 1000, 100, [2]int64{}},
	{"partial zero cluster", 2*fcs + 100, 300, [2]int64{}},
	{"zero cluster to whole last cluster", 2*fcs + 100, fcs - 100 + fLast, [2]int64{}},
}

// TestFillError: with a backing file, a write covering part of an
// unallocated cluster writes nothing and asks for the request extended to
// the whole clusters at its ends; the extended write succeeds. Zero and
// data clusters never ask, and neither does an image without a backing
// file. WriteZeroes asks the same way.
func TestFillError(t *testing.T) {
	for _, c := range fillCases {
		for _, zero := range []bool{false, true} {
			kind := "write"
			if zero {
				kind = "zeroes"
			}
			t.Run("backing/"+kind+"/"+c.name, func(t *testing.T) {
				im, st := newFillImage(t, true)
				p := disktest.Fill(int(c.n), 0x5a)
				if zero {
					p = make([]byte, c.n)
				}
				before, _ := st.ReadFile("/f.qed")
				var err error
				if zero {
					err = im.WriteZeroes(c.off, c.n, false)
				} else {
					_, err = im.WriteAt(p, c.off)
				}
				if c.fill == [2]int64{} {
					if err != nil {
						t.Fatalf("%s: %v", kind, err)
					}
					checkFillContent(t, im, p, c.off, nil, 0, 0)
					return
				}
				fe, ok := driver.AsFill(err)
				if !ok {
					t.Fatalf("%s: %v; want a FillError", kind, err)
				}
				if fe.Off != c.fill[0] || fe.Off+fe.Len != c.fill[1] || fe.File != "/f.qed" {
					t.Fatalf("fill [%d, %d) of %s, want [%d, %d)", fe.Off, fe.Off+fe.Len, fe.File, c.fill[0], c.fill[1])
				}
				if after, _ := st.ReadFile("/f.qed"); !bytes.Equal(before, after) {
					t.Fatal("a write answered with a FillError changed the file")
				}
				// The container's second call: the range as the chain
				// shows it (a made-up backing file in the unallocated
				// clusters), p inside.
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
			t.Run("base/"+kind+"/"+c.name, func(t *testing.T) {
				im, _ := newFillImage(t, false)
				p := disktest.Fill(int(c.n), 0x5a)
				var err error
				if zero {
					p = make([]byte, c.n)
					err = im.WriteZeroes(c.off, c.n, true)
				} else {
					_, err = im.WriteAt(p, c.off)
				}
				if err != nil {
					t.Fatalf("%s: %v", kind, err)
				}
				checkFillContent(t, im, p, c.off, nil, 0, 0)
			})
		}
	}
}

// ownContent is what the image made by newFillImage holds itself.
func ownContent() []byte {
	b := make([]byte, fillSize)
	copy(b[fcs:], disktest.Fill(fcs, 0x11))
	return b
}

// checkFillContent checks the whole image reads its own content with p
// at off, where the unallocated clusters (0 and 3) inside [fillOff,
// fillEnd) now hold view's content. Unallocated runs read zeros: the
// driver alone shows no backing file.
func checkFillContent(t *testing.T, im *image, p []byte, off int64, view []byte, fillOff, fillEnd int64) {
	t.Helper()
	disktest.CheckImage(t, im, disktest.FillWant(ownContent(), fcs, []int64{0, 3}, p, off, view, fillOff, fillEnd), fcs)
	// Freed clusters are packed away by the flush.
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}
	res, err := im.Check(ctx, driver.RepairNone)
	if err != nil || res.Corruptions+res.Leaks != 0 {
		t.Fatalf("check: %+v %v", res, err)
	}
}
