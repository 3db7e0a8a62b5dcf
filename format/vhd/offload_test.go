package vhd_test

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

const offloadSize = 8 << 20

// offloadRuns are the data runs of the offload source (offset, length):
// block-aligned, inside one block, across a block edge, not sector-aligned,
// and up to the end of the disk. The blocks are 512 KiB (block_size).
var offloadRuns = [][2]int64{
	{0, 1 << 20},
	{1<<20 + 4096, 8192},
	{3<<20 - 64<<10, 200 << 10},
	{5<<20 + 100, 1000},
	{offloadSize - 5*512, 5 * 512},
}

// TestOffloadConvert: converts from raw into dynamic (2 MiB and 512 KiB
// blocks) and fixed VHDs copy every data byte inside the kernel, nothing
// read or written by vdisk, sequentially and in parallel; qemu-img finds
// the output identical to the source, vdisk's check finds nothing wrong,
// and the read/write path (NoOffload) gives the same content.
// These tests check the kernel copy itself, also where the file system
// (ext4, tmpfs, overlayfs in CI) would copy through the page cache, which
// CopyFrom leaves to the read/write path by default.
func init() { osfs.SetCopyRangePolicy(osfs.CopyRangeAlways) }

func TestOffloadConvert(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	rawName, want, data := disktest.SparseSource(t, dir, offloadSize, offloadRuns, 23)
	for _, opts := range [][]string{{"force_size=on"}, {"force_size=on", "block_size=512k"}, {"force_size=on", "subformat=fixed"}} {
		for _, mode := range []string{"seq", "par", "nooffload"} {
			t.Run(fmt.Sprintf("%v-%s", opts, mode), func(t *testing.T) {
				src, err := vdisk.Open(ctx, rawName, &vdisk.OpenOptions{Format: "raw", ReadOnly: true})
				if err != nil {
					t.Fatal(err)
				}
				defer src.Close()
				out := filepath.Join(dir, "out.vhd")
				os.Remove(out)
				d := create(t, nil, out, src.Size(), "", opts...)
				o := vdisk.ConvertOptions{Sequential: mode == "seq", NoOffload: mode == "nooffload", Workers: 4, ChunkSize: 1 << 20}
				st := disktest.ConvertStats(t, ctx, d, src, o)
				if mode == "nooffload" {
					if st.Offloaded != 0 || st.Written < data {
						t.Fatalf("stats %+v; want nothing offloaded and at least %d written", st, data)
					}
				} else if st.Offloaded < data || st.Read != 0 || st.Written != 0 {
					t.Fatalf("stats %+v; want at least %d offloaded, nothing read or written", st, data)
				}
				disktest.MustClose(t, d)
				if !qemutest.Compare(t, "vpc", out, "raw", rawName) {
					t.Fatal("qemu-img compare: the VHD differs from the source")
				}
				vdiskCheck(t, nil, out)
				d = openDisk(t, nil, out, true)
				mustEqual(t, "vdisk's read of the offloaded image", disktest.ReadAll(t, d), want)
				disktest.MustClose(t, d)
			})
		}
	}
}

// TestCopyFrom calls CopyFrom on a differencing image directly: whole
// sectors into a new block mark only those sectors (the rest keeps
// reading the parent), into a block the image holds in part, across a
// block edge; a copy of part of a sector is refused before anything is
// written (the caller then writes, with a fill from the parent); a source
// that ends early gives the whole sectors copied. Every byte is checked
// against a model, and the image against vdisk's check.
func TestCopyFrom(t *testing.T) {
	st := memfs.New()
	dir := t.TempDir()
	const size = 4 << 20
	base := patterned(size, 3)
	b := create(t, st, "/base.vhd", size, "", "block_size=1M")
	disktest.MustWrite(t, b, nil, base, 0)
	disktest.MustClose(t, b)
	srcData := disktest.RandomBytes(2<<20+700, 5, 7)
	sf := disktest.HostFile(t, filepath.Join(dir, "src.bin"), srcData)

	// The copies need storage that copies between files: the child lives
	// on the host, its parent in memory would not resolve, so the parent
	// is saved next to it.
	baseName := disktest.SaveTo(t, st, "/base.vhd", dir)
	name := filepath.Join(dir, "child.vhd")
	d := create(t, nil, name, size, baseName, "block_size=1M")
	model := bytes.Clone(base)
	disktest.MustWrite(t, d, nil, disktest.Fill(4096, 0x44), 1<<20+8192) // block 1 held in part
	copy(model[1<<20+8192:], disktest.Fill(4096, 0x44))
	fc, ok := vdisk.As[vdisk.FileCopier](d.Top())
	if !ok {
		t.Fatal("the VHD image is not a vdisk.FileCopier")
	}
	for _, c := range []struct {
		name          string
		off, n, srcAt int64
		want          int64 // bytes copied; -1: refused
	}{
		{"whole sectors into a new block", 512 * 3, 512 * 9, 0, 512 * 9},
		{"into a block held in part", 1<<20 + 4096, 16384, 4096, 16384},
		{"across a block edge", 2<<20 - 1024, 4096, 100, 4096},
		{"part of a sector", 3<<20 + 10, 1000, 0, -1},
		{"a source that ends early", 3<<20 + 512, 4096, int64(len(srcData)) - 1500, 1024},
	} {
		got, err := fc.CopyFrom(sf, c.srcAt, c.off, c.n)
		if c.want < 0 {
			if !errors.Is(err, driver.ErrUnsupported) || got != 0 {
				t.Fatalf("%s: got %d, %v; want ErrUnsupported", c.name, got, err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Fatalf("%s: got %d, %v; want %d", c.name, got, err, c.want)
		}
		copy(model[c.off:c.off+got], srcData[c.srcAt:])
	}
	mustEqual(t, "the chain after the copies", disktest.ReadAll(t, d), model)
	disktest.MustClose(t, d)
	vdiskCheck(t, nil, name)
	d = openDisk(t, nil, name, true)
	mustEqual(t, "the chain reopened", disktest.ReadAll(t, d), model)
	disktest.MustClose(t, d)
}
