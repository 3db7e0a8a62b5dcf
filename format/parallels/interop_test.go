package parallels

import (
	"bytes"
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
)

// compareWithQemu opens f (probed) and checks size, content and status
// runs against qemu-img's view of it.
func compareWithQemu(t *testing.T, f string) {
	t.Helper()
	d, err := vdisk.Open(ctx, f, &vdisk.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if got := d.Top().Format.Name; got != "parallels" {
		t.Fatalf("probed as %s", got)
	}
	info := qemutest.Info(t, "parallels", f)
	if got, want := d.Size(), int64(info["virtual-size"].(float64)); got != want {
		t.Fatalf("size %d, qemu-img says %d", got, want)
	}
	if d.Size() <= 256<<20 {
		if got, want := disktest.ReadAll(t, d), qemutest.Raw(t, "parallels", f); !bytes.Equal(got, want) {
			t.Fatal("content differs from qemu-img convert's")
		}
	} else {
		// Too big to hold: the data runs qemu maps read what qemu-io reads.
		for _, e := range qemutest.Map(t, "parallels", f) {
			if !e.Data {
				continue
			}
			n := min(e.Length, 1<<20)
			got := make([]byte, n)
			if _, err := d.ReadAt(got, e.Start); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, bytes.Repeat(got[:1], len(got))) {
				t.Fatalf("data run at %d is not one pattern", e.Start)
			}
			// qemu-io fails the command when its read differs.
			qemutest.IO(t, "parallels", f, fmt.Sprintf("read -P 0x%x %d %d", got[0], e.Start, n))
		}
	}
	for _, e := range qemutest.Map(t, "parallels", f) {
		st, err := d.Status(e.Start, e.Length)
		if err != nil {
			t.Fatal(err)
		}
		if e.Data != st.IsData() || (e.Data && st.Length != e.Length) {
			t.Fatalf("qemu map %+v, vdisk status %+v", e, st)
		}
		if e.Data && e.Offset != nil && *e.Offset != st.Offset {
			t.Fatalf("qemu map %+v at offset %d, vdisk says %d", e, *e.Offset, st.Offset)
		}
	}
	res, err := d.Check(ctx, driver.RepairNone)
	if err != nil || res.Corruptions != 0 || res.Leaks != 0 {
		t.Fatalf("check: %+v %v %q", res, err, res.Messages)
	}
}

// TestReadsQemuImages: images made by qemu-img create with every cluster
// size shape it accepts (default, powers of two, odd multiples of 512, a
// size it rounds up, protocol preallocation) and written by qemu-io (also
// with qemu's prealloc-mode=truncate) read bit-exact, with qemu's size and
// data runs where qemu-img map has them.
func TestReadsQemuImages(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	writes := []string{"write -P 0xaa 1M 64k", "write -P 0x55 5M 1M", "write -P 0x11 3145216 1k",
		"write -P 0x22 6291968 3000", "write -z 5M 4k", "write -P 0x33 9M 1M"}
	for _, c := range []struct {
		name string
		size string
		opts []string
		cmds []string
		trun bool // qemu-io with prealloc-mode=truncate
	}{
		{"default", "10M", nil, writes, false},
		{"64k", "10M", []string{"cluster_size=64k"}, writes, false},
		{"4k-truncate", "10M", []string{"cluster_size=4k"}, writes, true},
		{"512", "10M", []string{"cluster_size=512"}, writes[:3], false},
		{"1536", "10M", []string{"cluster_size=1536"}, writes, false},
		{"rounded-1000", "10M", []string{"cluster_size=1000"}, writes[:4], true},
		{"2M", "10M", []string{"cluster_size=2M"}, writes, false},
		{"odd-size", "3146241", []string{"cluster_size=64k"}, []string{"write -P 0x77 3M 1k", "write -P 0x78 0 4096"}, false},
		{"falloc", "4M", []string{"preallocation=falloc"}, []string{"write -P 0x42 0 512"}, false},
		{"full", "4M", []string{"preallocation=full", "cluster_size=256k"}, []string{"write -P 0x43 3M 512"}, false},
		{"empty", "0", nil, nil, false},
		{"untouched", "5M", nil, nil, false},
		{"big-untouched", "100G", nil, []string{"write -P 0x01 99G 1M"}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := filepath.Join(dir, c.name+".hds")
			qemutest.Create(t, "parallels", f, c.size, c.opts...)
			if len(c.cmds) > 0 {
				if c.trun {
					args := []string{"--image-opts"}
					for _, cmd := range c.cmds {
						args = append(args, "-c", cmd)
					}
					out := qemutest.Run(t, "qemu-io", append(args,
						"driver=parallels,file.filename="+f+",prealloc-mode=truncate,prealloc-size=1M")...)
					if bytes.Contains([]byte(out), []byte("error")) {
						t.Fatal(out)
					}
				} else {
					qemutest.IO(t, "parallels", f, c.cmds...)
				}
			}
			compareWithQemu(t, f)
		})
	}
}

