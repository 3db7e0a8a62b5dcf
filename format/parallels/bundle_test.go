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
)

const (
	guidBase = "{5fbaabe3-6958-40ff-92a7-860e329aab41}"
	guidTop  = "{1a2b3c4d-0000-4000-8000-000000000001}"
)

// descriptorXML writes a DiskDescriptor.xml naming the given images (GUID,
// type, file); the first is the base of the snapshot chain.
func descriptorXML(sectors int64, imgs ...[3]string) string {
	var im, shots strings.Builder
	parent := zeroGUID
	for _, i := range imgs {
		fmt.Fprintf(&im, "      <Image>\n        <GUID>%s</GUID>\n        <Type>%s</Type>\n        <File>%s</File>\n      </Image>\n", i[0], i[1], i[2])
		fmt.Fprintf(&shots, "    <Shot>\n      <GUID>%s</GUID>\n      <ParentGUID>%s</ParentGUID>\n    </Shot>\n", i[0], parent)
		parent = i[0]
	}
	return fmt.Sprintf(`<?xml version='1.0' encoding='UTF-8'?>
<Parallels_disk_image Version="1.0">
  <Disk_Parameters>
    <Disk_size>%d</Disk_size>
    <Cylinders>16</Cylinders>
    <PhysicalSectorSize>512</PhysicalSectorSize>
    <Heads>16</Heads>
    <Sectors>32</Sectors>
    <Padding>0</Padding>
    <UID>{9a2c7ef4-6c46-4a4d-8b6f-6a0d8e6b1b11}</UID>
    <Name>disk</Name>
  </Disk_Parameters>
  <StorageData>
    <Storage>
      <Start>0</Start>
      <End>%d</End>
      <Blocksize>2048</Blocksize>
%s    </Storage>
  </StorageData>
  <Snapshots>
%s  </Snapshots>
</Parallels_disk_image>
`, sectors, sectors, im.String(), shots.String())
}

