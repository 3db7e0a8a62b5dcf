package qcow2_test

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/luks"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/faultfs"
	"github.com/vdisk/vdisk/storage/memfs"
)

const encPass = "enc pass"

func encSecrets(pass string) *driver.SecretMap {
	sm := &driver.SecretMap{}
	sm.Set("sec0", []byte(pass))
	return sm
}

// encCreate creates an encrypted qcow2 (iter-time 1 ms: key derivation
// stays cheap; the iteration floor still applies).
func encCreate(st driver.Storage, name string, size int64, backing string, opts ...string) (*vdisk.Disk, error) {
	kv := disktest.KVs(append([]string{"encrypt.format=luks", "encrypt.key-secret=sec0", "encrypt.iter-time=1"}, opts...)...)
	o := &vdisk.CreateOptions{Format: "qcow2", Size: size, Options: kv, Storage: st, Secrets: encSecrets(encPass)}
	if backing != "" {
		o.Backing, o.BackingFormat = backing, "raw"
	}
	return vdisk.Create(ctx, name, o)
}

func encOpen(st driver.Storage, name, pass string, ro bool, extra ...string) (*vdisk.Disk, error) {
	return vdisk.Open(ctx, name, &vdisk.OpenOptions{Storage: st, ReadOnly: ro, Secrets: encSecrets(pass),
		Options: disktest.KVs(append([]string{"encrypt.key-secret=sec0"}, extra...)...)})
}

// encOps applies a fixed mix of writes (partial sectors, across clusters),
// zero writes and discards to d and m.
func encOps(t *testing.T, d *vdisk.Disk, m *model.Model, seed uint64) {
	t.Helper()
	size := int64(len(m.Data))
	rng := rand.New(rand.NewPCG(seed, 3))
	for i := 0; i < 60; i++ {
		n := rng.Int64N(200<<10) + 1
		if i%3 == 0 {
			n = rng.Int64N(1500) + 1
		}
		off := rng.Int64N(size - n)
		switch r := rng.IntN(10); {
		case r < 7:
			p := make([]byte, n)
			for j := range p {
				p[j] = byte(rng.Uint32())
			}
			disktest.MustWrite(t, d, m, p, off)
		case r < 9:
			if err := d.WriteZeroes(off, n, r == 8); err != nil {
				t.Fatalf("write zeroes %d+%d: %v", off, n, err)
			}
			m.Zero(off, n)
		default:
			// Whole clusters become unallocated: zeros without a
			// backing file.
			if err := d.Discard(off, n); err != nil {
				t.Fatalf("discard %d+%d: %v", off, n, err)
			}
			got := make([]byte, n)
			if _, err := d.ReadAt(got, off); err != nil {
				t.Fatal(err)
			}
			m.Write(got, off)
		}
	}
}

