package vhdx

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
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/memfs"
	"github.com/vdisk/vdisk/storage/osfs"
)

// offloadRuns are the data runs of the offload tests' source (offset,
// length): block-aligned, inside one block, across a block edge at 4 KiB
// (file system blocks), sector-sized, and up to the odd end of the disk.
var offloadRuns = [][2]int64{
	{0, 1 << 20},
	{1<<20 + 4096, 8192},
	{3<<20 + 60<<10, 200 << 10},
	{5<<20 - 4096, 4096 + 64<<10},
	{7<<20 + 512, 512},
	{offloadSize - 5*512, 5 * 512},
}

const offloadSize = 9<<20 + 3*512

// createRaw makes a raw target of size bytes.
func createRaw(t *testing.T, name string, size int64) *vdisk.Disk {
	t.Helper()
	os.Remove(name)
	d, err := vdisk.Create(ctx, name, &vdisk.CreateOptions{Format: "raw", Size: size})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// TestOffloadConvert: converts between raw and VHDX (1 MiB and 8 MiB
// blocks, 512 and 4096-byte sectors) copy every data byte inside the
// kernel (nothing read or written by vdisk), sequentially and in
// parallel; from a VHDX, the holes of the file inside its blocks (what
// qemu-img convert left unwritten) are not copied. qemu-img checks the
// VHDX vdisk makes clean and finds both outputs identical to the source.
func TestOffloadConvert(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	rawName, want, data := disktest.SparseSource(t, dir, offloadSize, offloadRuns, 17)
	// Every run rounded out to 4 KiB: what a copy of the file's data
	// extents may cover at most.
	var rounded int64
	for _, r := range offloadRuns {
		rounded += (r[0]+r[1]+4095)/4096*4096 - r[0]/4096*4096
	}
	for _, opts := range [][]string{{"block_size=1M"}, {"block_size=8M"}, {"block_size=1M", "logical_sector_size=4096"}} {
		qemuOK := len(opts) == 1 // qemu opens no VHDX with 4096-byte logical sectors
		for _, seq := range []bool{true, false} {
			name := fmt.Sprintf("%v-seq=%v", opts, seq)
			t.Run("raw-to-vhdx "+name, func(t *testing.T) {
				src, err := vdisk.Open(ctx, rawName, &vdisk.OpenOptions{Format: "raw", ReadOnly: true})
				if err != nil {
					t.Fatal(err)
				}
				defer src.Close()
				out := filepath.Join(dir, "out.vhdx")
				os.Remove(out)
				d := createVHDX(t, nil, out, src.Size(), "", disktest.KVs(opts...)...)
				st := disktest.ConvertStats(t, ctx, d, src, vdisk.ConvertOptions{Sequential: seq, Workers: 4, ChunkSize: 1 << 20})
				if st.Offloaded < data || st.Read != 0 || st.Written != 0 {
					t.Fatalf("stats %+v; want at least %d offloaded, nothing read or written", st, data)
				}
				disktest.MustClose(t, d)
				if qemuOK {
					qemutest.Check(t, "vhdx", out)
					if !qemutest.Compare(t, "vhdx", out, "raw", rawName) {
						t.Fatal("qemu-img compare: the VHDX image differs from the source")
					}
				}
				d = openVHDX(t, nil, out, true)
				// 4096-byte sectors round the disk up past the source.
				got := disktest.ReadAll(t, d)
				if !bytes.Equal(got[:len(want)], want) || !driver.IsZero(got[len(want):]) {
					t.Fatal("vdisk reads the offloaded image differently")
				}
				checkRuns(t, d.Top(), got)
				disktest.MustClose(t, d)
			})
			if !qemuOK {
				continue
			}
			t.Run("vhdx-to-raw "+name, func(t *testing.T) {
				in := filepath.Join(dir, "in.vhdx")
				os.Remove(in)
				args := []string{"convert", "-q", "-f", "raw", "-O", "vhdx"}
				for _, o := range opts {
					args = append(args, "-o", o)
				}
				qemutest.Img(t, append(args, rawName, in)...)
				src := openVHDX(t, nil, in, true)
				defer src.Close()
				out := filepath.Join(dir, "out.raw")
				dst := createRaw(t, out, src.Size())
				st := disktest.ConvertStats(t, ctx, dst, src, vdisk.ConvertOptions{Sequential: seq, Workers: 4, ChunkSize: 1 << 20})
				disktest.MustClose(t, dst)
				if st.Offloaded < data || st.Offloaded > rounded || st.Read != 0 || st.Written != 0 {
					t.Fatalf("stats %+v; want %d to %d offloaded (the file's holes skipped), nothing read or written", st, data, rounded)
				}
				if !qemutest.Compare(t, "raw", out, "raw", rawName) {
					t.Fatal("qemu-img compare: the raw output differs from the source")
				}
			})
		}
	}
}

// TestOffloadDiffChain: a convert of a differencing chain (partially
// present blocks, their sector bitmaps deciding which sectors are the
// child's) copies the child's sectors and the base's blocks inside the
// kernel and reads as the chain does.
func TestOffloadDiffChain(t *testing.T) {
	dir := t.TempDir()
	const size = 6<<20 + 512
	m := model.New(size)
	base := filepath.Join(dir, "base.vhdx")
	d := createVHDX(t, nil, base, size, "", disktest.KVs("block_size=1M")...)
	disktest.MustWrite(t, d, m, disktest.Fill(3<<20, 0x21), 1<<20)
	disktest.MustWrite(t, d, m, disktest.Fill(4096, 0x22), size-4096)
	disktest.MustClose(t, d)
	top := filepath.Join(dir, "top.vhdx")
	d = createVHDX(t, nil, top, 0, "base.vhdx")
	disktest.MustWrite(t, d, m, disktest.Fill(1536, 0x23), 2<<20+512)
	disktest.MustWrite(t, d, m, disktest.Fill(1<<20, 0x24), 5<<20)
	disktest.MustWrite(t, d, m, disktest.Fill(512, 0x25), 100<<10)
	disktest.MustClose(t, d)
	src := openVHDX(t, nil, top, true)
	defer src.Close()
	out := filepath.Join(dir, "out.raw")
	dst := createRaw(t, out, size)
	st := disktest.ConvertStats(t, ctx, dst, src, vdisk.ConvertOptions{Workers: 3, ChunkSize: 1 << 20})
	disktest.MustClose(t, dst)
	if st.Offloaded < 3<<20+1<<20 || st.Read != 0 || st.Written != 0 {
		t.Fatalf("stats %+v; want the chain's data offloaded, nothing read or written", st)
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, m.Data) {
		t.Fatal("the raw output differs from the chain")
	}
}

// TestOffloadLogInMemory: a read-only source whose log qemu left
// non-empty is replayed in memory; FileExtent maps none of it (the log
// may patch the file), so the convert reads through the replay and the
// output is what qemu reads after its own replay.
func TestOffloadLogInMemory(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	f := filepath.Join(dir, "log.vhdx")
	qemutest.Create(t, "vhdx", f, "8M", "block_size=1M")
	out, code, err := qemutest.RunCode("qemu-io", "-c", "write -P 0x33 0 64k", blkdebugFail(f, 2*mib))
	if err != nil || code == 0 {
		t.Fatalf("qemu-io with an injected BAT write error: exit %d %v: %s", code, err, out)
	}
	cp := filepath.Join(dir, "copy.vhdx")
	b, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cp, b, 0o644); err != nil {
		t.Fatal(err)
	}
	qemutest.Run(t, "qemu-io", "-f", "vhdx", "-c", "flush", cp) // qemu replays the copy
	want := qemutest.Raw(t, "vhdx", cp)
	src := openVHDX(t, nil, f, true)
	defer src.Close()
	if !topImage(src).replayedInMemory {
		t.Fatal("the log was not replayed in memory")
	}
	if fl, _, _, _, err := topImage(src).FileExtent(0, 64<<10); fl != nil || err != nil {
		t.Fatalf("FileExtent maps an image replayed in memory: %v %v", fl, err)
	}
	rawOut := filepath.Join(dir, "out.raw")
	dst := createRaw(t, rawOut, src.Size())
	disktest.ConvertStats(t, ctx, dst, src, vdisk.ConvertOptions{Workers: 2, ChunkSize: 1 << 20})
	disktest.MustClose(t, dst)
	got, err := os.ReadFile(rawOut)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the output differs from what qemu reads after its replay")
	}
	after, err := os.ReadFile(f)
	if err != nil || !bytes.Equal(after, b) {
		t.Fatalf("the read-only source changed: %v", err)
	}
}

