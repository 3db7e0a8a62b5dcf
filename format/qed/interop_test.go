package qed

import (
	"bytes"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// checkAgainstQemu compares vdisk's view of f (read bit-exact, size, and
// the chain status with qemu-img map's) with qemu's.
func checkAgainstQemu(t *testing.T, f string) {
	t.Helper()
	d, err := vdisk.Open(ctx, f, &vdisk.OpenOptions{ReadOnly: true}) // probed
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if got := d.Top().Format.Name; got != "qed" {
		t.Fatalf("probed as %s", got)
	}
	info := qemutest.Info(t, "qed", f)
	if got, want := d.Size(), int64(info["virtual-size"].(float64)); got != want {
		t.Fatalf("size %d, qemu-img says %d", got, want)
	}
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, qemutest.Raw(t, "qed", f)) {
		t.Fatal("content differs from qemu-img convert's")
	}
	for _, e := range qemutest.Map(t, "qed", f) {
		for pos := e.Start; pos < e.Start+e.Length; {
			st, err := d.Status(pos, e.Start+e.Length-pos)
			if err != nil {
				t.Fatal(err)
			}
			want := driver.Unallocated
			switch {
			case e.Data:
				want = driver.Data
			case e.Present && e.Zero:
				want = driver.Zero
			}
			if st.State != want || (e.Present && st.Depth != e.Depth) {
				t.Fatalf("qemu map %+v, vdisk status at %d: %+v", e, pos, st)
			}
			if e.Data && e.Offset != nil && *e.Offset+(pos-e.Start) != st.Offset {
				t.Fatalf("qemu map %+v at offset %d, vdisk says %d", e, *e.Offset, st.Offset)
			}
			pos += st.Length
		}
	}
	res, err := d.Check(ctx, driver.RepairNone)
	if err != nil || res.Corruptions != 0 || res.Leaks != 0 {
		t.Fatalf("check: %+v %v %q", res, err, res.Messages)
	}
}

