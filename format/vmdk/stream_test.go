package vmdk

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// streamSource writes a raw file of size bytes with compressible text-like
// data, random data, zero runs and an unaligned tail.
func streamSource(t *testing.T, path string, size int64) []byte {
	t.Helper()
	b := make([]byte, size)
	rng := rand.New(rand.NewPCG(1, 2))
	words := []string{"vmdk ", "grain ", "stream ", "qemu ", "vdisk ", "deflate ", "\n"}
	for off := int64(0); off < size; {
		n := int64(rng.IntN(3<<20) + 4096)
		end := min(size, off+n)
		switch rng.IntN(4) {
		case 0: // zeros
		case 1:
			for i := off; i < end; i++ {
				b[i] = byte(rng.Uint32())
			}
		default:
			for i := off; i < end; {
				i += int64(copy(b[i:end], words[rng.IntN(len(words))]))
			}
		}
		off = end
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestStreamOptimizedConvert: converting to streamOptimized goes through
// the sequential compressed path; the output passes qemu-img check,
// compares equal, is laid out as VMware's stream format (footer, GD at the
// end, markers) and is no larger than qemu-img's for the same input.
func TestStreamOptimizedConvert(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	for _, size := range []int64{24<<20 + 3*512, 64 << 10} {
		src := filepath.Join(dir, "src.raw")
		data := streamSource(t, src, size)
		ours := filepath.Join(dir, "ours.vmdk")
		theirs := filepath.Join(dir, "theirs.vmdk")
		os.Remove(ours)
		s := openDisk(t, nil, src, true)
		d := createDisk(t, nil, ours, s.Size(), "", "subformat=streamOptimized")
		if so, ok := vdisk.As[driver.StreamOnly](d.Top()); !ok || !so.StreamOnly() {
			t.Fatal("a new streamOptimized image is not StreamOnly")
		}
		if err := vdisk.Convert(ctx, d, s, nil); err != nil {
			t.Fatal(err)
		}
		disktest.MustClose(t, d)
		disktest.MustClose(t, s)
		qemutest.Check(t, "vmdk", ours)
		if !qemutest.Compare(t, "vmdk", ours, "raw", src) {
			t.Fatal("qemu-img compare: differs from the source")
		}
		qemutest.Img(t, "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", src, theirs)
		fo, _ := os.Stat(ours)
		ft, _ := os.Stat(theirs)
		t.Logf("size %d: vdisk %d bytes, qemu-img %d bytes", size, fo.Size(), ft.Size())
		if fo.Size() > ft.Size() {
			t.Errorf("vdisk's stream is %d bytes, qemu-img's %d", fo.Size(), ft.Size())
		}
		d = openDisk(t, nil, ours, true)
		im := topImage(d)
		sp := im.exts[0].sp
		if sp.h.gdOffset == gdAtEnd || !sp.compressed || !sp.markers || sp.h.version != 3 || im.createType != "streamOptimized" {
			t.Fatalf("layout: %+v %s", sp.h, im.createType)
		}
		var h header
		b := make([]byte, 512)
		im.main.ReadAt(b, 0)
		h.decode(b)
		if h.gdOffset != gdAtEnd || h.flags&(flagCompressed|flagMarkers) != flagCompressed|flagMarkers || h.compress != 1 {
			t.Fatalf("header %+v", h)
		}
		if got := disktest.ReadAll(t, d); !bytes.Equal(got[:size], data) {
			t.Fatal("vdisk reads its stream differently")
		}
		disktest.MustClose(t, d)
	}
}

// TestStreamWriteAt: plain in-order writes fill a stream image; going back
// is refused with ErrUnsupported.
func TestStreamWriteAt(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	f := filepath.Join(dir, "s.vmdk")
	const size = 3<<20 + 512
	d := createDisk(t, nil, f, size, "", "subformat=streamOptimized")
	want := make([]byte, size)
	for _, w := range []struct {
		off int64
		n   int
		c   byte
	}{{100, 5000, 1}, {6000, 70000, 2}, {1 << 20, 1 << 20, 3}, {size - 700, 700, 4}} {
		disktest.MustWrite(t, d, nil, disktest.Fill(w.n, w.c), w.off)
		copy(want[w.off:], disktest.Fill(w.n, w.c))
	}
	if _, err := d.WriteAt(disktest.Fill(10, 9), 0); err == nil {
		t.Fatal("a write going back succeeded")
	} else if !errorsIs(err, driver.ErrUnsupported) {
		t.Fatalf("write going back: %v", err)
	}
	disktest.MustClose(t, d)
	qemutest.Check(t, "vmdk", f)
	if got := qemuRaw(t, f); !bytes.Equal(got, want) {
		t.Fatal("qemu reads a different content")
	}
}

// TestStreamLentGrains: grains lent to a stream image
// (driver.CompressedLender) are stored as given although each buffer is
// overwritten as soon as it is released, and each is released once.
func TestStreamLentGrains(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	const size = 7<<20 + 512 // a short last grain
	data := streamSource(t, filepath.Join(dir, "src.raw"), size)
	f := filepath.Join(dir, "l.vmdk")
	disktest.Lend(t, createDisk(t, nil, f, size, "", "subformat=streamOptimized"), data)
	qemutest.Check(t, "vmdk", f)
	if got := qemuRaw(t, f); !bytes.Equal(got, data) {
		t.Fatal("qemu reads a different content")
	}
}
