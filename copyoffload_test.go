package vdisk_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/osfs"
)

// offloadSource makes a sparse raw image with qemu-io: data runs at
// aligned and unaligned offsets, up to the end, and holes between.
func offloadSource(t *testing.T, dir string) (name string, data int64) {
	t.Helper()
	name = filepath.Join(dir, "src.raw")
	qemutest.Create(t, "raw", name, "64M")
	qemutest.IO(t, "raw", name,
		"write -P 0xaa 0 1M",
		"write -P 0x55 3M 64k",
		"write -P 0x11 10485860 3000", // unaligned, inside one 4 KiB block
		"write -P 0x22 20M 5M",
		"write -P 0x33 63M 1M")
	src := openRO(t, name)
	defer src.Close()
	if err := src.Map(ctx, 0, src.Size(), func(e vdisk.Extent) error {
		if e.IsData() {
			data += e.Length
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return name, data
}

// dataExtents lists the extents of an image that hold data.
func dataExtents(t *testing.T, name, format string) []vdisk.Extent {
	t.Helper()
	d, err := vdisk.Open(ctx, name, &vdisk.OpenOptions{Format: format, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	var ext []vdisk.Extent
	if err := d.Map(ctx, 0, d.Size(), func(e vdisk.Extent) error {
		if e.IsData() {
			e.File = "" // the outputs' names differ
			ext = append(ext, e)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return ext
}

func openRO(t *testing.T, name string) *vdisk.Disk {
	t.Helper()
	d, err := vdisk.Open(ctx, name, &vdisk.OpenOptions{Format: "raw", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// dataRuns is qemu-img map's data runs of a raw file.
func dataRuns(t *testing.T, name string) [][2]int64 {
	var out [][2]int64
	for _, e := range qemutest.Map(t, "raw", name) {
		if !e.Data {
			continue
		}
		if k := len(out); k > 0 && out[k-1][1] == e.Start {
			out[k-1][1] += e.Length
			continue
		}
		out = append(out, [2]int64{e.Start, e.Start + e.Length})
	}
	return out
}

func allocated(t *testing.T, name string) int64 {
	fi, err := os.Stat(name)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Blocks * 512
}

// TestConvertOffloadRaw: raw to raw on one local file system is copied by
// the kernel (copy_file_range, or reflinks where the file system shares
// blocks), in order or not: the output is qemu-img compare-identical,
// holes stay holes (same qemu-img map data runs, no more allocation than
// the source) and the stats count every data byte as offloaded.
func TestConvertOffloadRaw(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	srcName, data := offloadSource(t, dir)
	for _, seq := range []bool{true, false} {
		t.Run(fmt.Sprint("sequential=", seq), func(t *testing.T) {
			out := filepath.Join(dir, fmt.Sprintf("out-%v.raw", seq))
			src := openRO(t, srcName)
			defer src.Close()
			dst, err := vdisk.Create(ctx, out, &vdisk.CreateOptions{Format: "raw", Size: src.Size()})
			if err != nil {
				t.Fatal(err)
			}
			var st vdisk.ConvertStats
			err = vdisk.Convert(ctx, dst, src, &vdisk.ConvertOptions{Sequential: seq, Workers: 4, ChunkSize: 1 << 20, Stats: &st})
			if cerr := dst.CloseUnsynced(); err == nil {
				err = cerr
			}
			if err != nil {
				t.Fatal(err)
			}
			if st.Offloaded != data || st.Written != 0 || st.Zero != src.Size()-data {
				t.Fatalf("stats %+v; want %d offloaded, 0 written, %d zero", st, data, src.Size()-data)
			}
			if !qemutest.Compare(t, "raw", srcName, "raw", out) {
				t.Fatal("qemu-img compare: the output differs from the source")
			}
			if a, b := dataRuns(t, srcName), dataRuns(t, out); fmt.Sprint(a) != fmt.Sprint(b) {
				t.Fatalf("data runs differ:\nsource %v\noutput %v", a, b)
			}
			if a, b := allocated(t, srcName), allocated(t, out); b > a {
				t.Fatalf("output allocates %d bytes, the source %d", b, a)
			}
		})
	}
}

// refusingFS is osfs whose files refuse kernel copies the way osfs reports
// EXDEV/ENOSYS (driver.ErrUnsupported, nothing copied): after allow
// successful copies, every copy is refused.
type refusingFS struct {
	driver.Storage
	errno syscall.Errno
	allow int64
	calls atomic.Int64
}

type refusingFile struct {
	*osfs.File
	fs *refusingFS
}

func (r *refusingFS) Open(name string, flag driver.OpenFlag) (driver.File, error) {
	f, err := r.Storage.Open(name, flag)
	if err != nil {
		return nil, err
	}
	return &refusingFile{File: f.(*osfs.File), fs: r}, nil
}

func (f *refusingFile) CopyFrom(src driver.File, srcOff, off, n int64) (int64, error) {
	if f.fs.calls.Add(1) > f.fs.allow {
		return 0, &driver.Error{Op: "copy", File: f.Name(), Offset: off, Err: fmt.Errorf("%w: %w", driver.ErrUnsupported, f.fs.errno)}
	}
	if r, ok := src.(*refusingFile); ok {
		src = r.File
	}
	return f.File.CopyFrom(src, srcOff, off, n)
}

// TestConvertOffloadFallback: when the kernel refuses the copy (EXDEV
// between file systems, ENOSYS on old kernels), convert reads and writes
// instead, from the first refusal on, with identical output.
func TestConvertOffloadFallback(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	srcName, data := offloadSource(t, dir)
	for _, c := range []struct {
		name  string
		errno syscall.Errno
		allow int64
	}{
		{"exdev", syscall.EXDEV, 0},
		{"enosys", syscall.ENOSYS, 0},
		{"exdev-after-two", syscall.EXDEV, 2},
	} {
		t.Run(c.name, func(t *testing.T) {
			fs := &refusingFS{Storage: osfs.New(), errno: c.errno, allow: c.allow}
			out := filepath.Join(dir, c.name+".raw")
			src, err := vdisk.Open(ctx, srcName, &vdisk.OpenOptions{Format: "raw", ReadOnly: true, Storage: fs})
			if err != nil {
				t.Fatal(err)
			}
			defer src.Close()
			dst, err := vdisk.Create(ctx, out, &vdisk.CreateOptions{Format: "raw", Size: src.Size(), Storage: fs})
			if err != nil {
				t.Fatal(err)
			}
			var st vdisk.ConvertStats
			err = vdisk.Convert(ctx, dst, src, &vdisk.ConvertOptions{Sequential: true, Workers: 4, ChunkSize: 1 << 20, Stats: &st})
			if cerr := dst.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				t.Fatal(err)
			}
			if st.Offloaded+st.Written != data || (c.allow == 0) != (st.Offloaded == 0) || st.Written == 0 {
				t.Fatalf("stats %+v; want %d bytes of data, offloaded only by the allowed copies", st, data)
			}
			// Sequential: the allowed copies, then one refusal, then none.
			if got := fs.calls.Load(); got != c.allow+1 {
				t.Fatalf("%d copy attempts, want %d: a refusal must stop offload", got, c.allow+1)
			}
			if !qemutest.Compare(t, "raw", srcName, "raw", out) {
				t.Fatal("qemu-img compare: the output differs from the source")
			}
			if a, b := dataRuns(t, srcName), dataRuns(t, out); fmt.Sprint(a) != fmt.Sprint(b) {
				t.Fatalf("data runs differ:\nsource %v\noutput %v", a, b)
			}
		})
	}
}

// TestConvertOffloadOverExisting: onto an existing target that does not
// read as zeros (-n), data is offloaded and the source's holes are
// written as zeroes.
func TestConvertOffloadOverExisting(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	srcName, data := offloadSource(t, dir)
	out := filepath.Join(dir, "old.raw")
	if err := os.WriteFile(out, bytes.Repeat([]byte{0xff}, 64<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	src := openRO(t, srcName)
	defer src.Close()
	dst, err := vdisk.Open(ctx, out, &vdisk.OpenOptions{Format: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	var st vdisk.ConvertStats
	err = vdisk.Convert(ctx, dst, src, &vdisk.ConvertOptions{TargetNotZero: true, Sequential: true, Stats: &st})
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	if st.Offloaded != data || st.Zero != src.Size()-data {
		t.Fatalf("stats %+v; want %d offloaded, %d zeroed", st, data, src.Size()-data)
	}
	if !qemutest.Compare(t, "raw", srcName, "raw", out) {
		t.Fatal("qemu-img compare: the output differs from the source")
	}
}

// hdrFormat is a test format shaped like a fixed VHD or a VDI data area:
// a 4 KiB header, then the disk byte for byte. Its Status calls everything
// data (it does not look at the file's holes) and FileExtent says so
// (holes = true), so convert must find the holes itself.
var hdrFormat = &driver.Format{
	Name: "offloadtest",
	Caps: driver.CapCreateFixed,
	Open: func(ctx context.Context, p *driver.OpenParams) (driver.Image, error) {
		f, err := p.Storage.Open(p.Name, driver.ReadOnly)
		if err != nil {
			return nil, err
		}
		sz, err := f.Size()
		if err != nil || sz < hdrSize {
			f.Close()
			return nil, driver.Corruptf(p.Name, 0, "no header")
		}
		return &hdrImage{f: f, size: sz - hdrSize}, nil
	},
}

const hdrSize = 4096

func init() { driver.Register(hdrFormat) }

type hdrImage struct {
	f    driver.File
	size int64
}

func (im *hdrImage) Size() int64 { return im.size }
func (im *hdrImage) Status(off, n int64) (driver.Extent, error) {
	return driver.Extent{State: driver.Data, Length: n, Offset: hdrSize + off}, nil
}
func (im *hdrImage) ReadAt(p []byte, off int64) (int, error) { return im.f.ReadAt(p, hdrSize+off) }
func (im *hdrImage) WriteAt(p []byte, off int64) (int, error) {
	return 0, driver.Errorf(driver.ErrReadOnly, im.f.Name(), off, "read-only test format")
}
func (im *hdrImage) Flush() error { return nil }
func (im *hdrImage) Close() error { return im.f.Close() }
func (im *hdrImage) Info() driver.Info {
	return driver.Info{Format: "offloadtest", VirtualSize: im.size}
}
func (im *hdrImage) Parent() *driver.ParentRef { return nil }
func (im *hdrImage) FileExtent(off, n int64) (driver.File, int64, int64, bool, error) {
	return im.f, hdrSize + off, n, true, nil
}

// TestConvertOffloadFindsFileHoles: a source whose data area has holes
// its Status does not show (a VHD block written in part) is copied by the
// kernel where it holds data, and its holes stay holes on the raw target,
// unread; with offload off they are still not read (zero-bytes, no
// writes), and the outputs are identical to the source.
func TestConvertOffloadFindsFileHoles(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	rawName, data := offloadSource(t, dir)
	name := filepath.Join(dir, "src.hdr")
	f, err := os.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.Open(rawName)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	f.Write(bytes.Repeat([]byte{0xee}, hdrSize))
	// Copy the data runs only, keeping the holes.
	src := openRO(t, rawName)
	err = src.Map(ctx, 0, src.Size(), func(e vdisk.Extent) error {
		if !e.IsData() {
			return nil
		}
		p := make([]byte, e.Length)
		if _, err := raw.ReadAt(p, e.Start); err != nil {
			return err
		}
		_, err := f.WriteAt(p, hdrSize+e.Start)
		return err
	})
	src.Close()
	if err == nil {
		err = f.Truncate(hdrSize + 64<<20)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []bool{false, true} {
		t.Run(fmt.Sprint("nooffload=", off), func(t *testing.T) {
			s, err := vdisk.Open(ctx, name, &vdisk.OpenOptions{Format: "offloadtest", ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			out := filepath.Join(dir, fmt.Sprintf("holes-%v.raw", off))
			dst, err := vdisk.Create(ctx, out, &vdisk.CreateOptions{Format: "raw", Size: s.Size()})
			if err != nil {
				t.Fatal(err)
			}
			var st vdisk.ConvertStats
			err = vdisk.Convert(ctx, dst, s, &vdisk.ConvertOptions{Sequential: true, NoOffload: off, Stats: &st})
			if cerr := dst.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				t.Fatal(err)
			}
			want := vdisk.ConvertStats{Offloaded: data, Zero: s.Size() - data}
			if off {
				want = vdisk.ConvertStats{Read: data, Written: data, Zero: s.Size() - data}
			}
			if st.Elapsed <= 0 {
				t.Fatalf("stats %+v: no elapsed time", st)
			}
			st.Elapsed = 0
			if st != want {
				t.Fatalf("stats %+v, want %+v", st, want)
			}
			if !qemutest.Compare(t, "raw", rawName, "raw", out) {
				t.Fatal("qemu-img compare: the output differs from the source")
			}
			if a, b := dataRuns(t, rawName), dataRuns(t, out); fmt.Sprint(a) != fmt.Sprint(b) {
				t.Fatalf("data runs differ:\nsource %v\noutput %v", a, b)
			}
		})
	}
}

// These tests check the kernel copy itself, also where the file system
// (ext4, tmpfs, overlayfs in CI) would copy through the page cache, which
// CopyFrom leaves to the read/write path by default.
func init() { osfs.SetCopyRangePolicy(osfs.CopyRangeAlways) }

// seekCountFS is osfs whose files count SEEK_HOLE calls.
type seekCountFS struct {
	driver.Storage
	holes atomic.Int64
}

type seekCountFile struct {
	*osfs.File
	fs *seekCountFS
}

func (s *seekCountFS) Open(name string, flag driver.OpenFlag) (driver.File, error) {
	f, err := s.Storage.Open(name, flag)
	if err != nil {
		return nil, err
	}
	return &seekCountFile{File: f.(*osfs.File), fs: s}, nil
}

func (f *seekCountFile) SeekHole(off int64) (int64, error) {
	f.fs.holes.Add(1)
	return f.File.SeekHole(off)
}

// TestConvertOffloadSeeksOnce: the pieces of a dynamic VHD's blocks ask
// the file for holes, but one SEEK_HOLE answer covers all the pieces it
// found data for. On XFS, where qemu-img leaves unwritten extents in a
// VHD's file, each SEEK_HOLE walks the page cache to the file's end: asked
// once per piece, a 2 GiB image took 5.8 s to convert instead of 0.7 s.
// The output is the same.
func TestConvertOffloadSeeksOnce(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	raw := filepath.Join(dir, "full.raw")
	qemutest.Create(t, "raw", raw, "64M")
	qemutest.IO(t, "raw", raw, "write -P 0x5a 0 64M")
	vhd := filepath.Join(dir, "full.vhd")
	qemutest.Img(t, "convert", "-q", "-f", "raw", "-O", "vpc", raw, vhd)
	fs := &seekCountFS{Storage: osfs.New()}
	src, err := vdisk.Open(ctx, vhd, &vdisk.OpenOptions{Format: "vpc", ReadOnly: true, Storage: fs})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	const workers = 4
	out := filepath.Join(dir, "out.raw")
	st := convertToRaw(t, src, out, vdisk.ConvertOptions{Workers: workers, ChunkSize: 1 << 20})
	if st.Offloaded+st.Written < 64<<20 {
		t.Fatalf("stats %+v: want all 64 MiB copied", st)
	}
	// Each worker's first piece may ask before any answer is known.
	if n := fs.holes.Load(); n == 0 || n > workers {
		t.Fatalf("%d SEEK_HOLE calls for 64 pieces of one data run; want 1 to %d", n, workers)
	}
	if !qemutest.Compare(t, "vpc", vhd, "raw", out) {
		t.Fatal("qemu-img compare: the output differs from the source")
	}
}

// TestConvertOffloadRefused: a target that allocates a block for a kernel
// copy must give it back when the copy is refused (here on the first
// attempt, as ext4 refuses it by default) and the convert reads and
// writes instead. The source's first data piece reads zeros, which the
// read/write path skips, so nothing else ever fills that block. The
// output must equal one made without offload: size and qemu-img's map
// and vdisk's (a VHD kept a block-sized gap holding a stale footer; a VHDX
// kept block 0 allocated and present, reading zeros: qemu does not map
// VHDX).
func TestConvertOffloadRefused(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	srcName := filepath.Join(dir, "src.raw")
	qemutest.Create(t, "raw", srcName, "64M")
	qemutest.IO(t, "raw", srcName,
		"write -P 0 0 1M", // data that reads zeros, alone in its block
		"write -P 0x55 9M 64k",
		"write -P 0x22 20M 5M",
		"write -P 0x33 63M 1M")
	for _, format := range []string{"vpc", "vhdx", "qed", "parallels"} {
		t.Run(format, func(t *testing.T) {
			sizes := map[bool]int64{}
			maps := map[bool][]qemutest.MapEntry{}
			extents := map[bool][]vdisk.Extent{}
			for _, refuse := range []bool{true, false} {
				out := filepath.Join(dir, fmt.Sprintf("out-%v.%s", refuse, format))
				fs := &refusingFS{Storage: osfs.New(), errno: syscall.EOPNOTSUPP}
				src := openRO(t, srcName)
				// Sequential: the first copy refused is the first block's.
				st := convertInto(t, src, out, vdisk.CreateOptions{Format: format, Storage: fs},
					vdisk.ConvertOptions{Sequential: true, Workers: 4, ChunkSize: 1 << 20, NoOffload: !refuse})
				src.Close()
				if st.Offloaded != 0 || st.Written == 0 {
					t.Fatalf("refuse=%v: stats %+v; want everything written", refuse, st)
				}
				if refuse && fs.calls.Load() == 0 {
					t.Fatal("no copy was offered to the storage")
				}
				fi, err := os.Stat(out)
				if err != nil {
					t.Fatal(err)
				}
				sizes[refuse] = fi.Size()
				maps[refuse] = qemutest.Map(t, format, out)
				extents[refuse] = dataExtents(t, out, format)
				if !qemutest.Compare(t, "raw", srcName, format, out) {
					t.Fatalf("refuse=%v: qemu-img compare: the output differs from the source", refuse)
				}
				if format != "vpc" {
					qemutest.Check(t, format, out)
				}
			}
			if sizes[true] != sizes[false] {
				t.Errorf("the %s written after a refused copy is %d bytes, without offload %d", format, sizes[true], sizes[false])
			}
			if !reflect.DeepEqual(extents[true], extents[false]) {
				t.Errorf("vdisk's map after a refused copy:\n%+v\nwithout offload:\n%+v", extents[true], extents[false])
			}
			if !reflect.DeepEqual(maps[true], maps[false]) {
				t.Errorf("qemu-img map after a refused copy:\n%+v\nwithout offload:\n%+v", maps[true], maps[false])
			}
		})
	}
}