// TestBundle: a Parallels bundle (a directory with DiskDescriptor.xml and
// the .hds image qemu made) opens by directory and by descriptor name and
// reads what qemu reads from the .hds; the base of a snapshot chain and a
// Plain (flat) image open too; writes are refused.
func TestBundle(t *testing.T) {
	qemutest.Require(t)
	dir := filepath.Join(t.TempDir(), "disk.hdd")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	hds := "disk.hdd.0." + guidBase + ".hds"
	qemutest.Create(t, "parallels", filepath.Join(dir, hds), "8M", "cluster_size=64k")
	qemutest.IO(t, "parallels", filepath.Join(dir, hds), "write -P 0x3c 1M 100k", "write -P 0x3d 7M 4k")
	want := qemutest.Raw(t, "parallels", filepath.Join(dir, hds))
	desc := filepath.Join(dir, descriptorName)
	disktest.WriteFile(t, desc, []byte(descriptorXML(8<<11, [3]string{guidBase, "Compressed", hds})))

	for _, o := range []struct {
		name, format string
	}{{dir, "parallels"}, {desc, ""}, {desc, "parallels"}} {
		d, err := vdisk.Open(ctx, o.name, &vdisk.OpenOptions{Format: o.format, ReadOnly: true})
		if err != nil {
			t.Fatalf("open %s: %v", o.name, err)
		}
		if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
			t.Fatalf("%s: content differs from the .hds", o.name)
		}
		if s := d.Top().Info().Specific.(*Info); s.Descriptor == "" {
			t.Fatalf("%s: info does not name the descriptor", o.name)
		}
		disktest.MustClose(t, d)
	}
	if _, err := vdisk.Open(ctx, desc, nil); !errors.Is(err, driver.ErrReadOnly) {
		t.Fatalf("read-write open of a bundle: %v", err)
	}

	// A snapshot chain: the base opens.
	top := "disk.hdd.0." + guidTop + ".hds"
	qemutest.Create(t, "parallels", filepath.Join(dir, top), "8M")
	qemutest.IO(t, "parallels", filepath.Join(dir, top), "write -P 0x77 0 1M")
	disktest.WriteFile(t, desc, []byte(descriptorXML(8<<11, [3]string{guidBase, "Compressed", hds}, [3]string{guidTop, "Compressed", top})))
	d, err := vdisk.Open(ctx, dir, &vdisk.OpenOptions{Format: "parallels", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
		t.Fatal("chain: the base is not what opened")
	}
	disktest.MustClose(t, d)

	// A Plain image: a flat file of Disk_size sectors.
	flat := bytes.Repeat([]byte{1, 2, 3, 4}, 1<<18)
	disktest.WriteFile(t, filepath.Join(dir, "flat.hds"), flat)
	disktest.WriteFile(t, desc, []byte(descriptorXML(int64(len(flat))/512, [3]string{guidBase, "Plain", "flat.hds"})))
	d, err = vdisk.Open(ctx, dir, &vdisk.OpenOptions{Format: "parallels", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, flat) {
		t.Fatal("plain image content")
	}
	disktest.MustClose(t, d)
}

// TestHostileBundles: descriptors naming files outside the bundle, too big
// or malformed XML, entity bombs and deep nesting give clear errors.
func TestHostileBundles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "b.hdd")
	os.Mkdir(dir, 0o755)
	desc := filepath.Join(dir, descriptorName)
	outside := filepath.Join(filepath.Dir(dir), "outside.hds")
	disktest.WriteFile(t, outside, tinyImages(t)["ext"])
	deep := strings.Repeat("<a>", 200000) + strings.Repeat("</a>", 200000)
	bomb := `<?xml version="1.0"?>
<!DOCTYPE Parallels_disk_image [
 <!ENTITY a "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa">
 <!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
 <!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">
]>
<Parallels_disk_image><StorageData><Storage><Image><Type>Compressed</Type><File>&c;</File></Image></Storage></StorageData></Parallels_disk_image>`
	for _, c := range []struct {
		name, xml string
		want      error
		msg       string
	}{
		{"parent dir", descriptorXML(16, [3]string{guidBase, "Compressed", "../outside.hds"}), driver.ErrInvalidOption, "leaves the image's directory"},
		{"absolute", descriptorXML(16, [3]string{guidBase, "Compressed", outside}), driver.ErrInvalidOption, "absolute path"},
		{"too big", `<?xml version="1.0"?><Parallels_disk_image>` + strings.Repeat(" ", maxDescriptor), driver.ErrCorrupt, "too large"},
		{"entity bomb", bomb, driver.ErrCorrupt, "bad descriptor XML"},
		{"deep nesting", `<?xml version="1.0"?><Parallels_disk_image>` + deep + `</Parallels_disk_image>`, driver.ErrCorrupt, ""},
		{"truncated", descriptorXML(16, [3]string{guidBase, "Compressed", "x.hds"})[:300], driver.ErrCorrupt, "bad descriptor XML"},
		{"no image", descriptorXML(16), driver.ErrCorrupt, "no image"},
		{"two storages", strings.Replace(descriptorXML(16, [3]string{guidBase, "Compressed", "x.hds"}), "</StorageData>", "<Storage></Storage></StorageData>", 1), driver.ErrUnsupported, "storages"},
		{"no base", strings.ReplaceAll(descriptorXML(16, [3]string{guidBase, "Compressed", "x.hds"}, [3]string{guidTop, "Compressed", "y.hds"}), zeroGUID, guidTop), driver.ErrCorrupt, "base"},
		{"unknown type", descriptorXML(16, [3]string{guidBase, "Sparkly", "x.hds"}), driver.ErrUnsupported, "Sparkly"},
	} {
		t.Run(c.name, func(t *testing.T) {
			disktest.WriteFile(t, desc, []byte(c.xml))
			disktest.WriteFile(t, filepath.Join(dir, "x.hds"), nil)
			_, err := vdisk.Open(ctx, dir, &vdisk.OpenOptions{Format: "parallels", ReadOnly: true})
			if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("got %v, want %v mentioning %q", err, c.want, c.msg)
			}
		})
	}
}
