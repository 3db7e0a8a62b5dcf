package vmdk

import (
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/storage/memfs"
)

// smallImage returns the bytes of a small monolithic sparse image (1 MiB,
// two grains written) made by vdisk.
func smallImage(t testing.TB, opts ...string) []byte {
	t.Helper()
	return sparseImage(t, 1<<20, opts...)
}

// sparseImage makes a monolithic sparse image of size bytes with two
// written grains (and a zeroed grain with zeroed_grain=on).
func sparseImage(t testing.TB, size int64, opts ...string) []byte {
	st := memfs.New()
	d := createDisk(t, st, "/s.vmdk", size, "", opts...)
	disktest.MustWrite(t, d, nil, disktest.Fill(int(min(5000, size/16)), 0x41), 3000)
	disktest.MustWrite(t, d, nil, disktest.Fill(512, 0x42), size-size/8)
	if strings.Contains(strings.Join(opts, ","), "zeroed_grain=on") {
		if err := d.WriteZeroes(size/4, defaultGrain, true); err != nil {
			t.Fatal(err)
		}
	}
	disktest.MustClose(t, d)
	b, err := st.ReadFile("/s.vmdk")
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// streamImage returns a small streamOptimized image made by vdisk.
func streamImage(t testing.TB, size int64) []byte {
	t.Helper()
	st := memfs.New()
	d := createDisk(t, st, "/s.vmdk", size, "", "subformat=streamOptimized")
	disktest.MustWrite(t, d, nil, []byte(strings.Repeat("stream-optimized grain ", int(size/100))), 0)
	disktest.MustWrite(t, d, nil, disktest.Fill(512, 0x42), size*2/3)
	disktest.MustClose(t, d)
	b, err := st.ReadFile("/s.vmdk")
	if err != nil {
		t.Fatal(err)
	}
	return b
}

const flatDesc = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n" +
	"RW 128 FLAT \"f-flat.vmdk\" 0\nRW 64 ZERO\nRDONLY 64 FLAT \"f-flat.vmdk\" 64\n\nddb.adapterType = \"ide\"\n"

// openBytes opens b as /f.vmdk (next to a 64 KiB flat extent file
// f-flat.vmdk) with the driver, then walks the status, reads, checks and,
// read-write, writes. It returns the open error.
func openBytes(t testing.TB, b []byte, rw bool) error {
	st := memfs.New()
	st.WriteFile("/img/f.vmdk", b)
	st.WriteFile("/img/f-flat.vmdk", disktest.Fill(8<<10, 0x5f))
	st.WriteFile("/etc/passwd", disktest.Fill(8<<10, 0x66))
	img, err := Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/img/f.vmdk", ReadOnly: !rw})
	if err != nil {
		return err
	}
	defer img.Close()
	size := img.Size()
	buf := make([]byte, 64<<10)
	steps := 0
	for off := int64(0); off < size && steps < 64; steps++ {
		x, err := img.Status(off, size-off)
		if err != nil {
			break
		}
		if err := driver.CheckExtent("vmdk", "image", off, size-off, x); err != nil {
			t.Fatal(err)
		}
		n := min(x.Length, int64(len(buf)))
		img.ReadAt(buf[:n], off)
		off += x.Length
	}
	img.(driver.Checker).Check(ctx, driver.RepairNone)
	img.Info()
	img.Parent()
	if rw && size > 0 {
		img.WriteAt(disktest.Fill(3000, 7), size/3)
		img.(driver.Zeroer).WriteZeroes(0, min(size, 70000), true)
		img.ReadAt(buf[:min(size, int64(len(buf)))], 0)
		img.Flush()
	}
	return nil
}

func putU64(b []byte, off int, v uint64) []byte {
	c := append([]byte(nil), b...)
	binary.LittleEndian.PutUint64(c[off:], v)
	return c
}

func putU32(b []byte, off int, v uint32) []byte {
	c := append([]byte(nil), b...)
	binary.LittleEndian.PutUint32(c[off:], v)
	return c
}

// TestHostile: malformed headers and descriptors fail to open with an
// error naming the file and the problem (never a panic or a huge
// allocation); metadata pointing outside the file fails on access.
func TestHostile(t *testing.T) {
	good := smallImage(t)
	var h header
	h.decode(good)
	gdOff := int(h.gdOffset) * sectorSize
	gt0 := int(binary.LittleEndian.Uint32(good[gdOff:])) * sectorSize
	manyExt := "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\n" + strings.Repeat("RW 1 ZERO\n", maxExtents+1)
	desc := func(s string) []byte { return []byte(s) }
	for _, c := range []struct {
		name string
		b    []byte
		want error // nil: must open; the access test below must fail or pass cleanly
	}{
		{"grain size 0", putU64(good, 20, 0), driver.ErrCorrupt},
		{"grain not power of two", putU64(good, 20, 100), driver.ErrCorrupt},
		{"grain huge", putU64(good, 20, 1<<40), driver.ErrCorrupt},
		{"no GTEs", putU32(good, 44, 0), driver.ErrCorrupt},
		{"GTEs > 512", putU32(good, 44, 4096), driver.ErrCorrupt},
		{"GD past EOF", putU64(good, 56, 1<<30), driver.ErrCorrupt},
		{"RGD past EOF", putU64(good, 48, 1<<30), driver.ErrCorrupt},
		{"capacity huge", putU64(good, 12, 1<<60), driver.ErrCorrupt},
		{"GT count overflow", putU64(putU64(good, 12, 1<<40), 20, 1), driver.ErrCorrupt},
		{"version 4", putU32(good, 4, 4), driver.ErrUnsupported},
		{"descriptor huge", putU64(good, 36, 1<<40), driver.ErrCorrupt},
		{"descriptor past EOF", putU64(good, 28, 1<<20), driver.ErrCorrupt},
		{"GD at end without footer", putU64(good, 56, gdAtEnd), driver.ErrCorrupt},
		{"compression 7", append(putU32(good, 77, 7)[:77:77], append([]byte{7, 0}, good[79:]...)...), driver.ErrUnsupported},
		{"GT past EOF", putU32(good, gdOff, 1<<30), nil},
		{"grain past EOF", putU32(good, gt0, 1<<30), nil},
		{"grain into header", putU32(good, gt0, 0), nil},
		{"descriptor without extents", desc("# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\n"), driver.ErrCorrupt},
		{"no createType", desc("# Disk DescriptorFile\nversion=1\nRW 8 FLAT \"f-flat.vmdk\" 0\n"), driver.ErrCorrupt},
		{"too many extents", desc(manyExt), driver.ErrCorrupt},
		{"extent size garbage", desc("# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\nRW x FLAT \"f-flat.vmdk\" 0\n"), driver.ErrCorrupt},
		{"extent size huge", desc("# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\nRW 99999999999999999 FLAT \"f-flat.vmdk\" 0\n"), driver.ErrCorrupt},
		{"extents sum huge", desc("# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\n" + strings.Repeat("RW 2000000000000 ZERO\n", 2000)), driver.ErrCorrupt},
		{"unknown extent type", desc("# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\nRW 8 WEIRD \"f-flat.vmdk\"\n"), driver.ErrCorrupt},
		{"absolute extent", desc("# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"/etc/passwd\" 0\n"), driver.ErrInvalidOption},
		{"absolute extent inside the image's directory", desc("# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"/img/f-flat.vmdk\" 0\n"), nil},
		{"dotdot extent", desc("# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"../x/f-flat.vmdk\" 0\n"), driver.ErrInvalidOption},
		{"missing extent", desc("# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"nope.vmdk\" 0\n"), driver.ErrNotFound},
		{"fullDevice", desc("# Disk DescriptorFile\ncreateType=\"fullDevice\"\nRW 8 FLAT \"/dev/sda\" 0\n"), driver.ErrUnsupported},
		{"partitionedDevice", desc("# Disk DescriptorFile\ncreateType=\"partitionedDevice\"\nRW 8 FLAT \"f-flat.vmdk\" 0\n"), driver.ErrUnsupported},
		{"sparse extent is a text file", desc("# Disk DescriptorFile\ncreateType=\"monolithicSparse\"\nRW 8 SPARSE \"f-flat.vmdk\"\n"), driver.ErrCorrupt},
		{"extent is the descriptor", desc("# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"f.vmdk\" 0\n"), driver.ErrCorrupt},
		{"bad CID", desc("# Disk DescriptorFile\nCID=zz\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"f-flat.vmdk\" 0\n"), driver.ErrCorrupt},
		{"flat, zero and read-only extents", desc(flatDesc), nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := openBytes(t, c.b, true)
			if c.want == nil {
				if err != nil {
					t.Fatalf("open: %v", err)
				}
				return
			}
			if !errors.Is(err, c.want) {
				t.Fatalf("open: %v, want %v", err, c.want)
			}
			if !strings.Contains(err.Error(), ".vmdk") && !strings.Contains(err.Error(), "/") {
				t.Fatalf("error does not name the file: %v", err)
			}
		})
	}
	// Descriptor files larger than the limit.
	big := append([]byte("# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\n"), make([]byte, maxDescriptor)...)
	if err := openBytes(t, big, false); !errors.Is(err, driver.ErrCorrupt) {
		t.Fatalf("huge descriptor: %v", err)
	}
	// A grain past EOF is reported by reads and by check.
	st := memfs.New()
	st.WriteFile("/f.vmdk", putU32(good, gt0, 1<<30))
	img, err := Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/f.vmdk", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.ReadAt(make([]byte, 512), 0); !errors.Is(err, driver.ErrCorrupt) {
		t.Fatalf("read of a grain past EOF: %v", err)
	}
	res, err := img.(driver.Checker).Check(ctx, driver.RepairNone)
	if err != nil || res.Corruptions == 0 {
		t.Fatalf("check: %+v %v", res, err)
	}
	img.Close()

	// Check finds two entries sharing a grain, and a grain in the
	// directory; a redundant table lagging behind the primary (what a
	// writer killed between the two copies' writes leaves) is a warning.
	rgdOff := int(h.rgdOffset) * sectorSize
	rgt0 := int(binary.LittleEndian.Uint32(good[rgdOff:])) * sectorSize
	g0 := binary.LittleEndian.Uint32(good[gt0:])
	{
		st := memfs.New()
		st.WriteFile("/f.vmdk", putU32(good, rgt0+8, 12345))
		img, err := Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/f.vmdk", ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		res, err := img.(driver.Checker).Check(ctx, driver.RepairNone)
		if err != nil || res.Corruptions != 0 || len(res.Messages) != 1 || !strings.Contains(res.Messages[0], "redundant grain table 0 differs") {
			t.Fatalf("rgt differs: check: %+v %q %v", res, res.Messages, err)
		}
		img.Close()
	}
	for name, b := range map[string][]byte{
		"shared grain": putU32(putU32(good, gt0+40, g0), rgt0+40, g0),
		"into GD":      putU32(putU32(good, gt0+40, uint32(h.gdOffset)), rgt0+40, uint32(h.gdOffset)),
	} {
		st := memfs.New()
		st.WriteFile("/f.vmdk", b)
		img, err := Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/f.vmdk", ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		res, err := img.(driver.Checker).Check(ctx, driver.RepairNone)
		if err != nil || res.Corruptions == 0 {
			t.Fatalf("%s: check: %+v %v", name, res, err)
		}
		t.Logf("%s: %q", name, res.Messages)
		img.Close()
	}
	// A clean image checks clean.
	st = memfs.New()
	st.WriteFile("/f.vmdk", good)
	img, err = Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/f.vmdk", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if res, err := img.(driver.Checker).Check(ctx, driver.RepairNone); err != nil || res.Corruptions != 0 || res.AllocatedClusters != 2 {
		t.Fatalf("clean check: %+v %v", res, err)
	}
	img.Close()
}

