package qcow

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/storage/faultfs"
	"github.com/vdisk/vdisk/storage/memfs"
)

// crashState is what a crash test knows at the crash: the content as of
// the last flush, and which bytes were written since.
type crashState struct {
	flushed []byte
	dirty   []bool
}

// checkCrashed opens the chain top from the storage that survived a crash
// and checks that it opens, that every byte not written since the last
// flush reads as flushed (all of them when dirty is nil), and, with
// write, that it takes writes again.
func checkCrashed(t *testing.T, st driver.Storage, top string, cs crashState, write bool, what string) {
	t.Helper()
	d, err := vdisk.Open(ctx, top, &vdisk.OpenOptions{Storage: st, ReadOnly: true})
	if err != nil {
		t.Fatalf("%s: the image does not open after the crash: %v", what, err)
	}
	got := disktest.ReadAll(t, d)
	disktest.MustClose(t, d)
	for i := range cs.flushed {
		if got[i] != cs.flushed[i] && (cs.dirty == nil || !cs.dirty[i]) {
			t.Fatalf("%s: byte %d reads %#x after the crash, %#x was flushed", what, i, got[i], cs.flushed[i])
		}
	}
	if !write {
		return
	}
	d, err = vdisk.Open(ctx, top, &vdisk.OpenOptions{Storage: st})
	if err != nil {
		t.Fatalf("%s: no read-write open after the crash: %v", what, err)
	}
	p := disktest.Fill(5000, 0xee)
	disktest.MustWrite(t, d, nil, p, 70000)
	copy(got[70000:], p)
	if again := disktest.ReadAll(t, d); !bytes.Equal(again, got) {
		t.Fatalf("%s: a write after the crash reads wrong", what)
	}
	disktest.MustClose(t, d)
}

// TestCrashWrites: random writes (allocating clusters and L2 tables, in
// place, copy-on-write over a backing file, into compressed clusters)
// with flushes, cut by a crash after every write operation. Two models of
// what survives: only synced state (faultfs's Durable: what was flushed
// survives exactly), and every write issued before the crash, in order
// (the storage as it stood at the crash: bytes not written since the
// last flush read as flushed, and the image opens: data is written
// before the entries pointing at it).
func TestCrashWrites(t *testing.T) {
	const size = 1 << 20
	setup := func(top string) (*memfs.FS, *model.Model) {
		mem := memfs.New()
		m := model.New(size)
		withGeometry(t, 12, 9)
		b := createQcow(t, mem, "/base.qcow", size, "")
		cw := topImage(b)
		for off := int64(0); off < size; off += 24 << 10 {
			p := bytes.Repeat([]byte(fmt.Sprintf("base %d ", off)), 1000)[:4096]
			if err := cw.WriteCompressed(p, off); err != nil {
				t.Fatal(err)
			}
			m.Write(p, off)
		}
		for i := int64(0); i < size-100000; i += 192 << 10 {
			disktest.MustWrite(t, b, m, disktest.Fill(70000, byte(i>>16)+1), i+8192)
		}
		disktest.MustClose(t, b)
		if top == "/base.qcow" {
			return mem, m
		}
		withGeometry(t, 9, 12)
		d := createQcow(t, mem, "/top.qcow", 0, "base.qcow")
		disktest.MustWrite(t, d, m, disktest.Fill(100000, 0xAB), 50000)
		disktest.MustClose(t, d)
		return mem, m
	}
	phase := func(top string, st driver.Storage, m *model.Model, crash func(), cs *crashState) {
		d, err := vdisk.Open(ctx, top, &vdisk.OpenOptions{Storage: st})
		if err != nil {
			t.Fatal(err)
		}
		crash()
		cs.flushed = bytes.Clone(m.Data)
		cs.dirty = make([]bool, size)
		rng := rand.New(rand.NewPCG(7, 7))
		for i := 0; i < 40; i++ {
			if i%7 == 6 {
				if d.Flush() != nil {
					break
				}
				cs.flushed = bytes.Clone(m.Data)
				clear(cs.dirty)
				continue
			}
			n := rng.Int64N(30000) + 1
			off := rng.Int64N(size - n)
			p := disktest.Fill(int(n), byte(i+1))
			for j := off; j < off+n; j++ {
				cs.dirty[j] = true
			}
			if _, err := d.WriteAt(p, off); err != nil {
				break
			}
			m.Write(p, off)
		}
		d.Close()
	}
	for _, top := range []string{"/top.qcow", "/base.qcow"} {
		t.Run(top[1:], func(t *testing.T) {
			mem0, m0 := setup(top)
			mem, m := mem0.Clone(), &model.Model{Data: bytes.Clone(m0.Data)}
			ffs := faultfs.New(mem)
			var cs crashState
			phase(top, ffs, m, func() { ffs.Reset() }, &cs)
			total := ffs.Writes()
			if total < 50 {
				t.Fatalf("only %d write operations", total)
			}
			points := 0
			for k := 1; k <= total; k++ {
				mem, m := mem0.Clone(), &model.Model{Data: bytes.Clone(m0.Data)}
				ffs := faultfs.New(mem)
				var cs crashState
				phase(top, ffs, m, func() { ffs.CrashAfterWrites(k) }, &cs)
				what := fmt.Sprintf("crash after write %d of %d", k, total)
				checkCrashed(t, ffs.Durable(), top, crashState{flushed: cs.flushed}, true, what+" (synced state)")
				checkCrashed(t, mem, top, cs, false, what+" (all writes before the crash)")
				points++
			}
			t.Logf("%d crash points", points)
		})
	}
}

