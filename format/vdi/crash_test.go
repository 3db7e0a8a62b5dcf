package vdi

import (
	"bytes"
	"encoding/binary"
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

// checkCrashed opens the chain top from the storage that survived a crash
// and checks that it opens, reads want, and holds no inconsistency worse
// than leaked data blocks (and the count mismatch they imply); a repair
// then leaves it clean with the same content.
func checkCrashed(t *testing.T, st driver.Storage, top string, want []byte, what string) {
	t.Helper()
	d, err := vdisk.Open(ctx, top, &vdisk.OpenOptions{Storage: st, ReadOnly: true})
	if err != nil {
		t.Fatalf("%s: the image does not open after the crash: %v", what, err)
	}
	got := disktest.ReadAll(t, d)
	disktest.MustClose(t, d)
	if len(got) < len(want) || !bytes.Equal(got[:len(want)], want) || !driver.IsZero(got[len(want):]) {
		t.Fatalf("%s: content after the crash differs from what was flushed", what)
	}
	d, err = vdisk.Open(ctx, top, &vdisk.OpenOptions{Storage: st})
	if err != nil {
		t.Fatalf("%s: no read-write open after the crash: %v", what, err)
	}
	im := topImage(d)
	if im.broken != "" {
		t.Fatalf("%s: the crash left an image that refuses writes: %s", what, im.broken)
	}
	sc := im.scan(disktest.FileSize(t, st, top), true)
	if len(sc.pastEOF)+len(sc.partial)+len(sc.dups)+len(sc.tooLarge) != 0 {
		t.Fatalf("%s: the crash left a damaged block map: %+v", what, sc)
	}
	res, err := d.Check(ctx, driver.RepairAll)
	if err != nil || res.Corruptions+res.Leaks != 0 {
		t.Fatalf("%s: repair after the crash: %+v %v", what, res, err)
	}
	if got := disktest.ReadAll(t, d); !bytes.Equal(got[:len(want)], want) {
		t.Fatalf("%s: repair changed the content", what)
	}
	disktest.MustClose(t, d)
}

// TestCrashWrites: random writes (allocating, in place, copy-on-write over
// a parent) with flushes, cut by a crash after every possible write
// operation: what was flushed survives and the chain opens.
func TestCrashWrites(t *testing.T) {
	const size = 2 << 20
	opts := []driver.KV{{Key: "block_size", Value: "64K"}}
	setup := func() (*memfs.FS, *model.Model) {
		mem := memfs.New()
		m := model.New(size)
		b := createVDI(t, mem, "/base.vdi", size, "", opts...)
		for i := int64(0); i < size; i += 192 << 10 {
			disktest.MustWrite(t, b, m, disktest.Fill(70000, byte(i>>16)), i)
		}
		disktest.MustClose(t, b)
		top := createVDI(t, mem, "/top.vdi", 0, "base.vdi", opts...)
		disktest.MustWrite(t, top, m, disktest.Fill(100000, 0xAB), 50000)
		disktest.MustClose(t, top)
		return mem, m
	}
	// phaseB runs the crash-prone phase and returns the last flushed content.
	phaseB := func(st driver.Storage, m *model.Model, crash func()) []byte {
		d, err := vdisk.Open(ctx, "/top.vdi", &vdisk.OpenOptions{Storage: st})
		if err != nil {
			t.Fatal(err)
		}
		crash()
		flushed := bytes.Clone(m.Data)
		rng := rand.New(rand.NewPCG(7, 7))
		for i := 0; i < 30; i++ {
			if i%7 == 6 {
				if d.Flush() != nil {
					break
				}
				flushed = bytes.Clone(m.Data)
				continue
			}
			n := rng.Int64N(100000) + 1
			off := rng.Int64N(size - n)
			p := disktest.Fill(int(n), byte(i+1))
			if _, err := d.WriteAt(p, off); err != nil {
				break
			}
			m.Write(p, off)
		}
		d.Close()
		return flushed
	}
	// Count the write operations of the phase.
	mem, m := setup()
	ffs := faultfs.New(mem)
	phaseB(ffs, m, func() { ffs.Reset() })
	total := ffs.Writes()
	if total < 20 {
		t.Fatalf("only %d write operations", total)
	}
	step := max(1, total/25)
	for k := 1; k <= total; k += step {
		mem, m := setup()
		ffs := faultfs.New(mem)
		flushed := phaseB(ffs, m, func() { ffs.CrashAfterWrites(k) })
		checkCrashed(t, ffs.Durable(), "/top.vdi", flushed, fmt.Sprintf("crash after write %d of %d", k, total))
	}
}

// crashEach runs op on a fresh copy of mem for every crash point and checks
// the surviving image reads want.
func crashEach(t *testing.T, mem *memfs.FS, top string, want []byte, op func(d *vdisk.Disk) error) {
	t.Helper()
	run := func(crash func(*faultfs.FS)) (*faultfs.FS, error) {
		ffs := faultfs.New(mem.Clone())
		d, err := vdisk.Open(ctx, top, &vdisk.OpenOptions{Storage: ffs})
		if err != nil {
			t.Fatal(err)
		}
		crash(ffs)
		err = op(d)
		d.Close()
		return ffs, err
	}
	ffs, err := run(func(f *faultfs.FS) { f.Reset() })
	if err != nil {
		t.Fatal(err)
	}
	total := ffs.Writes()
	if total < 3 {
		t.Fatalf("only %d write operations", total)
	}
	checkCrashed(t, ffs.Durable(), top, want, "no crash")
	for k := 1; k < total; k++ {
		ffs, err := run(func(f *faultfs.FS) { f.CrashAfterWrites(k) })
		if err == nil && !ffs.Crashed() {
			t.Fatalf("crash after write %d of %d did not happen", k, total)
		}
		checkCrashed(t, ffs.Durable(), top, want, fmt.Sprintf("crash after write %d of %d", k, total))
	}
}

// TestCrashCompact: a kill at any point of a compaction (of a differencing
// image: blocks equal to the parent, zero blocks, blocks to move) leaves an
// image that opens and reads the same.
func TestCrashCompact(t *testing.T) {
	const size = 2 << 20
	opts := []driver.KV{{Key: "block_size", Value: "64K"}}
	mem := memfs.New()
	m := model.New(size)
	b := createVDI(t, mem, "/base.vdi", size, "", opts...)
	disktest.MustWrite(t, b, m, disktest.Fill(size/2, 3), 0)
	disktest.MustClose(t, b)
	top := createVDI(t, mem, "/top.vdi", 0, "base.vdi", opts...)
	for i := int64(0); i < size; i += 64 << 10 {
		switch (i >> 16) % 4 {
		case 0: // equal to the parent
			p := bytes.Clone(m.Data[i : i+64<<10])
			disktest.MustWrite(t, top, m, p, i)
		case 1: // zeros
			disktest.MustWrite(t, top, m, []byte{1}, i)
			disktest.MustWrite(t, top, m, []byte{0}, i)
		default: // data
			disktest.MustWrite(t, top, m, disktest.Fill(64<<10, byte(i>>16)), i)
		}
	}
	disktest.MustClose(t, top)
	crashEach(t, mem, "/top.vdi", m.Data, func(d *vdisk.Disk) error { return d.Compact(ctx, nil) })
}

// TestCrashDiscard: unmapping zeroed blocks (which moves the last blocks
// into the holes) survives a crash at any point with the content intact.
func TestCrashDiscard(t *testing.T) {
	const size = 2 << 20
	opts := []driver.KV{{Key: "block_size", Value: "64K"}}
	mem := memfs.New()
	m := model.New(size)
	d := createVDI(t, mem, "/z.vdi", size, "", opts...)
	for i := int64(0); i < size; i += 64 << 10 {
		disktest.MustWrite(t, d, m, disktest.Fill(64<<10, byte(i>>16)+1), i)
	}
	for _, i := range []int64{1, 4, 5, 9} {
		if err := d.WriteZeroes(i<<16, 64<<10, false); err != nil {
			t.Fatal(err)
		}
		m.Zero(i<<16, 64<<10)
	}
	disktest.MustClose(t, d)
	crashEach(t, mem, "/z.vdi", m.Data, func(d *vdisk.Disk) error {
		for _, i := range []int64{1, 4, 5, 9} {
			if err := d.WriteZeroes(i<<16, 64<<10, true); err != nil {
				return err
			}
		}
		return nil
	})
}

// TestCrashGrow: growing an image whose block map must push data blocks
// out of its way survives a crash at any point.
func TestCrashGrow(t *testing.T) {
	defer func(a int64) { dataAlign = a }(dataAlign)
	dataAlign = 512
	const size = 1 << 20
	opts := []driver.KV{{Key: "block_size", Value: "4K"}}
	mem := memfs.New()
	m := model.New(size)
	d := createVDI(t, mem, "/g.vdi", size, "", opts...)
	for i := int64(0); i+5000 < size; i += 12 << 10 {
		disktest.MustWrite(t, d, m, disktest.Fill(5000, byte(i>>12)+1), i)
	}
	disktest.MustClose(t, d)
	raw, _ := mem.ReadFile("/g.vdi")
	if off := binary.LittleEndian.Uint32(raw[preHeaderSize+272:]); off != 1536 {
		t.Fatalf("data at %d", off)
	}
	crashEach(t, mem, "/g.vdi", m.Data, func(d *vdisk.Disk) error { return d.Resize(ctx, 3<<20, "") })
}
