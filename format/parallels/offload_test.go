package parallels

import (
	"bytes"
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
	"github.com/vdisk/vdisk/storage/memfs"
	"github.com/vdisk/vdisk/storage/osfs"
)

const offloadSize = 8<<20 + 3*512

// offloadRuns are the data runs of the offload tests' sources (offset,
// length): cluster-aligned, inside one cluster, across clusters at 4 KiB
// edges (file system blocks), and up to the odd end of the disk.
var offloadRuns = [][2]int64{
	{0, 1 << 20},
	{1<<20 + 4096, 8192},
	{3<<20 + 60<<10, 200 << 10},
	{5<<20 - 4096, 4096 + 1<<20},
	{offloadSize - 5*512, 5 * 512},
}

// TestOffloadConvert: converts between raw and Parallels (qemu's default
// 1 MiB clusters preallocated with fallocate, 64 KiB clusters grown by
// truncate) copy every data byte inside the kernel (nothing read or
// written by vdisk), sequentially and in parallel; qemu-img finds the
// output identical to the source, and the images vdisk makes pass
// qemu-img check.
func TestOffloadConvert(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	rawName, want, data := disktest.SparseSource(t, dir, offloadSize, offloadRuns, 17)
	for _, opts := range [][]string{nil, {"cluster_size=64k", "prealloc-mode=truncate", "prealloc-size=0"}} {
		for _, seq := range []bool{true, false} {
			name := fmt.Sprintf("%v-seq=%v", opts, seq)
			t.Run("raw-to-parallels "+name, func(t *testing.T) {
				src, err := vdisk.Open(ctx, rawName, &vdisk.OpenOptions{Format: "raw", ReadOnly: true})
				if err != nil {
					t.Fatal(err)
				}
				defer src.Close()
				out := filepath.Join(dir, fmt.Sprintf("out-%d.prl", len(opts)))
				os.Remove(out)
				d := createPrl(t, nil, out, src.Size(), disktest.KVs(opts...)...)
				st := disktest.ConvertStats(t, ctx, d, src, vdisk.ConvertOptions{Sequential: seq, Workers: 4, ChunkSize: 1 << 20})
				if st.Offloaded < data || st.Read != 0 || st.Written != 0 {
					t.Fatalf("stats %+v; want at least %d offloaded, nothing read or written", st, data)
				}
				disktest.MustClose(t, d)
				qemutest.Check(t, "parallels", out)
				if !qemutest.Compare(t, "parallels", out, "raw", rawName) {
					t.Fatal("qemu-img compare: the Parallels image differs from the source")
				}
				d = openPrl(t, nil, out, true)
				if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
					t.Fatal("vdisk reads the offloaded image differently")
				}
				disktest.MustClose(t, d)
			})
			t.Run("parallels-to-raw "+name, func(t *testing.T) {
				in := filepath.Join(dir, fmt.Sprintf("in-%d.prl", len(opts)))
				args := []string{"convert", "-q", "-f", "raw", "-O", "parallels"}
				for _, o := range opts {
					if strings.HasPrefix(o, "cluster_size=") { // prealloc-* are qemu open options
						args = append(args, "-o", o)
					}
				}
				qemutest.Img(t, append(args, rawName, in)...)
				// A qemu-io write into a hole: a new cluster written in part.
				qemutest.IO(t, "parallels", in, "write -P 0x5a 6295552 1000")
				exp := filepath.Join(dir, "exp.raw")
				qemutest.Img(t, "convert", "-q", "-f", "parallels", "-O", "raw", in, exp)
				src := openPrl(t, nil, in, true)
				defer src.Close()
				out := filepath.Join(dir, "out.raw")
				os.Remove(out)
				dst, err := vdisk.Create(ctx, out, &vdisk.CreateOptions{Format: "raw", Size: src.Size()})
				if err != nil {
					t.Fatal(err)
				}
				st := disktest.ConvertStats(t, ctx, dst, src, vdisk.ConvertOptions{Sequential: seq, Workers: 4, ChunkSize: 1 << 20})
				disktest.MustClose(t, dst)
				if st.Offloaded < data || st.Read != 0 || st.Written != 0 {
					t.Fatalf("stats %+v; want at least %d offloaded, nothing read or written", st, data)
				}
				if !qemutest.Compare(t, "raw", out, "raw", exp) {
					t.Fatal("qemu-img compare: the raw output differs from qemu's")
				}
			})
		}
	}
}

