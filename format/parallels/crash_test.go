package parallels

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/faultfs"
	"github.com/vdisk/vdisk/storage/memfs"
)

// checkCrashed opens the image that survived a crash: read-only it reads
// exactly what was flushed (and shows the dirty flag when the crash came
// after the open); read-write it is repaired on open, reads the same, and
// checks clean; qemu-img check and compare agree.
func checkCrashed(t *testing.T, st driver.Storage, name string, want []byte, dirty bool, what string) {
	t.Helper()
	d, err := vdisk.Open(ctx, name, &vdisk.OpenOptions{Storage: st, ReadOnly: true})
	if err != nil {
		t.Fatalf("%s: the image does not open after the crash: %v", what, err)
	}
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
		i := 0
		for got[i] == want[i] {
			i++
		}
		t.Fatalf("%s: content after the crash differs from what was flushed at %d: %x want %x", what, i, got[i], want[i])
	}
	if dirty && !d.Top().Info().Dirty {
		t.Fatalf("%s: the inuse flag is not set after a crash", what)
	}
	res, err := d.Check(ctx, driver.RepairNone)
	if err != nil || (dirty && res.Corruptions == 0) {
		t.Fatalf("%s: check of the crashed image: %+v %v", what, res, err)
	}
	disktest.MustClose(t, d)

	d, err = vdisk.Open(ctx, name, &vdisk.OpenOptions{Storage: st, Options: small})
	if err != nil {
		t.Fatalf("%s: no read-write open (with repair) after the crash: %v", what, err)
	}
	if d.Top().Info().Dirty {
		t.Fatalf("%s: still dirty after the repair on open", what)
	}
	res, err = d.Check(ctx, driver.RepairNone)
	if err != nil || res.Corruptions+res.Leaks != 0 {
		t.Fatalf("%s: check after the repair on open: %+v %v %q", what, res, err, res.Messages)
	}
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
		t.Fatalf("%s: the repair changed the content", what)
	}
	disktest.MustClose(t, d)
}

// qemuAgrees hands the repaired image to qemu-img check and compare.
func qemuAgrees(t *testing.T, st driver.Storage, name string, want []byte, dir string) {
	t.Helper()
	mem := memfs.New()
	f, _ := st.Open(name, driver.ReadOnly)
	sz, _ := f.Size()
	b := make([]byte, sz)
	f.ReadAt(b, 0)
	f.Close()
	mem.WriteFile(name, b)
	img := disktest.SaveTo(t, mem, name, dir)
	ref := filepath.Join(dir, "want.raw")
	disktest.WriteFile(t, ref, want)
	qemutest.Check(t, "parallels", img)
	if !qemutest.Compare(t, "parallels", img, "raw", ref) {
		t.Fatal("qemu-img compare: the repaired image differs from what was flushed")
	}
}