// TestCrashCompressedConvert: a crash at any point of a compressed
// convert (flushed every 16 clusters) leaves an image that opens and
// reads, for every cluster, the source's data or zeros, and the source's
// data for every cluster flushed before the crash (synced state); the
// same holds for every write issued before the crash, in order.
func TestCrashCompressedConvert(t *testing.T) {
	const size = 512 << 10
	const unit = 4096
	src := make([]byte, size)
	for i := range src {
		src[i] = byte(i/7) ^ byte(i>>13)
	}
	// run returns how many clusters were flushed.
	run := func(ffs *faultfs.FS, crash func()) int64 {
		d := createQcow(t, ffs, "/c.qcow", size, "")
		if err := d.Flush(); err != nil { // the new, empty image is durable
			t.Fatal(err)
		}
		crash()
		cw := topImage(d)
		flushed := int64(0)
		for off := int64(0); off < size; off += unit {
			if cw.WriteCompressed(src[off:off+unit], off) != nil {
				break
			}
			if (off/unit)%16 == 15 {
				if d.Flush() != nil {
					break
				}
				flushed = off + unit
			}
		}
		d.Close()
		return flushed
	}
	ffs := faultfs.New(memfs.New())
	run(ffs, func() { ffs.Reset() })
	total := ffs.Writes()
	if total < 16 {
		t.Fatalf("only %d write operations", total)
	}
	for k := 1; k <= total; k++ {
		mem := memfs.New()
		ffs := faultfs.New(mem)
		flushed := run(ffs, func() { ffs.CrashAfterWrites(k) })
		for _, st := range []struct {
			st      driver.Storage
			flushed int64
		}{{ffs.Durable(), flushed}, {mem, 0}} {
			d, err := vdisk.Open(ctx, "/c.qcow", &vdisk.OpenOptions{Storage: st.st, ReadOnly: true})
			if err != nil {
				t.Fatalf("crash after write %d of %d: %v", k, total, err)
			}
			got := disktest.ReadAll(t, d)
			disktest.MustClose(t, d)
			for off := int64(0); off < size; off += unit {
				c := got[off : off+unit]
				if !bytes.Equal(c, src[off:off+unit]) && (off < st.flushed || !driver.IsZero(c)) {
					t.Fatalf("crash after write %d of %d: cluster at %d reads neither the source nor zeros (%d bytes flushed)", k, total, off, st.flushed)
				}
			}
		}
	}
	t.Logf("%d crash points", total)
}

// TestCrashMakeEmpty: a crash at any point of MakeEmpty leaves an image
// that reads either its old content or its backing file's.
func TestCrashMakeEmpty(t *testing.T) {
	const size = 1 << 20
	mem := memfs.New()
	b := createQcow(t, mem, "/base.qcow", size, "")
	disktest.MustWrite(t, b, nil, disktest.Fill(size, 0x42), 0)
	disktest.MustClose(t, b)
	top := createQcow(t, mem, "/top.qcow", 0, "base.qcow")
	disktest.MustWrite(t, top, nil, disktest.Fill(300000, 0x43), 1000)
	old := disktest.ReadAll(t, top)
	disktest.MustClose(t, top)
	empty := disktest.Fill(size, 0x42)
	for k := 1; k <= 3; k++ {
		inner := mem.Clone()
		ffs := faultfs.New(inner)
		d := openQcow(t, ffs, "/top.qcow", false)
		ffs.CrashAfterWrites(k)
		topImage(d).MakeEmpty()
		d.Close()
		for _, st := range []driver.Storage{ffs.Durable(), inner} {
			d := openQcow(t, st, "/top.qcow", true)
			got := disktest.ReadAll(t, d)
			disktest.MustClose(t, d)
			if !bytes.Equal(got, old) && !bytes.Equal(got, empty) {
				t.Fatalf("crash after write %d of make-empty: the image reads neither its old content nor its backing file", k)
			}
		}
	}
}