// TestFlatZeroReadOnlyExtents: a descriptor mixing flat extents with an
// offset, a ZERO extent and a read-only extent reads and refuses writes
// where it must.
func TestFlatZeroReadOnlyExtents(t *testing.T) {
	st := memfs.New()
	st.WriteFile("/f.vmdk", []byte(flatDesc))
	flat := make([]byte, 64<<10)
	for i := range flat {
		flat[i] = byte(i / 512)
	}
	st.WriteFile("/f-flat.vmdk", flat)
	d := openDisk(t, st, "/f.vmdk", false)
	defer d.Close()
	if d.Size() != 256*512 {
		t.Fatalf("size %d", d.Size())
	}
	want := model.New(256 * 512)
	copy(want.Data, flat)
	copy(want.Data[192*512:], flat[64*512:])
	if got := disktest.ReadAll(t, d); string(got) != string(want.Data) {
		t.Fatal("content differs")
	}
	if _, err := d.WriteAt([]byte{1}, 130*512); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("write into a ZERO extent: %v", err)
	}
	if _, err := d.WriteAt([]byte{1}, 200*512); !errors.Is(err, driver.ErrReadOnly) {
		t.Fatalf("write into a RDONLY extent: %v", err)
	}
	disktest.MustWrite(t, d, nil, []byte{0xff}, 5)
	res, err := d.Check(ctx, driver.RepairNone)
	if err != nil || res.Corruptions != 0 {
		t.Fatalf("check: %+v %v", res, err)
	}
	st.WriteFile("/f-flat.vmdk", flat[:60<<10])
	if res, err := d.Check(ctx, driver.RepairNone); err != nil || res.Corruptions != 2 {
		t.Fatalf("check of a short flat file: %+v %v", res, err)
	}
	x, err := topImage(d).Status(128*512, 256*512-128*512)
	if err != nil || x.State != driver.Zero || x.Length != 64*512 {
		t.Fatalf("status of the zero extent %+v %v", x, err)
	}
}