// TestCrashWrites: allocating and in-place writes, whole-cluster discards
// and write-zeroes with flushes, cut by a crash after every write
// operation: what was flushed survives, the dirty flag shows, the repair
// on open leaves an image that qemu-img checks clean.
func TestCrashWrites(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	const size = 1 << 20
	const cs = 32 << 10
	setup := func() (*memfs.FS, *model.Model) {
		mem := memfs.New()
		m := model.New(size)
		d := createPrl(t, mem, "/c.hds", size, driver.KV{Key: "cluster_size", Value: "32k"}, driver.KV{Key: "prealloc-size", Value: "128k"})
		for i := int64(0); i+70000 < size; i += 192 << 10 {
			disktest.MustWrite(t, d, m, disktest.Fill(70000, byte(i>>16)+1), i)
		}
		disktest.MustClose(t, d)
		return mem, m
	}
	phase := func(st driver.Storage, m *model.Model, opts []driver.KV, crash func()) []byte {
		d, err := vdisk.Open(ctx, "/c.hds", &vdisk.OpenOptions{Storage: st, Options: opts})
		if err != nil {
			t.Fatal(err)
		}
		crash()
		flushed := bytes.Clone(m.Data)
		rng := rand.New(rand.NewPCG(7, 7))
		for i := range 60 {
			switch {
			case i%7 == 6:
				if d.Flush() != nil {
					d.Close()
					return flushed
				}
				flushed = bytes.Clone(m.Data)
				continue
			case i%11 == 5:
				c := rng.Int64N(size/cs - 2)
				if d.Discard(c*cs, 2*cs) != nil {
					break
				}
				m.Zero(c*cs, 2*cs)
				continue
			case i%13 == 4:
				off := rng.Int64N(size - 50000)
				if d.WriteZeroes(off, 50000, rng.IntN(2) == 0) != nil {
					break
				}
				m.Zero(off, 50000)
				continue
			}
			n := rng.Int64N(50000) + 1
			off := rng.Int64N(size - n)
			p := disktest.Fill(int(n), byte(i+1))
			if _, err := d.WriteAt(p, off); err != nil {
				break
			}
			m.Write(p, off)
		}
		// Close flushes first (the container's safe close).
		if d.Flush() == nil {
			flushed = bytes.Clone(m.Data)
		}
		d.Close()
		return flushed
	}
	points := 0
	for _, opts := range [][]driver.KV{
		{{Key: "prealloc-size", Value: "128k"}},
		{{Key: "prealloc-mode", Value: "truncate"}, {Key: "prealloc-size", Value: "0"}},
	} {
		mem, m := setup()
		ffs := faultfs.New(mem)
		phase(ffs, m, opts, func() { ffs.Reset() })
		total := ffs.Writes()
		if total < 50 {
			t.Fatalf("only %d write operations", total)
		}
		for k := 1; k <= total; k++ {
			mem, m := setup()
			ffs := faultfs.New(mem)
			flushed := phase(ffs, m, opts, func() { ffs.CrashAfterWrites(k) })
			what := fmt.Sprintf("%v: crash after write %d of %d", opts, k, total)
			checkCrashed(t, ffs.Durable(), "/c.hds", flushed, true, what)
			points++
			if k%20 == 0 || k == total {
				dur := ffs.Durable()
				d := openPrl(t, dur, "/c.hds", false, small...) // repairs
				disktest.MustClose(t, d)
				qemuAgrees(t, dur, "/c.hds", flushed, dir)
			}
		}
	}
	if points < 100 {
		t.Fatalf("only %d crash points", points)
	}
	t.Logf("%d crash points", points)
}

// TestCrashGrow: growing the disk so far that clusters move out of the
// BAT's way survives a crash at every write with the content intact.
func TestCrashGrow(t *testing.T) {
	const size = 1 << 20
	mem := memfs.New()
	m := model.New(size)
	d := createPrl(t, mem, "/g.hds", size, driver.KV{Key: "cluster_size", Value: "4k"}, driver.KV{Key: "prealloc-size", Value: "0"})
	for i := int64(0); i+5000 < size; i += 12 << 10 {
		disktest.MustWrite(t, d, m, disktest.Fill(5000, byte(i>>12)+1), i)
	}
	disktest.MustClose(t, d)
	run := func(crash func(*faultfs.FS)) (*faultfs.FS, error) {
		ffs := faultfs.New(mem.Clone())
		d, err := vdisk.Open(ctx, "/g.hds", &vdisk.OpenOptions{Storage: ffs, Options: small})
		if err != nil {
			t.Fatal(err)
		}
		crash(ffs)
		err = d.Resize(ctx, 16<<20, "")
		d.Close()
		return ffs, err
	}
	ffs, err := run(func(f *faultfs.FS) { f.Reset() })
	if err != nil {
		t.Fatal(err)
	}
	total := ffs.Writes()
	if total < 10 {
		t.Fatalf("only %d write operations", total)
	}
	grown := append(bytes.Clone(m.Data), make([]byte, 15<<20)...)
	checkCrashed(t, ffs.Durable(), "/g.hds", grown, false, "no crash")
	for k := 1; k < total; k++ {
		ffs, _ := run(func(f *faultfs.FS) { f.CrashAfterWrites(k) })
		st := ffs.Durable()
		d := openPrl(t, st, "/g.hds", true)
		want := m.Data
		if d.Size() != size {
			want = grown
		}
		disktest.MustClose(t, d)
		checkCrashed(t, st, "/g.hds", want, true, fmt.Sprintf("grow: crash after write %d of %d", k, total))
	}
}