// qemuCompare checks an encrypted qcow2 with qemu-img check and compares
// it with want (raw bytes) in qemu.
func qemuCompare(t *testing.T, file string, want []byte) {
	t.Helper()
	obj := "secret,id=sec0,data=" + encPass
	img := "driver=qcow2,file.filename=" + file + ",encrypt.key-secret=sec0"
	if out, code, err := qemutest.RunCode("qemu-img", "check", "--object", obj, "--image-opts", img); err != nil || code != 0 {
		t.Fatalf("qemu-img check: exit %d %v\n%s", code, err, out)
	}
	raw := file + ".want"
	if err := os.WriteFile(raw, want, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, code, err := qemutest.RunCode("qemu-img", "compare", "--object", obj, "--image-opts", img, "driver=raw,file.filename="+raw); err != nil || code != 0 {
		t.Fatalf("qemu-img compare: exit %d %v\n%s", code, err, out)
	}
}

// TestWriteEncrypted: encrypted qcow2 images vdisk creates and writes
// (several ciphers and layouts) pass qemu-img check and read in qemu as
// written; images qemu made and vdisk then writes too.
func TestWriteEncrypted(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	const size = 4 << 20
	for i, c := range []struct {
		name string
		opts []string
	}{
		{"xts-64k", nil},
		{"cbc-essiv-4k", []string{"encrypt.cipher-alg=aes-128", "encrypt.cipher-mode=cbc", "encrypt.ivgen-alg=essiv", "cluster_size=4k"}},
		{"extl2-16k", []string{"extended_l2=on", "cluster_size=16k", "encrypt.hash-alg=sha512"}},
		{"v2-512", []string{"compat=0.10", "cluster_size=512", "encrypt.cipher-alg=aes-192"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := filepath.Join(dir, c.name+".qcow2")
			d, err := encCreate(nil, f, size, "", c.opts...)
			if err != nil {
				t.Fatal(err)
			}
			if inf := d.Top().Info(); !inf.Encrypted || inf.EncryptFormat != "luks" {
				t.Fatalf("info: encrypted %v %q", inf.Encrypted, inf.EncryptFormat)
			}
			m := model.New(size)
			encOps(t, d, m, uint64(i))
			disktest.MustClose(t, d)
			qemuCompare(t, f, m.Data)
			// Reopen: vdisk reads it back, then qemu writes and vdisk
			// reads what qemu wrote, then vdisk writes over qemu's data.
			d, err = encOpen(nil, f, encPass, false)
			if err != nil {
				t.Fatal(err)
			}
			checkClean(t, d)
			if got := disktest.ReadAll(t, d); !bytes.Equal(got, m.Data) {
				t.Fatalf("reopened: differs at %d", firstDiff(got, m.Data))
			}
			disktest.MustClose(t, d)
			obj := "secret,id=sec0,data=" + encPass
			img := "driver=qcow2,file.filename=" + f + ",encrypt.key-secret=sec0"
			qemutest.Run(t, "qemu-io", "--object", obj, "--image-opts", img, "-c", "write -P 0x5a 1000 70000", "-c", "write -z 3M 64k")
			copy(m.Data[1000:], bytes.Repeat([]byte{0x5a}, 70000))
			clear(m.Data[3<<20 : 3<<20+64<<10])
			d, err = encOpen(nil, f, encPass, false)
			if err != nil {
				t.Fatal(err)
			}
			if got := disktest.ReadAll(t, d); !bytes.Equal(got, m.Data) {
				t.Fatalf("after qemu-io: differs at %d", firstDiff(got, m.Data))
			}
			encOps(t, d, m, uint64(i+100))
			disktest.MustClose(t, d)
			qemuCompare(t, f, m.Data)
		})
	}
}

// TestWriteEncryptedQemuImage: vdisk writes into an encrypted image qemu
// created and filled (partial sectors of qemu's clusters are decrypted and
// re-encrypted), and qemu reads the result.
func TestWriteEncryptedQemuImage(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	f := filepath.Join(dir, "q.qcow2")
	want := qemuEncrypted(t, f, encPass, "encrypt.format=luks,encrypt.iter-time=10",
		"write -P 0xa1 0 64k", "write -P 0xa2 1000k 100k", "write -z 2M 64k", "write -P 0xa3 3145728 1536")
	m := &model.Model{Data: want}
	d, err := encOpen(nil, f, encPass, false)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []struct {
		off int64
		n   int
		c   byte
	}{{100, 10, 1}, {65530, 20, 2}, {1000<<10 + 7, 3000, 3}, {2<<20 + 511, 2, 4}, {3145728 + 1000, 1000, 5}} {
		disktest.MustWrite(t, d, m, bytes.Repeat([]byte{w.c}, w.n), w.off)
	}
	encOps(t, d, m, 7)
	disktest.MustClose(t, d)
	qemuCompare(t, f, m.Data)
}

// TestEncryptedOverlay: an encrypted overlay on a plain raw base (partial
// writes copy the base's bytes up, encrypted), an internal snapshot whose
// clusters are copied on write (decrypted at the old host offset,
// re-encrypted at the new one), checked by qemu.
func TestEncryptedOverlay(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	const size = 2 << 20
	base := make([]byte, size)
	for i := range base {
		base[i] = byte(i*7 + i>>9)
	}
	if err := os.WriteFile(filepath.Join(dir, "base.raw"), base, 0o644); err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(dir, "top.qcow2")
	d, err := encCreate(nil, f, size, "base.raw")
	if err != nil {
		t.Fatal(err)
	}
	m := &model.Model{Data: append([]byte(nil), base...)}
	disktest.MustWrite(t, d, m, bytes.Repeat([]byte{0xee}, 100), 70000)
	disktest.MustWrite(t, d, m, bytes.Repeat([]byte{0xef}, 5000), 300000)
	if err := d.WriteZeroes(500000, 1000, false); err != nil {
		t.Fatal(err)
	}
	m.Zero(500000, 1000)
	sn, _ := vdisk.As[driver.Snapshotter](d.Top())
	if err := sn.CreateSnapshot("s1"); err != nil {
		t.Fatal(err)
	}
	snapData := append([]byte(nil), m.Data...)
	disktest.MustWrite(t, d, m, bytes.Repeat([]byte{0x11}, 10), 70050)
	disktest.MustWrite(t, d, m, bytes.Repeat([]byte{0x12}, 70000), 290000)
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, m.Data) {
		t.Fatalf("differs at %d", firstDiff(got, m.Data))
	}
	disktest.MustClose(t, d)
	qemuCompare(t, f, m.Data)
	// The snapshot still reads as it was, in vdisk and in qemu.
	d, err = vdisk.Open(ctx, f, &vdisk.OpenOptions{ReadOnly: true, Secrets: encSecrets(encPass), Snapshot: "s1",
		Options: disktest.KVs("encrypt.key-secret=sec0")})
	if err != nil {
		t.Fatal(err)
	}
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, snapData) {
		t.Fatalf("snapshot differs at %d", firstDiff(got, snapData))
	}
	disktest.MustClose(t, d)
	qemutest.Img(t, "snapshot", "--object", "secret,id=sec0,data="+encPass, "-a", "s1", "--image-opts", "driver=qcow2,file.filename="+f+",encrypt.key-secret=sec0")
	qemuCompare(t, f, snapData)
}