// TestReadsQemuImages: images qemu-img creates with every option
// combination it accepts and opens, written by qemu-io (data, zero
// writes, partial clusters), read bit-exact with qemu-img map's status.
func TestReadsQemuImages(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	cmds := func(size int64) []string {
		return []string{"write -P 0xaa 0 4k", "write -P 0x55 100k 300k", "write -z 1M 256k",
			"write -P 0x11 3145216 1k", "write -z 3145728 512", fmt.Sprintf("write -P 0x77 %d 512", size-512)}
	}
	// qemu computes the maximum image size in 64 bits, which wraps to 0
	// for clusters of 8 MiB and more (and 4 MiB with tables of 4+
	// clusters): it cannot create those.
	for _, cs := range []string{"4k", "64k", "1M", "4M"} {
		for _, ts := range []string{"2", "4", "8", "16"} {
			size := int64(6<<20 + 512*3)
			if cs == "4k" && ts == "2" {
				size = 4 << 20
			}
			// Every table size with 4k and 64k clusters; the largest
			// clusters with the smallest and largest table qemu takes.
			if (cs == "1M" && ts != "2" && ts != "16") || (cs == "4M" && ts != "2") {
				continue
			}
			name := fmt.Sprintf("c%s-t%s", cs, ts)
			t.Run(name, func(t *testing.T) {
				f := filepath.Join(dir, name+".qed")
				qemutest.Create(t, "qed", f, fmt.Sprint(size), "cluster_size="+cs, "table_size="+ts)
				checkAgainstQemu(t, f)
				qemutest.IO(t, "qed", f, cmds(size)...)
				checkAgainstQemu(t, f)
			})
		}
	}
	t.Run("defaults-empty", func(t *testing.T) {
		f := filepath.Join(dir, "empty.qed")
		qemutest.Create(t, "qed", f, "0")
		checkAgainstQemu(t, f)
	})
	t.Run("table_size=1", func(t *testing.T) {
		// qemu creates these but cannot open them (its table offset check
		// refuses a one-cluster table); we read them.
		f := filepath.Join(dir, "t1.qed")
		qemutest.Create(t, "qed", f, "1M", "table_size=1", "cluster_size=4k")
		d, err := vdisk.Open(ctx, f, &vdisk.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		disktest.MustWrite(t, d, nil, disktest.Fill(5000, 3), 4000)
		disktest.MustClose(t, d)
		d, err = vdisk.Open(ctx, f, &vdisk.OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		want := make([]byte, 1<<20)
		copy(want[4000:], disktest.Fill(5000, 3))
		if !bytes.Equal(disktest.ReadAll(t, d), want) {
			t.Fatal("content")
		}
		disktest.MustClose(t, d)
	})
}

// TestReadsQemuChains: chains of qemu-made QED images over a QED base and
// over a raw base (backing_fmt=raw: the no-probe feature), written by
// qemu-io at every level, read bit-exact with qemu-img map's depths.
func TestReadsQemuChains(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	for _, c := range []struct {
		name, baseFmt, cs string
	}{{"qed-base", "qed", "64k"}, {"raw-base", "raw", "4k"}} {
		t.Run(c.name, func(t *testing.T) {
			base := filepath.Join(dir, c.name+"."+c.baseFmt)
			qemutest.Create(t, c.baseFmt, base, "5M")
			qemutest.IO(t, c.baseFmt, base, "write -P 0x01 0 5M")
			mid := filepath.Join(dir, c.name+"-mid.qed")
			qemutest.Img(t, "create", "-q", "-f", "qed", "-o", "cluster_size="+c.cs, "-b", filepath.Base(base), "-F", c.baseFmt, mid)
			qemutest.IO(t, "qed", mid, "write -P 0x02 1000 3000", "write -z 1M 64k", "write -P 0x03 2M 100k")
			top := filepath.Join(dir, c.name+"-top.qed")
			qemutest.Img(t, "create", "-q", "-f", "qed", "-b", filepath.Base(mid), "-F", "qed", top, "6M")
			qemutest.IO(t, "qed", top, "write -P 0x04 2000 100", "write -z 2M 64k", "write -P 0x05 5M 1M", "write -P 0x06 1056768 4096")
			checkAgainstQemu(t, top)
			d, err := vdisk.Open(ctx, mid, &vdisk.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			ref := d.Top().ParentRef()
			if c.baseFmt == "raw" && (ref == nil || ref.Format != "raw") {
				t.Fatalf("parent ref %+v, want format raw (no-probe)", ref)
			}
			if c.baseFmt == "qed" && (ref == nil || ref.Format != "") {
				t.Fatalf("parent ref %+v, want no format", ref)
			}
			disktest.MustClose(t, d)
		})
	}
}

// TestWritesPassQemu: images vdisk makes (every create option, base and
// diff images) written by the model harness pass qemu-img check and
// compare equal to the model; qemu-io then writes into them and vdisk
// reads what it wrote.
func TestWritesPassQemu(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	for _, c := range []struct {
		name string
		size int64
		opts []driver.KV
		diff bool
	}{
		{"default", 12 << 20, nil, false},
		{"4k-t2", 5<<20 + 3*512, disktest.KVs("cluster_size=4k", "table_size=2"), false},
		{"1M-t16", 7 << 20, disktest.KVs("cluster_size=1M", "table_size=16"), false},
		{"diff-64k", 6 << 20, nil, true},
		{"diff-raw-4k", 6 << 20, disktest.KVs("cluster_size=4k"), true},
	} {
		t.Run(c.name, func(t *testing.T) {
			st := memfs.New()
			name := "/" + c.name + ".qed"
			m := model.New(c.size)
			var base, backFmt string
			if c.diff {
				backFmt = "qed"
				if strings.Contains(c.name, "raw") {
					backFmt = "raw"
				}
				base = c.name + "-base." + backFmt
				b, err := vdisk.Create(ctx, "/"+base, &vdisk.CreateOptions{Format: backFmt, Size: c.size, Storage: st})
				if err != nil {
					t.Fatal(err)
				}
				for off := int64(0); off < c.size; off += 1 << 20 {
					disktest.MustWrite(t, b, m, disktest.Fill(300000, byte(off>>20)+0x30), off)
				}
				disktest.MustClose(t, b)
			}
			d := createQED(t, st, name, c.size, base, backFmt, c.opts...)
			h := &model.Harness{Seed: 11, Ops: 300, MaxIO: 256 << 10,
				Reopen: func(d *vdisk.Disk) (*vdisk.Disk, error) {
					if err := d.Close(); err != nil {
						return nil, err
					}
					return vdisk.Open(ctx, name, &vdisk.OpenOptions{Storage: st})
				}}
			d = h.Run(t, d, m)
			disktest.MustClose(t, d)
			img := disktest.SaveTo(t, st, name, dir)
			if c.diff {
				disktest.SaveTo(t, st, "/"+base, dir)
			}
			ref := filepath.Join(dir, c.name+".raw")
			disktest.WriteFile(t, ref, m.Data)
			qemutest.Check(t, "qed", img)
			if !qemutest.Compare(t, "qed", img, "raw", ref) {
				t.Fatal("qemu-img compare: the QED image differs from the model")
			}
			qemutest.IO(t, "qed", img, "write -P 0x5a 1049000 3000", "write -z 2M 1M", fmt.Sprintf("write -P 0x6b %d 512", c.size-512))
			copy(m.Data[1049000:], disktest.Fill(3000, 0x5a))
			clear(m.Data[2<<20 : 3<<20])
			copy(m.Data[c.size-512:], disktest.Fill(512, 0x6b))
			d, err := vdisk.Open(ctx, img, &vdisk.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			// qemu fills the rest of a zero cluster partly written in an
			// image with a backing file from the backing file (its
			// copy-on-write does not look at the zero flag), so over a
			// backing file the model no longer holds; qemu's own view does.
			got := disktest.ReadAll(t, d)
			if !c.diff && !bytes.Equal(got, m.Data) {
				t.Fatal("vdisk does not read what qemu-io wrote")
			}
			if !bytes.Equal(got, qemutest.Raw(t, "qed", img)) {
				t.Fatal("vdisk does not read what qemu reads after qemu-io's writes")
			}
			disktest.MustClose(t, d)
			checkAgainstQemu(t, img)
		})
	}
}
