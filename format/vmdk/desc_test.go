package vmdk

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// TestDescriptorRoundTrip: a rewrite keeps comments, unknown keys, their
// order, quoting and CRLF line ends, and changes only what was set.
func TestDescriptorRoundTrip(t *testing.T) {
	in := "# Disk DescriptorFile\r\nversion=1\r\nencoding=\"UTF-8\"\r\nCID=fffffffe\r\nparentCID=ffffffff\r\n" +
		"isNativeSnapshot=\"no\"\r\ncreateType=\"vmfs\"\r\n\r\n# Extent description\r\nRW 8 VMFS \"my disk-flat.vmdk\"\r\n" +
		"RDONLY 8 FLAT \"my disk-flat.vmdk\" 8\r\n\r\n# The Disk Data Base \r\n#DDB\r\n\r\nddb.adapterType = \"lsilogic\"\r\n" +
		"ddb.uuid.image = \"6000C29a-1\"\r\nddb.longContentID = \"abc\"\r\nddb.thinProvisioned = \"1\"\r\n"
	d, err := parseDescriptor([]byte(in), "x.vmdk", 0)
	if err != nil {
		t.Fatal(err)
	}
	if string(d.bytes()) != in {
		t.Fatalf("unchanged rewrite differs:\n%q", d.bytes())
	}
	if v, _ := d.get("CREATETYPE"); v != "vmfs" {
		t.Fatalf("createType %q", v)
	}
	if len(d.extents) != 2 || d.extents[0].file != "my disk-flat.vmdk" || d.extents[1].offset != 8 || d.extents[1].access != "RDONLY" {
		t.Fatalf("extents %+v", d.extents)
	}
	d.set("CID", "12345678", false)
	d.set("parentFileNameHint", "base.vmdk", true)
	d.set("ddb.geometry.cylinders", "10", true)
	out := string(d.bytes())
	want := strings.Replace(in, "CID=fffffffe", "CID=12345678", 1)
	want = strings.Replace(want, "createType=\"vmfs\"\r\n", "createType=\"vmfs\"\r\nparentFileNameHint=\"base.vmdk\"\r\n", 1)
	want += "ddb.geometry.cylinders = \"10\"\r\n"
	if out != want {
		t.Fatalf("rewrite:\n%q\nwant\n%q", out, want)
	}
}

// TestVMFSDescriptors: vmfs descriptors (VMFS flat extents) and vmfsSparse
// ones (a COWD delta extent) read.
func TestVMFSDescriptors(t *testing.T) {
	st := memfs.New()
	flat := make([]byte, 16<<10)
	for i := range flat {
		flat[i] = byte(i/512 + 1)
	}
	st.WriteFile("/v-flat.vmdk", flat)
	st.WriteFile("/v.vmdk", []byte("# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"vmfs\"\nRW 32 VMFS \"v-flat.vmdk\"\n"))
	d := openDisk(t, st, "/v.vmdk", true)
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, flat) {
		t.Fatal("vmfs content differs")
	}
	disktest.MustClose(t, d)

	// A COWD extent: 64 sectors, 8-sector grains, one 4096-entry grain
	// table at sector 5, grain 1 stored at sector 37.
	c := make([]byte, 45*512)
	le := binary.LittleEndian
	copy(c, "COWD")
	le.PutUint32(c[4:], 1)
	le.PutUint32(c[8:], 3)
	le.PutUint32(c[12:], 64)
	le.PutUint32(c[16:], 8)
	le.PutUint32(c[20:], 4)
	le.PutUint32(c[24:], 1)
	le.PutUint32(c[4*512:], 5)
	le.PutUint32(c[5*512+4:], 37)
	copy(c[37*512:], bytes.Repeat([]byte{0xc0}, 4096))
	st.WriteFile("/c-delta.vmdk", c)
	st.WriteFile("/c.vmdk", []byte("# Disk DescriptorFile\nversion=1\nCID=2\nparentCID=ffffffff\ncreateType=\"vmfsSparse\"\nRW 64 VMFSSPARSE \"c-delta.vmdk\"\n"))
	d = openDisk(t, st, "/c.vmdk", true)
	got := disktest.ReadAll(t, d)
	want := make([]byte, 64*512)
	copy(want[4096:], bytes.Repeat([]byte{0xc0}, 4096))
	if !bytes.Equal(got, want) {
		t.Fatal("vmfsSparse content differs")
	}
	x, _ := topImage(d).Status(0, 64*512)
	if x.State != driver.Unallocated || x.Length != 4096 {
		t.Fatalf("status %+v", x)
	}
	disktest.MustClose(t, d)
}