// TestEncryptedRefusals: a wrong or missing secret, legacy AES writes and
// creation, compression, preallocation and data files with encryption are
// refused with clear errors.
func TestEncryptedRefusals(t *testing.T) {
	st := memfs.New()
	d, err := encCreate(st, "/e.qcow2", 1<<20, "")
	if err != nil {
		t.Fatal(err)
	}
	disktest.MustWrite(t, d, model.New(1<<20), []byte("data"), 0)
	cw, _ := vdisk.As[driver.CompressedWriter](d.Top())
	if err := cw.WriteCompressed(make([]byte, 64<<10), 0); !errors.Is(err, driver.ErrUnsupported) || !strings.Contains(err.Error(), "compression and encryption") {
		t.Fatalf("compressed write: %v", err)
	}
	if err := d.Resize(ctx, 2<<20, "full"); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("resize with preallocation: %v", err)
	}
	disktest.MustClose(t, d)
	if _, err := encOpen(st, "/e.qcow2", "wrong", false); !errors.Is(err, luks.ErrPassphrase) {
		t.Fatalf("wrong passphrase: %v", err)
	}
	if _, err := vdisk.Open(ctx, "/e.qcow2", &vdisk.OpenOptions{Storage: st}); !errors.Is(err, driver.ErrInvalidOption) || !strings.Contains(err.Error(), "encrypt.key-secret") {
		t.Fatalf("no secret: %v", err)
	}
	d, err = vdisk.Open(ctx, "/e.qcow2", &vdisk.OpenOptions{Storage: st, InfoOnly: true})
	if err != nil {
		t.Fatalf("info without a key: %v", err)
	}
	if inf := d.Top().Info(); !inf.Encrypted {
		t.Fatal("info: not encrypted")
	}
	d.Close()
	for _, c := range []struct {
		opts []string
		want string
	}{
		{[]string{"encrypt.format=aes"}, "insecure"},
		{[]string{"encrypt.format=luks"}, "encrypt.key-secret"},
		{[]string{"encrypt.format=luks", "encrypt.key-secret=sec0", "preallocation=metadata"}, "preallocation"},
		{[]string{"encrypt.format=luks", "encrypt.key-secret=sec0", "data_file=d.raw"}, "data file"},
		{[]string{"encrypt.key-secret=sec0"}, "encrypt.format"},
		{[]string{"encrypt.format=luks", "encrypt.key-secret=nosuch"}, "nosuch"},
	} {
		_, err := vdisk.Create(ctx, "/r.qcow2", &vdisk.CreateOptions{Format: "qcow2", Size: 1 << 20, Storage: st,
			Secrets: encSecrets(encPass), Options: disktest.KVs(c.opts...)})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("create %v: %v, want an error naming %q", c.opts, err, c.want)
		}
	}
}

// TestModelEncrypted runs the reference model through encrypted qcow2
// images (10^4 operations, reopening with the key).
func TestModelEncrypted(t *testing.T) {
	for _, c := range []struct {
		name string
		opts []string
		io   int64
	}{
		{"xts-64k", nil, 32 << 10},
		{"extl2-16k-cbc", []string{"extended_l2=on", "cluster_size=16k", "encrypt.cipher-mode=cbc", "encrypt.ivgen-alg=essiv"}, 24 << 10},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			st := memfs.New()
			const size = 4 << 20
			d, err := encCreate(st, "/m.qcow2", size, "", c.opts...)
			if err != nil {
				t.Fatal(err)
			}
			reopens := 0
			h := &model.Harness{Seed: int64(len(c.name)), Ops: 10000, MaxIO: c.io,
				Reopen: func(d *vdisk.Disk) (*vdisk.Disk, error) {
					if err := d.Close(); err != nil {
						return nil, err
					}
					nd, err := encOpen(st, "/m.qcow2", encPass, false)
					if err != nil {
						return nil, err
					}
					if reopens++; reopens%4 == 1 {
						checkClean(t, nd)
					}
					return nd, nil
				}}
			d = h.Run(t, d, model.New(size))
			checkClean(t, d)
			disktest.MustClose(t, d)
		})
	}
}