// TestCopyFrom calls CopyFrom directly: into present, unallocated,
// ZERO and preallocated ZERO blocks (a qemu fixed image), unaligned,
// inside one block, across blocks, up to the end of the disk; a source
// that ends early returns the short count; into a differencing image
// (whole sectors, partially present blocks), where a copy needing a fill
// and a copy the storage refuses leave the image reading as before.
func TestCopyFrom(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	srcData := disktest.RandomBytes(4<<20, 3, 8)
	sf := disktest.HostFile(t, filepath.Join(dir, "src.bin"), srcData)
	type copyCase struct {
		name          string
		off, n, srcAt int64
	}
	for _, kind := range []string{"dynamic", "qemu-fixed"} {
		t.Run(kind, func(t *testing.T) {
			const size = 6<<20 + 512
			name := filepath.Join(dir, kind+".vhdx")
			var d *vdisk.Disk
			if kind == "qemu-fixed" {
				// Blocks ZERO with their space: a copy zeroes the rest.
				qemutest.Create(t, "vhdx", name, fmt.Sprint(size), "subformat=fixed", "block_size=1M")
				d = openVHDX(t, nil, name, false)
			} else {
				d = createVHDX(t, nil, name, size, "", disktest.KVs("block_size=1M")...)
			}
			m := model.New(size)
			disktest.MustWrite(t, d, m, disktest.Fill(3*4096, 0x11), 0)
			if err := d.WriteZeroes(2<<20, 1<<20, false); err != nil {
				t.Fatal(err)
			}
			im := topImage(d)
			for _, c := range []copyCase{
				{"present, unaligned", 100, 5000, 7},
				{"present into new", 1<<20 - 300, 3 * 4096, 4096},
				{"inside a new block", 4<<20 + 10, 100, 12345},
				{"zero block", 2<<20 + 512, 1024, 99},
				{"across blocks", 3<<20 - 4000, 1<<20 + 8192, 65536},
				{"to the end of the disk", size - 3*4096 - 700, 3*4096 + 700, 1 << 20},
			} {
				n, err := im.CopyFrom(sf, c.srcAt, c.off, c.n)
				if err != nil || n != c.n {
					t.Fatalf("%s: copied %d of %d: %v", c.name, n, c.n, err)
				}
				copy(m.Data[c.off:], srcData[c.srcAt:c.srcAt+c.n])
			}
			short := int64(len(srcData)) - 300
			if n, err := im.CopyFrom(sf, short, 5<<20+8, 1000); err != nil || n != 300 {
				t.Fatalf("short source: copied %d: %v", n, err)
			}
			copy(m.Data[5<<20+8:], srcData[short:])
			if got := disktest.ReadAll(t, d); !bytes.Equal(got, m.Data) {
				t.Fatal("the image reads differently from the model")
			}
			disktest.MustClose(t, d)
			qemuAgrees(t, name, m.Data)
		})
	}
	t.Run("differencing", func(t *testing.T) {
		const size = 4 << 20
		m := model.New(size)
		base := filepath.Join(dir, "dbase.vhdx")
		d := createVHDX(t, nil, base, size, "", disktest.KVs("block_size=1M")...)
		disktest.MustWrite(t, d, m, disktest.Fill(size, 0x61), 0)
		disktest.MustClose(t, d)
		top := filepath.Join(dir, "dtop.vhdx")
		d = createVHDX(t, nil, top, 0, "dbase.vhdx")
		im := topImage(d)
		for _, c := range []copyCase{
			{"sectors of a new block", 512, 1024, 3},
			{"more sectors of it", 64 << 10, 4096, 5000},
			{"a whole block", 1 << 20, 1 << 20, 0},
			{"across blocks", 3<<20 - 1024, 2048 + 512, 777},
		} {
			n, err := im.CopyFrom(sf, c.srcAt, c.off, c.n)
			if err != nil || n != c.n {
				t.Fatalf("%s: copied %d of %d: %v", c.name, n, c.n, err)
			}
			copy(m.Data[c.off:], srcData[c.srcAt:c.srcAt+c.n])
		}
		// Part of a sector the image does not hold needs a fill.
		if _, err := im.CopyFrom(sf, 0, 2<<20+100, 300); !errors.Is(err, driver.ErrUnsupported) {
			t.Fatalf("copy needing a fill: %v", err)
		}
		// A source on another storage: refused, the new block allocated
		// for it shows the parent still.
		mem := memfs.New()
		mf, err := mem.Open("/x", driver.ReadWrite|driver.Create)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := mf.WriteAt(disktest.Fill(8192, 0x7f), 0); err != nil {
			t.Fatal(err)
		}
		if n, err := im.CopyFrom(mf, 0, 2<<20+4096, 8192); n != 0 || !errors.Is(err, driver.ErrUnsupported) {
			t.Fatalf("copy from memfs: copied %d: %v", n, err)
		}
		if got := disktest.ReadAll(t, d); !bytes.Equal(got, m.Data) {
			t.Fatal("the image reads differently from the model")
		}
		disktest.MustClose(t, d)
		d = openVHDX(t, nil, top, true)
		if got := disktest.ReadAll(t, d); !bytes.Equal(got, m.Data) {
			t.Fatal("the image reads differently from the model after reopening")
		}
		if r, err := d.Check(ctx, driver.RepairNone); err != nil || r.Corruptions+r.CheckErrors != 0 {
			t.Fatalf("check: %+v, %v", r, err)
		}
		disktest.MustClose(t, d)
	})
}

