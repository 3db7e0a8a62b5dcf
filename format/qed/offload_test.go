package qed

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/memfs"
	"github.com/vdisk/vdisk/storage/osfs"
)

// offloadRuns are the data runs of the offload tests' sources (offset,
// length): cluster-aligned, inside one cluster, across clusters at 4 KiB
// edges (file system blocks), and up to the odd end of the disk.
var offloadRuns = [][2]int64{
	{0, 1 << 20},
	{1<<20 + 4096, 8192},
	{3<<20 + 60<<10, 200 << 10},
	{5<<20 - 4096, 4096 + 64<<10},
	{offloadSize - 5*512, 5 * 512},
}

const offloadSize = 8<<20 + 3*512

// TestOffloadConvert: converts between raw and QED (cluster sizes 64 KiB
// and 4 KiB) copy every data byte inside the kernel (nothing read or
// written by vdisk), sequentially and in parallel; qemu-img finds the
// output identical to the source, and the QED images vdisk makes pass
// qemu-img check. The read/write path (NoOffload) gives the same image
// content.
func TestOffloadConvert(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	rawName, want, data := disktest.SparseSource(t, dir, offloadSize, offloadRuns, 17)
	for _, opts := range [][]string{nil, {"cluster_size=4k", "table_size=2"}} {
		for _, seq := range []bool{true, false} {
			name := fmt.Sprintf("%v-seq=%v", opts, seq)
			t.Run("raw-to-qed "+name, func(t *testing.T) {
				src, err := vdisk.Open(ctx, rawName, &vdisk.OpenOptions{Format: "raw", ReadOnly: true})
				if err != nil {
					t.Fatal(err)
				}
				defer src.Close()
				out := filepath.Join(dir, fmt.Sprintf("out-%d.qed", len(opts)))
				os.Remove(out)
				d := createQED(t, nil, out, src.Size(), "", "", disktest.KVs(opts...)...)
				st := disktest.ConvertStats(t, ctx, d, src, vdisk.ConvertOptions{Sequential: seq, Workers: 4, ChunkSize: 1 << 20})
				if st.Offloaded < data || st.Read != 0 || st.Written != 0 {
					t.Fatalf("stats %+v; want at least %d offloaded, nothing read or written", st, data)
				}
				disktest.MustClose(t, d)
				qemutest.Check(t, "qed", out)
				if !qemutest.Compare(t, "qed", out, "raw", rawName) {
					t.Fatal("qemu-img compare: the QED image differs from the source")
				}
				d = openQED(t, nil, out, true)
				if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
					t.Fatal("vdisk reads the offloaded image differently")
				}
				disktest.MustClose(t, d)
			})
			t.Run("qed-to-raw "+name, func(t *testing.T) {
				in := filepath.Join(dir, fmt.Sprintf("in-%d.qed", len(opts)))
				args := []string{"convert", "-q", "-f", "raw", "-O", "qed"}
				for _, o := range opts {
					args = append(args, "-o", o)
				}
				qemutest.Img(t, append(args, rawName, in)...)
				// qemu-io writes: a partial cluster in a hole, and a zero
				// cluster (qemu's write -z) over data.
				qemutest.IO(t, "qed", in, "write -P 0x5a 6295552 1000", "write -z 0 65536")
				exp := filepath.Join(dir, "exp.raw")
				qemutest.Img(t, "convert", "-q", "-f", "qed", "-O", "raw", in, exp)
				src := openQED(t, nil, in, true)
				defer src.Close()
				out := filepath.Join(dir, "out.raw")
				os.Remove(out)
				dst, err := vdisk.Create(ctx, out, &vdisk.CreateOptions{Format: "raw", Size: src.Size()})
				if err != nil {
					t.Fatal(err)
				}
				st := disktest.ConvertStats(t, ctx, dst, src, vdisk.ConvertOptions{Sequential: seq, Workers: 4, ChunkSize: 1 << 20})
				disktest.MustClose(t, dst)
				if st.Offloaded < data-65536 || st.Read != 0 || st.Written != 0 {
					t.Fatalf("stats %+v; want at least %d offloaded, nothing read or written", st, data-65536)
				}
				if !qemutest.Compare(t, "raw", out, "raw", exp) {
					t.Fatal("qemu-img compare: the raw output differs from qemu's")
				}
			})
		}
	}
}