// TestModelEncryptedOverlay runs the model over an encrypted overlay of a
// plain base, with snapshot steps growing the chain.
func TestModelEncryptedOverlay(t *testing.T) {
	st := memfs.New()
	const size = 2 << 20
	m := model.New(size)
	base, err := vdisk.Create(ctx, "/base.raw", &vdisk.CreateOptions{Format: "raw", Size: size, Storage: st})
	if err != nil {
		t.Fatal(err)
	}
	pat := bytes.Repeat([]byte{0xb7, 0x13, 0x55}, 200000)
	disktest.MustWrite(t, base, m, pat, 1000)
	disktest.MustClose(t, base)
	d, err := encCreate(st, "/top.qcow2", size, "base.raw", "cluster_size=4k")
	if err != nil {
		t.Fatal(err)
	}
	h := &model.Harness{Seed: 11, Ops: 10000, MaxIO: 20 << 10,
		Reopen: func(d *vdisk.Disk) (*vdisk.Disk, error) {
			if err := d.Close(); err != nil {
				return nil, err
			}
			return encOpen(st, "/top.qcow2", encPass, false)
		}}
	d = h.Run(t, d, m)
	checkClean(t, d)
	disktest.MustClose(t, d)
}

// TestCrashEncrypted crashes the storage after writes of a workload on an
// encrypted image (allocation, copy on write into snapshots, zeroing,
// discards): the image opens with its key, checks with at most leaks, and
// every flushed word reads back (decrypted) as flushed.
func TestCrashEncrypted(t *testing.T) {
	layouts := []struct {
		name   string
		opts   []string
		cs     int64
		points int
		snaps  bool
	}{
		{"xts-4k-snapshots", []string{"cluster_size=4k"}, 4 << 10, 50, true},
		{"extl2-16k", []string{"extended_l2=on", "cluster_size=16k"}, 16 << 10, 30, false},
		{"v2-512", []string{"compat=0.10", "cluster_size=512"}, 512, 30, false},
	}
	const size = 512 << 10
	total := 0
	for _, l := range layouts {
		total += l.points
	}
	if total < 100 {
		t.Fatalf("only %d crash points", total)
	}
	for li, l := range layouts {
		t.Run(l.name, func(t *testing.T) {
			t.Parallel()
			ops := crashWorkload(uint64(li+31), size, 150, l.cs, l.snaps)
			// The image is created once; every run starts from a copy.
			mem0 := memfs.New()
			d, err := encCreate(mem0, "/c.qcow2", size, "", l.opts...)
			if err != nil {
				t.Fatal(err)
			}
			disktest.MustClose(t, d)
			img, err := mem0.ReadFile("/c.qcow2")
			if err != nil {
				t.Fatal(err)
			}
			start := func() (*memfs.FS, *faultfs.FS, *vdisk.Disk) {
				mem := memfs.New()
				mem.WriteFile("/c.qcow2", img)
				ffs := faultfs.New(mem)
				d, err := encOpen(ffs, "/c.qcow2", encPass, false)
				if err != nil {
					t.Fatal(err)
				}
				return mem, ffs, d
			}
			newState := func() *crashState {
				return &crashState{flushed: make([]uint64, size/8), dirty: map[int64]bool{}, alt: map[int64]uint64{}, curAlt: map[int64]uint64{}}
			}
			_, ffs, d := start()
			base := ffs.Writes()
			if err := runCrashOps(d, ops, newState(), make([]uint64, size/8)); err != nil {
				t.Fatal(err)
			}
			d.Close()
			nw := ffs.Writes() - base
			rng := rand.New(rand.NewPCG(uint64(li), 77))
			for p := 0; p < l.points; p++ {
				n := 1 + rng.IntN(nw)
				mem, ffs, d := start()
				st := newState()
				ffs.CrashAfterWrites(n)
				err := runCrashOps(d, ops, st, make([]uint64, size/8))
				if !ffs.Crashed() {
					t.Fatalf("crash point %d of %d never reached (%v)", n, nw, err)
				}
				d.Close()
				label := fmt.Sprintf("crash after write %d/%d", n, nw)
				oo := vdisk.OpenOptions{Secrets: encSecrets(encPass), Options: disktest.KVs("encrypt.key-secret=sec0")}
				verifyCrashedWith(t, label+" (durable)", oo, ffs.Durable(), "/c.qcow2", size, st, p%3 == 0, l.snaps)
				verifyCrashedWith(t, label+" (in-order)", oo, mem.Clone(), "/c.qcow2", size, st, p%3 == 1, l.snaps)
			}
		})
	}
}