// TestCIDOncePerSession: the first write of an open session gives the
// image a new CID, later writes keep it, reads never change it.
func TestCIDOncePerSession(t *testing.T) {
	st := memfs.New()
	d := createDisk(t, st, "/a.vmdk", 1<<20, "")
	c0 := topImage(d).UUID()
	disktest.MustWrite(t, d, nil, disktest.Fill(10, 1), 0)
	if topImage(d).UUID() != c0 {
		t.Fatal("the first write after create changed the CID")
	}
	disktest.MustClose(t, d)
	d = openDisk(t, st, "/a.vmdk", false)
	disktest.ReadAll(t, d)
	if topImage(d).UUID() != c0 {
		t.Fatal("a read changed the CID")
	}
	disktest.MustWrite(t, d, nil, disktest.Fill(10, 2), 0)
	c1 := topImage(d).UUID()
	disktest.MustWrite(t, d, nil, disktest.Fill(10, 3), 70000)
	if c1 == c0 || topImage(d).UUID() != c1 {
		t.Fatalf("CIDs %s %s %s", c0, c1, topImage(d).UUID())
	}
	disktest.MustClose(t, d)
	d = openDisk(t, st, "/a.vmdk", true)
	if topImage(d).UUID() != c1 {
		t.Fatal("the new CID was not stored")
	}
	g, ok := topImage(d).PCHS()
	if !ok || g.Heads != 16 || g.Sectors != 63 {
		t.Fatalf("geometry %+v %v", g, ok)
	}
	disktest.MustClose(t, d)
}

// TestVersion3ReadOnly: an uncompressed version 3 sparse image (VMware's
// changed-block tracking) reads but refuses writes, as in qemu.
func TestVersion3ReadOnly(t *testing.T) {
	b := putU32(smallImage(t), 4, 3)
	st := memfs.New()
	st.WriteFile("/v3.vmdk", b)
	d := openDisk(t, st, "/v3.vmdk", false)
	defer d.Close()
	got := disktest.ReadAll(t, d)
	if !bytes.Equal(got[3000:8000], disktest.Fill(5000, 0x41)) {
		t.Fatal("content differs")
	}
	if _, err := d.WriteAt([]byte{1}, 0); !errors.Is(err, driver.ErrReadOnly) {
		t.Fatalf("write: %v", err)
	}
}

// TestBareSparseFile: a sparse extent file without an embedded descriptor
// (a twoGbMaxExtentSparse extent opened on its own) reads and takes writes
// without anything written over its header.
func TestBareSparseFile(t *testing.T) {
	st := memfs.New()
	d := createDisk(t, st, "/b.vmdk", 3<<20, "", "subformat=twoGbMaxExtentSparse")
	disktest.MustWrite(t, d, nil, disktest.Fill(1000, 0x33), 0)
	disktest.MustClose(t, d)
	// Make the extent's descriptor area absent.
	b, _ := st.ReadFile("/b-s001.vmdk")
	b = putU64(putU64(b, 28, 0), 36, 0)
	st.WriteFile("/b-s001.vmdk", b)
	d = openDisk(t, st, "/b-s001.vmdk", false)
	disktest.MustWrite(t, d, nil, disktest.Fill(1000, 0x44), 1000)
	if err := d.SetUUID(vdisk.UUIDImage, "12345678"); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("SetUUID: %v", err)
	}
	disktest.MustClose(t, d)
	d = openDisk(t, st, "/b.vmdk", true)
	got := disktest.ReadAll(t, d)
	if !bytes.Equal(got[:1000], disktest.Fill(1000, 0x33)) || !bytes.Equal(got[1000:2000], disktest.Fill(1000, 0x44)) {
		t.Fatal("content differs")
	}
	disktest.MustClose(t, d)
}