// TestCreateOverwrites: a VHDX created over a longer existing file (cut
// to the header section, not to zero) keeps none of the old bytes: a
// fixed image with FULLY_PRESENT blocks and a dynamic one read zeros, and
// qemu checks them clean and compares them equal to zeros.
func TestCreateOverwrites(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	for _, opts := range [][]string{{"block_size=1M"}, {"block_size=1M", "subformat=fixed", "block_state_zero=off"}} {
		t.Run(fmt.Sprint(opts), func(t *testing.T) {
			f := filepath.Join(dir, "over.vhdx")
			if err := os.WriteFile(f, bytes.Repeat([]byte{0xff}, 24<<20), 0o644); err != nil {
				t.Fatal(err)
			}
			const size = 8 << 20
			d, err := vdisk.Create(ctx, f, &vdisk.CreateOptions{Format: "vhdx", Size: size, Options: disktest.KVs(opts...), Overwrite: true})
			if err != nil {
				t.Fatal(err)
			}
			if got := disktest.ReadAll(t, d); !driver.IsZero(got) {
				t.Fatal("the new image shows the old file's bytes")
			}
			disktest.MustClose(t, d)
			if n := fileSize(t, f); n >= 24<<20 {
				t.Fatalf("file of %d bytes: not cut", n)
			}
			qemuAgrees(t, f, make([]byte, size))
		})
	}
}

// These tests check the kernel copy itself, also where the file system
// (ext4, tmpfs, overlayfs in CI) would copy through the page cache, which
// CopyFrom leaves to the read/write path by default.
func init() { osfs.SetCopyRangePolicy(osfs.CopyRangeAlways) }
