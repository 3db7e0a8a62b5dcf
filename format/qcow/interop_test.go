package qcow

import (
	"bytes"
	"fmt"
	"math/rand/v2"
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

// rawSource writes a raw file of size bytes with patterned, zero and
// random (incompressible) regions for qemu-img convert -c.
func rawSource(t *testing.T, path string, size int64) []byte {
	t.Helper()
	b := make([]byte, size)
	rng := rand.New(rand.NewPCG(5, 6))
	for off := int64(0); off < size; off += 64 << 10 {
		switch (off >> 16) % 4 {
		case 0: // text-like, compressible
			for i := off; i < min(size, off+40000); i++ {
				b[i] = "qcow version one "[i%17]
			}
		case 1: // random: does not shrink
			for i := off; i < min(size, off+9000); i++ {
				b[i] = byte(rng.Uint32())
			}
		case 2: // zeros
		case 3:
			copy(b[off:], bytes.Repeat([]byte{byte(off >> 16)}, int(min(size-off, 5000))))
		}
	}
	disktest.WriteFile(t, path, b)
	return b
}

// TestReadsQemuImages: images made by qemu-img create (with and without
// backing files, chains), written by qemu-io, and compressed by qemu-img
// convert -c read bit-exact, with qemu's size and cluster size and a
// status walk equal to qemu-img map.
func TestReadsQemuImages(t *testing.T) {
	qemutest.Require(t)
	for _, c := range []struct {
		name    string
		build   func(t *testing.T, dir string) string
		parents []string // parent name and format, for a raw backing file
	}{
		{"plain", func(t *testing.T, dir string) string {
			f := filepath.Join(dir, "plain.qcow")
			qemutest.Create(t, "qcow", f, "24M")
			qemuIO(t, f, "write -P 0xaa 1M 64k", "write -P 0x55 10M 1M", "write -P 0x11 3145216 1k",
				"write -P 0x22 12587008 3M", "write -z 10M 4k", "write -P 0x33 23M 1M", "write -P 0x44 0 512")
			return f
		}, nil},
		{"odd-size", func(t *testing.T, dir string) string {
			f := filepath.Join(dir, "odd.qcow")
			qemutest.Create(t, "qcow", f, "3146753")
			qemuIO(t, f, "write -P 0x77 3M 512", "write -P 0x78 0 4096", "write -P 0x79 3146752 512")
			return f
		}, nil},
		{"tiny", func(t *testing.T, dir string) string {
			f := filepath.Join(dir, "tiny.qcow")
			qemutest.Create(t, "qcow", f, "1000")
			qemuIO(t, f, "write -P 0x01 512 512")
			return f
		}, nil},
		{"untouched", func(t *testing.T, dir string) string {
			f := filepath.Join(dir, "untouched.qcow")
			qemutest.Create(t, "qcow", f, "5M")
			return f
		}, nil},
		{"sparse-l1", func(t *testing.T, dir string) string {
			f := filepath.Join(dir, "big.qcow")
			qemutest.Create(t, "qcow", f, "40M")
			qemuIO(t, f, "write -P 0x44 33550336 8192", "write -P 0x45 41938944 4096", "write -P 0x46 2M 4k")
			return f
		}, nil},
		{"compressed", func(t *testing.T, dir string) string {
			src := filepath.Join(dir, "src.raw")
			rawSource(t, src, 2<<20+512)
			f := filepath.Join(dir, "c.qcow")
			qemuCompress(t, src, f)
			return f
		}, nil},
		{"compressed-then-written", func(t *testing.T, dir string) string {
			src := filepath.Join(dir, "src.raw")
			rawSource(t, src, 1<<20)
			f := filepath.Join(dir, "cw.qcow")
			qemuCompress(t, src, f)
			// Partial writes into compressed clusters, a whole one, and one
			// into an empty cluster.
			qemuIO(t, f, "write -P 0x61 4608 512", "write -P 0x62 196608 4096", "write -P 0x63 135168 1024")
			return f
		}, nil},
		{"backing-raw", func(t *testing.T, dir string) string {
			base := filepath.Join(dir, "base.raw")
			rawSource(t, base, 4<<20)
			f := filepath.Join(dir, "top.qcow")
			qemutest.Create(t, "qcow", f, "4M", "backing_file=base.raw", "backing_fmt=raw")
			qemuIO(t, f, "write -P 0x21 1000 10", "write -P 0x22 1M 100k", "write -P 0x23 4193792 512")
			return f
		}, []string{"base.raw", "raw"}},
		{"chain", func(t *testing.T, dir string) string {
			base := filepath.Join(dir, "base.qcow")
			qemutest.Create(t, "qcow", base, "6M")
			qemuIO(t, base, "write -P 0x31 0 6M")
			mid := filepath.Join(dir, "mid.qcow")
			qemutest.Create(t, "qcow", mid, "6M", "backing_file=base.qcow", "backing_fmt=qcow")
			qemuIO(t, mid, "write -P 0x32 1M 1M", "write -P 0x33 3000 5000")
			top := filepath.Join(dir, "top.qcow")
			qemutest.Create(t, "qcow", top, "8M", "backing_file=mid.qcow", "backing_fmt=qcow")
			qemuIO(t, top, "write -P 0x34 1536k 1M", "write -P 0x35 7M 512", "write -z 5M 4k")
			return top
		}, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			checkAgainstQemu(t, c.build(t, t.TempDir()), c.parents...)
		})
	}
}

