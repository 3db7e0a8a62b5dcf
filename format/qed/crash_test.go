package qed

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

// checkCrashed opens the chain top from the storage that survived a crash:
// it opens read-only and reads what was flushed; a read-write open
// (which checks and repairs a need-check image) leaves an image that
// checks clean with the same content. With dir set, qemu-img check must
// find the repaired image clean too, and qemu's own open-time repair of
// the unrepaired image must leave no corruption.
func checkCrashed(t *testing.T, st *memfs.FS, top string, want, also []byte, what, dir string) {
	t.Helper()
	raw, _ := st.ReadFile(top)
	d, err := vdisk.Open(ctx, top, &vdisk.OpenOptions{Storage: st, ReadOnly: true})
	if err != nil {
		t.Fatalf("%s: the image does not open after the crash: %v", what, err)
	}
	got := disktest.ReadAll(t, d)
	disktest.MustClose(t, d)
	if also != nil && bytes.Equal(got, also) {
		want = also
	}
	if !bytes.Equal(got, want) {
		i := 0
		for got[i] == want[i] {
			i++
		}
		t.Fatalf("%s: content after the crash differs from what was flushed at %d: %#x, want %#x", what, i, got[i], want[i])
	}
	d, err = vdisk.Open(ctx, top, &vdisk.OpenOptions{Storage: st})
	if err != nil {
		t.Fatalf("%s: no read-write open after the crash: %v", what, err)
	}
	if topImage(d).Info().Dirty {
		t.Fatalf("%s: the need-check flag survived the open-time repair", what)
	}
	res, err := d.Check(ctx, driver.RepairNone)
	if err != nil || res.Corruptions+res.Leaks != 0 {
		t.Fatalf("%s: check after the open-time repair: %+v %v %q", what, res, err, res.Messages)
	}
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
		t.Fatalf("%s: repair changed the content", what)
	}
	disktest.MustClose(t, d)
	if dir == "" {
		return
	}
	disktest.SaveTo(t, st, "/base.qed", dir)
	qemutest.Check(t, "qed", disktest.SaveTo(t, st, top, dir))
	// qemu's own handling of the crashed image: opening it read-write
	// checks and repairs it when the need-check flag is set.
	p := filepath.Join(dir, "crashed.qed")
	disktest.WriteFile(t, p, raw)
	qemutest.IO(t, "qed", p, "read 0 512")
	out, code, err := qemutest.RunCode("qemu-img", "check", "-f", "qed", p)
	if err != nil || (code != 0 && code != 3) {
		t.Fatalf("%s: qemu-img check after qemu's repair: exit %d %v\n%s", what, code, err, out)
	}
}

// TestCrashWrites: writes (allocating, in place, copy-on-write over a
// backing file), zero writes and discards with flushes, cut by a crash
// after every write operation (>= 100 points): what was flushed survives,
// the image opens and is repaired on its read-write open.
func TestCrashWrites(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	const size = 1 << 20
	opts := disktest.KVs("cluster_size=4k", "table_size=2")
	var mem0 *memfs.FS
	var m0 *model.Model
	setup := func() (*memfs.FS, *model.Model) {
		if mem0 != nil {
			m := model.New(size)
			copy(m.Data, m0.Data)
			return mem0.Clone(), m
		}
		mem := memfs.New()
		m := model.New(size)
		b := createQED(t, mem, "/base.qed", size, "", "", opts...)
		for i := int64(0); i < size; i += 96 << 10 {
			disktest.MustWrite(t, b, m, disktest.Fill(35000, byte(i>>15)+1), i)
		}
		disktest.MustClose(t, b)
		top := createQED(t, mem, "/top.qed", 0, "base.qed", "", opts...)
		disktest.MustWrite(t, top, m, disktest.Fill(50000, 0xAB), 25000)
		disktest.MustClose(t, top)
		mem0, m0 = mem.Clone(), model.New(size)
		copy(m0.Data, m.Data)
		return mem, m
	}
	// phase runs the crash-prone phase and returns the last flushed
	// content, and the content at a flush the crash cut (or nil).
	phase := func(st driver.Storage, m *model.Model, crash func()) (flushed, also []byte) {
		d, err := vdisk.Open(ctx, "/top.qed", &vdisk.OpenOptions{Storage: st})
		if err != nil {
			t.Fatal(err)
		}
		crash()
		flushed = bytes.Clone(m.Data)
		rng := rand.New(rand.NewPCG(7, 7))
		for i := 0; i < 32; i++ {
			n := rng.Int64N(50000) + 1
			off := rng.Int64N(size - n)
			var err error
			switch i % 8 {
			case 7:
				if err := d.Flush(); err != nil {
					// A flush cut by the crash may have made everything
					// before it durable.
					also = bytes.Clone(m.Data)
					break
				}
				flushed = bytes.Clone(m.Data)
				continue
			case 3:
				if err = d.WriteZeroes(off, n, i%2 == 1); err == nil {
					m.Zero(off, n)
				}
			case 5:
				if err = d.Discard(off, n); err == nil {
					m.Discard(off, n)
					// Discarded clusters read the backing file again.
					got := make([]byte, n)
					if _, err = d.ReadAt(got, off); err == nil {
						m.Learn(got, off)
					}
				}
			default:
				p := disktest.Fill(int(n), byte(i+1))
				if _, err = d.WriteAt(p, off); err == nil {
					m.Write(p, off)
				}
			}
			if err != nil {
				break
			}
		}
		d.Close()
		return flushed, also
	}
	mem, m := setup()
	ffs := faultfs.New(mem)
	phase(ffs, m, func() { ffs.Reset() })
	total := ffs.Writes()
	if total < 100 {
		t.Fatalf("only %d write operations", total)
	}
	step := max(1, total/150)
	points := 0
	for k := 1; k <= total; k += step {
		mem, m := setup()
		ffs := faultfs.New(mem)
		flushed, also := phase(ffs, m, func() { ffs.CrashAfterWrites(k) })
		qdir := ""
		if points%25 == 0 {
			qdir = dir
		}
		checkCrashed(t, ffs.Durable().(*memfs.FS), "/top.qed", flushed, also, fmt.Sprintf("crash after write %d of %d", k, total), qdir)
		points++
	}
	if points < 100 {
		t.Fatalf("only %d crash points", points)
	}
	t.Logf("%d crash points over %d write operations", points, total)
}