// TestCopyFrom calls CopyFrom directly on an image holding data, zero and
// unallocated clusters, with copies that are aligned, unaligned, inside
// one cluster, across L2 tables and up to the end of the disk, checking
// every byte against a model and the image with qemu-img check; a copy
// from a source that ends early returns the short count and leaves the
// rest of the cluster zero.
func TestCopyFrom(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	const size = 3<<20 + 512
	srcData := disktest.RandomBytes(4<<20, 3, 9)
	sf := disktest.HostFile(t, filepath.Join(dir, "src.bin"), srcData)
	// 4 KiB clusters, 2-cluster tables: 1024 entries, 4 MiB per L2 table.
	name := filepath.Join(dir, "c.qed")
	d := createQED(t, nil, name, size, "", "", disktest.KVs("cluster_size=4k", "table_size=2")...)
	model := make([]byte, size)
	write := func(off int64, p []byte) {
		disktest.MustWrite(t, d, nil, p, off)
		copy(model[off:], p)
	}
	write(0, disktest.Fill(3*4096, 0x11))     // clusters 0-2 allocated
	write(10*4096, disktest.Fill(4096, 0x22)) // cluster 10
	if err := d.WriteZeroes(10*4096, 4096, false); err != nil {
		t.Fatal(err)
	}
	copy(model[10*4096:], make([]byte, 4096)) // cluster 10 zeroed in place
	if err := d.WriteZeroes(20*4096, 2*4096, true); err != nil {
		t.Fatal(err)
	}
	im := topImage(d)
	// A free cluster full of old bytes, as a discard leaves for reuse:
	// the first one-cluster copy into a new cluster takes it and must
	// zero what it does not cover.
	im.meta.Lock()
	junk, err := im.allocLocked(1, false)
	im.meta.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := im.f.WriteAt(disktest.Fill(4096, 0xee), junk); err != nil {
		t.Fatal(err)
	}
	im.meta.Lock()
	im.holes = append(im.holes, junk)
	im.meta.Unlock()
	for _, c := range []struct {
		name          string
		off, n, srcAt int64
	}{
		{"allocated, unaligned", 100, 5000, 7},
		{"allocated into unallocated", 2*4096 + 300, 3 * 4096, 4096},
		{"inside an unallocated cluster", 30*4096 + 10, 100, 12345},
		{"zeroed-in-place cluster", 10*4096 + 512, 1024, 99},
		{"across a zero run", 19*4096 + 4000, 3 * 4096, 65536},
		{"whole clusters", 40 * 4096, 16 * 4096, 8192},
		{"to the end of the disk", size - 3*4096 - 700, 3*4096 + 700, 1 << 20},
	} {
		n, err := im.CopyFrom(sf, c.srcAt, c.off, c.n)
		if err != nil || n != c.n {
			t.Fatalf("%s: copied %d of %d: %v", c.name, n, c.n, err)
		}
		copy(model[c.off:], srcData[c.srcAt:c.srcAt+c.n])
	}
	if len(im.holes) != 0 {
		t.Fatal("no copy reused the free cluster")
	}
	// A source that ends early: 300 bytes before its end.
	short := int64(len(srcData)) - 300
	if n, err := im.CopyFrom(sf, short, 50*4096+8, 1000); err != nil || n != 300 {
		t.Fatalf("short source: copied %d: %v", n, err)
	}
	copy(model[50*4096+8:], srcData[short:])
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, model) {
		t.Fatal("the image reads differently from the model")
	}
	disktest.MustClose(t, d)
	qemutest.Check(t, "qed", name)
	if got := qemutest.Raw(t, "qed", name); !bytes.Equal(got, model) {
		t.Fatal("qemu reads the image differently from the model")
	}
}