// TestQemuCreateLayout: vdisk creates byte for byte the file qemu-img
// create makes (header, backing name, L1 table and its padding), with and
// without a backing file.
func TestQemuCreateLayout(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	for _, c := range []struct {
		size    int64
		backing string
	}{{5 << 20, ""}, {3146753, ""}, {1 << 30, ""}, {8 << 20, "base.raw"}, {1000, "x.raw"}} {
		t.Run(fmt.Sprintf("%d-%s", c.size, c.backing), func(t *testing.T) {
			q := filepath.Join(dir, "q.qcow")
			opts := []string{}
			if c.backing != "" {
				qemutest.Create(t, "raw", filepath.Join(dir, c.backing), fmt.Sprint(c.size))
				opts = append(opts, "backing_file="+c.backing, "backing_fmt=raw")
			}
			qemutest.Create(t, "qcow", q, fmt.Sprint(c.size), opts...)
			v := filepath.Join(dir, "v.qcow")
			os.Remove(v)
			d, err := vdisk.Create(ctx, v, &vdisk.CreateOptions{Format: "qcow", Size: c.size, Backing: c.backing, BackingFormat: "raw"})
			if err != nil {
				t.Fatal(err)
			}
			disktest.MustClose(t, d)
			qb, _ := os.ReadFile(q)
			vb, _ := os.ReadFile(v)
			if !bytes.Equal(qb, vb) {
				t.Fatalf("vdisk's file (%d bytes) differs from qemu's (%d bytes)", len(vb), len(qb))
			}
		})
	}
}