// TestCopyFrom calls CopyFrom directly on an image holding allocated and
// unallocated clusters (4 KiB clusters), with copies that are aligned,
// unaligned, inside one cluster, over allocated and new clusters and up to
// the end of the disk, checking every byte against a model and the image
// with qemu-img check; a copy from a source that ends early returns the
// short count and the rest of the cluster reads zeros.
func TestCopyFrom(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	const size = 3<<20 + 512
	srcData := disktest.RandomBytes(4<<20, 3, 9)
	sf := disktest.HostFile(t, filepath.Join(dir, "src.bin"), srcData)
	for _, opts := range [][]string{{"cluster_size=4k"}, {"cluster_size=4k", "prealloc-mode=truncate", "prealloc-size=0"}} {
		t.Run(fmt.Sprint(opts), func(t *testing.T) {
			name := filepath.Join(dir, fmt.Sprintf("c%d.prl", len(opts)))
			d := createPrl(t, nil, name, size, disktest.KVs(opts...)...)
			model := make([]byte, size)
			disktest.MustWrite(t, d, nil, disktest.Fill(3*4096, 0x11), 0)
			copy(model, disktest.Fill(3*4096, 0x11))
			disktest.MustWrite(t, d, nil, disktest.Fill(4096, 0x22), 10*4096)
			copy(model[10*4096:], disktest.Fill(4096, 0x22))
			// A discarded cluster: its file cluster is punched and reused.
			if err := d.Discard(10*4096, 4096); err != nil {
				t.Fatal(err)
			}
			copy(model[10*4096:], make([]byte, 4096))
			im := topImage(d)
			for _, c := range []struct {
				name          string
				off, n, srcAt int64
			}{
				{"allocated, unaligned", 100, 5000, 7},
				{"allocated into unallocated", 2*4096 + 300, 3 * 4096, 4096},
				{"inside an unallocated cluster", 30*4096 + 10, 100, 12345},
				{"the discarded cluster", 10*4096 + 512, 1024, 99},
				{"whole clusters", 40 * 4096, 16 * 4096, 8192},
				{"to the end of the disk", size - 3*4096 - 700, 3*4096 + 700, 1 << 20},
			} {
				n, err := im.CopyFrom(sf, c.srcAt, c.off, c.n)
				if err != nil || n != c.n {
					t.Fatalf("%s: copied %d of %d: %v", c.name, n, c.n, err)
				}
				copy(model[c.off:], srcData[c.srcAt:c.srcAt+c.n])
			}
			short := int64(len(srcData)) - 300
			if n, err := im.CopyFrom(sf, short, 50*4096+8, 1000); err != nil || n != 300 {
				t.Fatalf("short source: copied %d: %v", n, err)
			}
			copy(model[50*4096+8:], srcData[short:])
			if got := disktest.ReadAll(t, d); !bytes.Equal(got, model) {
				t.Fatal("the image reads differently from the model")
			}
			disktest.MustClose(t, d)
			qemutest.Check(t, "parallels", name)
			if got := qemutest.Raw(t, "parallels", name); !bytes.Equal(got, model) {
				t.Fatal("qemu reads the image differently from the model")
			}
		})
	}
}

// TestCopyFromRefused: a copy into an image whose storage cannot copy
// between files (memfs) fails with ErrUnsupported, writes nothing and
// gives the reserved clusters back (the next write takes the first data
// cluster); a read-only image is ErrReadOnly.
func TestCopyFromRefused(t *testing.T) {
	dir := t.TempDir()
	sf := disktest.HostFile(t, filepath.Join(dir, "src.bin"), disktest.Fill(1<<20, 7))
	st := memfs.New()
	m := createPrl(t, st, "/m.prl", 1<<20, append(small, driver.KV{Key: "cluster_size", Value: "4k"})...)
	if _, err := topImage(m).CopyFrom(sf, 0, 0, 4096); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("memfs: %v", err)
	}
	// A file that can copy but refuses this source (as the kernel does
	// across file systems): the clusters reserved for the copy go back.
	im := topImage(m)
	plain := im.f
	im.f = refusingFile{plain}
	if _, err := im.CopyFrom(sf, 0, 8192, 3*4096); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("refused copy: %v", err)
	}
	if _, err := im.CopyFrom(sf, 0, 64<<10, 4096); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("refused copy: %v", err)
	}
	im.f = plain
	if got := disktest.ReadAll(t, m); !bytes.Equal(got, make([]byte, 1<<20)) {
		t.Fatal("a refused copy changed the image")
	}
	disktest.MustWrite(t, m, nil, disktest.Fill(4096, 1), 5*4096)
	if im := topImage(m); im.off(im.entry(5)) != im.l.dataOff {
		t.Fatalf("the write after a refused copy went to %d, not the first data cluster %d", im.off(im.entry(5)), im.l.dataOff)
	}
	disktest.MustClose(t, m)

	// On osfs, the copy goes through; the same image read-only refuses.
	name := filepath.Join(dir, "r.prl")
	d := createPrl(t, nil, name, 1<<20)
	if n, err := topImage(d).CopyFrom(sf, 0, 4096, 8192); err != nil || n != 8192 {
		t.Fatalf("copy: %d, %v", n, err)
	}
	disktest.MustClose(t, d)
	r := openPrl(t, nil, name, true)
	defer r.Close()
	if _, err := topImage(r).CopyFrom(sf, 0, 0, 4096); !errors.Is(err, driver.ErrReadOnly) {
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