// TestCopyFromTables: a copy across an L2 table boundary allocates in
// both tables.
func TestCopyFromTables(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	srcData := bytes.Repeat([]byte("0123456789abcdef"), 1<<14) // 256 KiB
	sf := disktest.HostFile(t, filepath.Join(dir, "src.bin"), srcData)
	name := filepath.Join(dir, "t.qed")
	const size = 12 << 20
	d := createQED(t, nil, name, size, "", "", disktest.KVs("cluster_size=4k", "table_size=2")...)
	off := int64(4<<20 - 100<<10 - 33)
	if n, err := topImage(d).CopyFrom(sf, 5, off, 200<<10); err != nil || n != 200<<10 {
		t.Fatalf("copied %d: %v", n, err)
	}
	model := make([]byte, size)
	copy(model[off:], srcData[5:5+200<<10])
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, model) {
		t.Fatal("the image reads differently from the model")
	}
	disktest.MustClose(t, d)
	qemutest.Check(t, "qed", name)
	if got := qemutest.Raw(t, "qed", name); !bytes.Equal(got, model) {
		t.Fatal("qemu reads the image differently from the model")
	}
}

// TestCopyFromRefused: CopyFrom refuses, with ErrUnsupported and without
// writing anything, a copy into part of an unallocated cluster of an
// image with a backing file (that needs a fill from the chain) and a copy
// into an image whose storage cannot copy between files (memfs); a
// read-only image is ErrReadOnly.
func TestCopyFromRefused(t *testing.T) {
	dir := t.TempDir()
	sf := disktest.HostFile(t, filepath.Join(dir, "src.bin"), disktest.Fill(1<<20, 7))
	base := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(base, disktest.Fill(1<<20, 3), 0o644); err != nil {
		t.Fatal(err)
	}
	top := filepath.Join(dir, "top.qed")
	d := createQED(t, nil, top, 1<<20, "base.raw", "raw")
	before, _ := os.ReadFile(top)
	if _, err := topImage(d).CopyFrom(sf, 0, 100, 4096); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("partial cluster over a backing file: %v", err)
	}
	if after, _ := os.ReadFile(top); !bytes.Equal(before, after) {
		t.Fatal("a refused copy changed the image")
	}
	// Whole clusters over a backing file need no fill.
	if n, err := topImage(d).CopyFrom(sf, 0, 65536, 65536); err != nil || n != 65536 {
		t.Fatalf("whole cluster over a backing file: %d, %v", n, err)
	}
	disktest.MustClose(t, d)

	st := memfs.New()
	m := createQED(t, st, "/m.qed", 1<<20, "", "")
	if _, err := topImage(m).CopyFrom(sf, 0, 0, 4096); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("memfs: %v", err)
	}
	// A file that can copy but refuses this source (as the kernel does
	// across file systems): the clusters allocated for the copy go back,
	// and the next write takes them.
	im := topImage(m)
	end := im.curEnd()
	plain := im.f
	im.f = refusingFile{plain}
	if _, err := im.CopyFrom(sf, 0, 8192, 3*65536); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("refused copy: %v", err)
	}
	im.f = plain
	if got := disktest.ReadAll(t, m); !bytes.Equal(got, make([]byte, 1<<20)) {
		t.Fatal("a refused copy changed the image")
	}
	if im.curEnd() != end {
		t.Fatalf("a refused copy moved the end of the file from %d to %d", end, im.curEnd())
	}
	disktest.MustClose(t, m)

	r := openQED(t, nil, top, true)
	defer r.Close()
	if _, err := topImage(r).CopyFrom(sf, 0, 0, 65536); !errors.Is(err, driver.ErrReadOnly) {
		t.Fatalf("read-only: %v", err)
	}
}

// refusingFile is a file whose copies between files are refused, as
// osfs refuses one across file systems.
type refusingFile struct{ driver.File }

func (f refusingFile) CopyFrom(src driver.File, srcOff, off, n int64) (int64, error) {
	return 0, driver.Errorf(driver.ErrUnsupported, f.Name(), off, "copy refused")
}

// These tests check the kernel copy itself, also where the file system
// (ext4, tmpfs, overlayfs in CI) would copy through the page cache, which
// CopyFrom leaves to the read/write path by default.
func init() { osfs.SetCopyRangePolicy(osfs.CopyRangeAlways) }