// TestReadsOldMagic: a "WithoutFreeSpace" image (BAT in sectors, data_off
// 0, clusters out of order and not cluster-aligned in the file) and a
// "WithouFreSpacExt" one whose data_off is off the cluster grid, built by
// hand, read as qemu reads them and take writes qemu then reads.
func TestReadsOldMagic(t *testing.T) {
	qemutest.Require(t)
	for name, img := range map[string][]byte{"old": oldMagicImage(), "ext-unaligned": unalignedExtImage()} {
		t.Run(name, func(t *testing.T) {
			f := filepath.Join(t.TempDir(), name+".hds")
			disktest.WriteFile(t, f, img)
			compareWithQemu(t, f)
			// We write into it (sector- or cluster-unit entries) and qemu
			// reads that.
			d, err := vdisk.Open(ctx, f, &vdisk.OpenOptions{Options: small})
			if err != nil {
				t.Fatal(err)
			}
			disktest.MustWrite(t, d, nil, disktest.Fill(3000, 0x99), 5000)
			disktest.MustWrite(t, d, nil, disktest.Fill(100, 0x98), 100)
			disktest.MustWrite(t, d, nil, disktest.Fill(100, 0x97), d.Size()-100)
			disktest.MustClose(t, d)
			qemutest.Check(t, "parallels", f)
			compareWithQemu(t, f)
		})
	}
}

// TestWritesPassQemu: what vdisk writes (random model operations with
// reopens, both prealloc modes, odd cluster and disk sizes) passes
// qemu-img check and compares equal to the model; qemu-io then writes into
// our layout and we read what it wrote.
func TestWritesPassQemu(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	for _, c := range []struct {
		name string
		size int64
		opts []driver.KV
	}{
		{"default", 12 << 20, []driver.KV{{Key: "prealloc-size", Value: "1M"}}},
		{"64k-truncate", 6 << 20, []driver.KV{{Key: "cluster_size", Value: "64k"}, {Key: "prealloc-mode", Value: "truncate"}, {Key: "prealloc-size", Value: "256k"}}},
		{"1536-odd", 5<<20 + 3*512, []driver.KV{{Key: "cluster_size", Value: "1536"}, {Key: "prealloc-size", Value: "0"}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			st := memfs.New()
			name := "/" + c.name + ".hds"
			d := createPrl(t, st, name, c.size, c.opts...)
			var oo []driver.KV
			for _, kv := range c.opts {
				if kv.Key != "cluster_size" {
					oo = append(oo, kv)
				}
			}
			m := model.New(c.size)
			h := &model.Harness{Seed: 11, Ops: 400, MaxIO: 1 << 20,
				Reopen: func(d *vdisk.Disk) (*vdisk.Disk, error) {
					if err := d.Close(); err != nil {
						return nil, err
					}
					return vdisk.Open(ctx, name, &vdisk.OpenOptions{Storage: st, Options: oo})
				}}
			d = h.Run(t, d, m)
			disktest.MustClose(t, d)
			img := disktest.SaveTo(t, st, name, dir)
			ref := filepath.Join(dir, c.name+".raw")
			disktest.WriteFile(t, ref, m.Data)
			qemutest.Check(t, "parallels", img)
			if !qemutest.Compare(t, "parallels", img, "raw", ref) {
				t.Fatal("qemu-img compare: the image differs from the model")
			}
			qemutest.IO(t, "parallels", img, "write -P 0x5a 1049000 3000", fmt.Sprintf("write -P 0x6b %d 512", c.size-512))
			copy(m.Data[1049000:], disktest.Fill(3000, 0x5a))
			copy(m.Data[c.size-512:], disktest.Fill(512, 0x6b))
			qemutest.Check(t, "parallels", img)
			d, err := vdisk.Open(ctx, img, &vdisk.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			if got := disktest.ReadAll(t, d); !bytes.Equal(got, m.Data) {
				t.Fatal("vdisk does not read what qemu-io wrote")
			}
			disktest.MustClose(t, d)
			compareWithQemu(t, img)
		})
	}
}

// TestCreateLikeQemu: an image vdisk creates is byte-identical to the one
// qemu-img creates with the same options.
func TestCreateLikeQemu(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	for _, c := range []struct {
		size int64
		cs   string
	}{{10 << 20, "1M"}, {10 << 20, "64k"}, {3146240, "1536"}, {100 << 30, "1M"}, {0, "4k"}} {
		q := filepath.Join(dir, fmt.Sprintf("q-%d-%s.hds", c.size, c.cs))
		qemutest.Create(t, "parallels", q, fmt.Sprint(c.size), "cluster_size="+c.cs)
		v := filepath.Join(dir, fmt.Sprintf("v-%d-%s.hds", c.size, c.cs))
		d, err := vdisk.Create(ctx, v, &vdisk.CreateOptions{Format: "parallels", Size: c.size,
			Options: []driver.KV{{Key: "cluster_size", Value: c.cs}}})
		if err != nil {
			t.Fatal(err)
		}
		disktest.MustClose(t, d)
		qb, _ := os.ReadFile(q)
		vb, _ := os.ReadFile(v)
		if !bytes.Equal(qb, vb) {
			t.Fatalf("size %d cluster %s: vdisk's new image (%d bytes) differs from qemu's (%d bytes)", c.size, c.cs, len(vb), len(qb))
		}
	}
}
