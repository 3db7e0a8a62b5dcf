package vmdk

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// TestWritesPassQemu: images vdisk creates in every writable subformat and
// fills with random writes (model harness with reopens) pass qemu-img check
// and compare equal to the model; qemu then writes into them and vdisk
// reads what it wrote.
func TestWritesPassQemu(t *testing.T) {
	qemutest.Require(t)
	for _, c := range []struct {
		name string
		size int64
		opts []string
	}{
		{"monolithicSparse", 12 << 20, nil},
		{"monolithicFlat", 5 << 20, []string{"subformat=monolithicFlat"}},
		{"twoGbMaxExtentSparse", 6 << 20, []string{"subformat=twoGbMaxExtentSparse"}},
		{"twoGbMaxExtentFlat", 6 << 20, []string{"subformat=twoGbMaxExtentFlat"}},
		{"zeroed-grain", 6 << 20, []string{"zeroed_grain=on", "adapter_type=lsilogic", "hwversion=7"}},
		{"odd-size", 5<<20 + 3*512, []string{"compat6=on", "adapter_type=buslogic"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			st := memfs.New()
			name := "/" + c.name + ".vmdk"
			d := createDisk(t, st, name, c.size, "", c.opts...)
			m := model.New(c.size)
			h := &model.Harness{Seed: 11, Ops: 400, MaxIO: 1 << 20,
				Reopen: func(d *vdisk.Disk) (*vdisk.Disk, error) {
					if err := d.Close(); err != nil {
						return nil, err
					}
					return vdisk.Open(ctx, name, &vdisk.OpenOptions{Storage: st})
				}}
			d = h.Run(t, d, m)
			disktest.MustClose(t, d)
			saveAll(t, st, dir)
			img := filepath.Join(dir, c.name+".vmdk")
			ref := filepath.Join(dir, c.name+".raw")
			if err := os.WriteFile(ref, m.Data, 0o644); err != nil {
				t.Fatal(err)
			}
			qemutest.Check(t, "vmdk", img)
			if !qemutest.Compare(t, "vmdk", img, "raw", ref) {
				t.Fatal("qemu-img compare: the VMDK differs from the model")
			}
			info := qemutest.Info(t, "vmdk", img)
			if got := info["format-specific"].(map[string]any)["data"].(map[string]any)["create-type"]; c.opts != nil && c.opts[0][:9] == "subformat" && "subformat="+got.(string) != c.opts[0] {
				t.Fatalf("create-type %v", got)
			}
			// qemu writes into our layout; we read it.
			qemutest.IO(t, "vmdk", img, "write -P 0x5a 1049000 3000", fmt.Sprintf("write -P 0x6b %d 512", c.size-512))
			copy(m.Data[1049000:], disktest.Fill(3000, 0x5a))
			copy(m.Data[c.size-512:], disktest.Fill(512, 0x6b))
			d2, err := vdisk.Open(ctx, img, &vdisk.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			if got := disktest.ReadAll(t, d2); !bytes.Equal(got, m.Data) {
				t.Fatal("vdisk does not read what qemu-io wrote")
			}
			disktest.MustClose(t, d2)
		})
	}
}

// TestCreateMatchesQemu: the files vdisk creates for each subformat have
// qemu's names, and each tool reads the other's new image at the same size.
func TestCreateMatchesQemu(t *testing.T) {
	qemutest.Require(t)
	for _, sub := range subformats {
		t.Run(sub, func(t *testing.T) {
			qd, vd := t.TempDir(), t.TempDir()
			const size = "4097M"
			qemutest.Create(t, "vmdk", filepath.Join(qd, "x.vmdk"), size, "subformat="+sub)
			d := createDisk(t, nil, filepath.Join(vd, "x.vmdk"), 4097<<20, "", "subformat="+sub)
			disktest.MustClose(t, d)
			qn, _ := filepath.Glob(filepath.Join(qd, "*"))
			vn, _ := filepath.Glob(filepath.Join(vd, "*"))
			if len(qn) != len(vn) {
				t.Fatalf("qemu makes %v, vdisk %v", qn, vn)
			}
			for i := range qn {
				if filepath.Base(qn[i]) != filepath.Base(vn[i]) {
					t.Fatalf("qemu makes %v, vdisk %v", qn, vn)
				}
			}
			v := filepath.Join(vd, "x.vmdk")
			qemutest.Check(t, "vmdk", v)
			if got := int64(qemutest.Info(t, "vmdk", v)["virtual-size"].(float64)); got != 4097<<20 {
				t.Fatalf("qemu reads size %d", got)
			}
			dq := openDisk(t, nil, filepath.Join(qd, "x.vmdk"), true)
			if dq.Size() != 4097<<20 {
				t.Fatalf("vdisk reads qemu's image as %d bytes", dq.Size())
			}
			disktest.MustClose(t, dq)
		})
	}
}

// TestAllocGrainTables: an extent whose directory entries are empty (as
// VMware may leave them) gets grain tables allocated at the end on write,
// both copies, and the result passes qemu-img check and reads back.
func TestAllocGrainTables(t *testing.T) {
	qemutest.Require(t)
	st := memfs.New()
	const size = 80 << 20 // three grain tables
	d := createDisk(t, st, "/g.vmdk", size, "")
	disktest.MustClose(t, d)
	b, _ := st.ReadFile("/g.vmdk")
	var h header
	h.decode(b)
	for _, dir := range []uint64{h.gdOffset, h.rgdOffset} {
		clear(b[dir*sectorSize : dir*sectorSize+12])
	}
	st.WriteFile("/g.vmdk", b)
	m := model.New(size)
	d = openDisk(t, st, "/g.vmdk", false)
	x, _ := topImage(d).Status(0, size)
	if x.State != 0 || x.Length != size {
		t.Fatalf("status of an image without tables: %+v", x)
	}
	disktest.MustWrite(t, d, m, disktest.Fill(100000, 0x61), 33<<20-5000)
	disktest.MustWrite(t, d, m, disktest.Fill(3000, 0x62), 70<<20)
	disktest.MustClose(t, d)
	d = openDisk(t, st, "/g.vmdk", true)
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, m.Data) {
		t.Fatal("content differs")
	}
	if res, err := d.Check(ctx, 0); err != nil || res.Corruptions != 0 {
		t.Fatalf("check: %+v %v", res, err)
	}
	disktest.MustClose(t, d)
	dir := t.TempDir()
	saveAll(t, st, dir)
	qemutest.Check(t, "vmdk", filepath.Join(dir, "g.vmdk"))
	ref := filepath.Join(dir, "g.raw")
	os.WriteFile(ref, m.Data, 0o644)
	if !qemutest.Compare(t, "vmdk", filepath.Join(dir, "g.vmdk"), "raw", ref) {
		t.Fatal("qemu reads differently")
	}
}