// TestWritesPassQemu: images vdisk writes (plain with every geometry qemu
// reads, diff images over a qcow base, compressed ones) compare equal to
// the model with qemu-img compare; qemu-io then writes into them (also
// into compressed clusters) and vdisk reads what it wrote.
func TestWritesPassQemu(t *testing.T) {
	qemutest.Require(t)
	type geo struct{ cb, l2b uint8 }
	for _, c := range []struct {
		name string
		size int64
		geo  geo // zero: qemu's
		diff bool
		ops  int
	}{
		{"plain", 8 << 20, geo{}, false, 300},
		{"odd-size", 5<<20 + 3*512, geo{}, false, 200},
		{"cb9-l2b6", 3 << 20, geo{9, 6}, false, 200},
		{"cb10-l2b13", 6 << 20, geo{10, 13}, false, 150},
		{"cb16-l2b13", 12 << 20, geo{16, 13}, false, 150},
		{"cb16-l2b6", 9<<20 + 512, geo{16, 6}, false, 150},
		{"cb13-l2b10", 6 << 20, geo{13, 10}, false, 150},
		{"diff", 6 << 20, geo{}, true, 300},
		{"diff-cb14", 4 << 20, geo{14, 8}, true, 200},
	} {
		t.Run(c.name, func(t *testing.T) {
			if c.geo.cb != 0 {
				withGeometry(t, c.geo.cb, c.geo.l2b)
			}
			dir := t.TempDir()
			st := memfs.New()
			m := model.New(c.size)
			name := "/" + c.name + ".qcow"
			backing := ""
			if c.diff {
				b := createQcow(t, st, "/base.qcow", c.size-4096, "")
				disktest.MustWrite(t, b, m, disktest.Fill(int(c.size/2), 0x5c), 1000)
				disktest.MustWrite(t, b, m, disktest.Fill(70000, 0x5d), c.size-4096-70000)
				disktest.MustClose(t, b)
				backing = "base.qcow"
			}
			d := createQcow(t, st, name, c.size, backing)
			g := &model.Chain{Storage: st, Format: "qcow", Ext: "qcow", Top: name}
			if c.diff {
				g.Depth = 1
			}
			h := &model.Harness{Seed: 11, Ops: c.ops, MaxIO: 512 << 10, Reopen: g.Reopen}
			d = h.Run(t, d, m)
			disktest.MustClose(t, d)
			img := disktest.SaveTo(t, st, name, dir)
			if c.diff {
				disktest.SaveTo(t, st, "/base.qcow", dir)
			}
			ref := filepath.Join(dir, c.name+".raw")
			disktest.WriteFile(t, ref, m.Data)
			if !qemutest.Compare(t, "qcow", img, "raw", ref) {
				t.Fatal("qemu-img compare: the image differs from the model")
			}
			checkAgainstQemu(t, img)
			// qemu writes into our layout; we read it.
			// qemu does no copy-on-write inside a cluster (the rest of a
			// cluster it allocates reads zeros, not the backing file's
			// data), so over a backing file its writes cover whole
			// clusters.
			w1, w2 := [2]int64{1049000, 3000}, [2]int64{c.size - 512, 512}
			if cs := topImageCS(c.geo.cb); c.diff && cs > 512 {
				w1, w2 = [2]int64{1 << 20, cs}, [2]int64{c.size - cs, cs}
			}
			qemuIO(t, img, fmt.Sprintf("write -P 0x5a %d %d", w1[0], w1[1]), fmt.Sprintf("write -P 0x6b %d %d", w2[0], w2[1]))
			copy(m.Data[w1[0]:], disktest.Fill(int(w1[1]), 0x5a))
			copy(m.Data[w2[0]:], disktest.Fill(int(w2[1]), 0x6b))
			d, err := vdisk.Open(ctx, img, &vdisk.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			if got := disktest.ReadAll(t, d); !bytes.Equal(got, m.Data) {
				for i := range got {
					if got[i] != m.Data[i] {
						t.Fatalf("vdisk does not read what qemu-io wrote: byte %d reads %#x, want %#x", i, got[i], m.Data[i])
					}
				}
			}
			disktest.MustClose(t, d)
		})
	}
}

// TestCompressedConvert: convert -c into qcow (default geometry and 64 KiB
// clusters) makes images qemu reads equal to the source, denser than the
// source; qemu-io and vdisk then write into the compressed clusters and
// each reads what the other wrote.
func TestCompressedConvert(t *testing.T) {
	qemutest.Require(t)
	for _, cb := range []uint8{12, 16, 9} {
		t.Run(fmt.Sprintf("cb%d", cb), func(t *testing.T) {
			if cb != 12 {
				withGeometry(t, cb, 9)
			}
			dir := t.TempDir()
			src := filepath.Join(dir, "src.raw")
			want := rawSource(t, src, 3<<20+1536)
			s, err := vdisk.Open(ctx, src, &vdisk.OpenOptions{Format: "raw", ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			dst := filepath.Join(dir, "c.qcow")
			d, err := vdisk.Create(ctx, dst, &vdisk.CreateOptions{Format: "qcow", Size: s.Size()})
			if err != nil {
				t.Fatal(err)
			}
			if err := vdisk.Convert(ctx, d, s, &vdisk.ConvertOptions{Compress: true}); err != nil {
				t.Fatal(err)
			}
			disktest.MustClose(t, d)
			s.Close()
			if !qemutest.Compare(t, "qcow", dst, "raw", src) {
				t.Fatal("qemu-img compare: the compressed image differs from the source")
			}
			checkAgainstQemu(t, dst)
			fi, _ := os.Stat(dst)
			if fi.Size() > int64(len(want))/2 {
				t.Fatalf("compressed image of %d bytes for %d bytes of source", fi.Size(), len(want))
			}
			// Some clusters are compressed, some (random data) are not.
			var nc, nn int
			for _, e := range qemutest.Map(t, "qcow", dst) {
				if e.Data && e.Offset == nil {
					nc++
				} else if e.Data {
					nn++
				}
			}
			if nc == 0 || nn == 0 && cb <= 13 {
				t.Fatalf("%d compressed and %d normal data runs", nc, nn)
			}
			// qemu writes into compressed clusters, then vdisk does.
			qemuIO(t, dst, "write -P 0x71 700 300", "write -P 0x72 2M 4096")
			copy(want[700:], disktest.Fill(300, 0x71))
			copy(want[2<<20:], disktest.Fill(4096, 0x72))
			d, err = vdisk.Open(ctx, dst, nil)
			if err != nil {
				t.Fatal(err)
			}
			if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
				t.Fatal("vdisk does not read what qemu-io wrote into compressed clusters")
			}
			for _, w := range [][2]int64{{5000, 100}, {65536 + 10, 70000}, {3 << 20, 1536}} {
				p := disktest.Fill(int(w[1]), byte(w[0]))
				disktest.MustWrite(t, d, nil, p, w[0])
				copy(want[w[0]:], p)
			}
			disktest.MustClose(t, d)
			disktest.WriteFile(t, src, want)
			if !qemutest.Compare(t, "qcow", dst, "raw", src) {
				t.Fatal("qemu-img compare: vdisk's writes into compressed clusters read wrong in qemu")
			}
		})
	}
}

// TestEncryptedRefused: an AES image qemu made is refused with a clear
// ErrUnsupported naming the file, and creating one is refused too.
func TestEncryptedRefused(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	f := filepath.Join(dir, "enc.qcow")
	qemutest.Img(t, "create", "-q", "-f", "qcow", "--object", "secret,id=sec0,data=123456",
		"-o", "encrypt.format=aes,encrypt.key-secret=sec0", f, "1M")
	_, err := vdisk.Open(ctx, f, &vdisk.OpenOptions{ReadOnly: true})
	if err == nil || !errorsIs(err, driver.ErrUnsupported) || !bytes.Contains([]byte(err.Error()), []byte(f)) ||
		!bytes.Contains([]byte(err.Error()), []byte("AES")) {
		t.Fatalf("opening an AES image: %v", err)
	}
	for _, o := range []string{"encryption=on", "encrypt.format=aes", "encrypt.format=luks"} {
		_, err := vdisk.Create(ctx, filepath.Join(dir, "n.qcow"), &vdisk.CreateOptions{Format: "qcow", Size: 1 << 20, Options: disktest.KVs(o)})
		if err == nil {
			t.Fatalf("create with %s succeeded", o)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "n.qcow")); err == nil {
		t.Fatal("a refused create left a file")
	}
}

// topImageCS is the cluster size of geometry cb (0: qemu's for a diff).
func topImageCS(cb uint8) int64 {
	if cb == 0 {
		return 512
	}
	return 1 << cb
}
