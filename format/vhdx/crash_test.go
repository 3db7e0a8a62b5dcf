package vhdx

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/faultfs"
	"github.com/vdisk/vdisk/storage/memfs"
)

// crashCase is one run of the crash-prone phase: random writes, zeroes
// (whole blocks become ZERO, their space punched after the commit) and
// flushes on a dynamic image.
type crashCase struct {
	size int64
	// flushed: the content at the last successful flush; last: after the
	// last successful operation; tried: with the failing operation too.
	flushed, last, tried []byte
}

func crashSetup(t *testing.T, size int64) (*memfs.FS, *model.Model) {
	mem := memfs.New()
	m := model.New(size)
	d := createVHDX(t, mem, "/img.vhdx", size, "", disktest.KVs("block_size=1M")...)
	for i := int64(0); i < size; i += 2 << 20 {
		disktest.MustWrite(t, d, m, disktest.Fill(300000, byte(i>>20)+1), i)
	}
	disktest.MustClose(t, d)
	return mem, m
}

func crashPhase(st driver.Storage, m *model.Model, arm func()) crashCase {
	c := crashCase{size: int64(len(m.Data))}
	d, err := vdisk.Open(ctx, "/img.vhdx", &vdisk.OpenOptions{Storage: st})
	if err != nil {
		panic(err)
	}
	arm()
	c.flushed = bytes.Clone(m.Data)
	rng := rand.New(rand.NewPCG(16, 16))
	for i := 0; i < 96; i++ {
		if i%6 == 5 {
			if d.Flush() != nil {
				c.tried = m.Data
				break
			}
			c.flushed = bytes.Clone(m.Data)
			continue
		}
		n := rng.Int64N(900000) + 1
		off := rng.Int64N(c.size - n)
		if i%5 == 3 {
			if d.WriteZeroes(off, n, true) != nil {
				c.tried = bytes.Clone(m.Data)
				clear(c.tried[off : off+n])
				break
			}
			m.Zero(off, n)
			continue
		}
		p := disktest.Fill(int(n), byte(i+100))
		if _, err := d.WriteAt(p, off); err != nil {
			c.tried = bytes.Clone(m.Data)
			copy(c.tried[off:], p)
			break
		}
		m.Write(p, off)
	}
	c.last = m.Data
	if c.tried == nil {
		c.tried = c.last
	}
	d.Close()
	return c
}

// qemuReplayCheck runs qemu-img check -r all, which opens the image
// read-write (replaying its log, which qemu counts as one fixed
// corruption) and checks it: nothing else may need fixing.
func qemuReplayCheck(t *testing.T, f, what string) {
	t.Helper()
	out, code, err := qemutest.RunCode("qemu-img", "check", "-r", "all", "--output", "json", "-f", "vhdx", f)
	var r struct {
		CheckErrors      int `json:"check-errors"`
		Corruptions      int `json:"corruptions"`
		Leaks            int `json:"leaks"`
		CorruptionsFixed int `json:"corruptions-fixed"`
		LeaksFixed       int `json:"leaks-fixed"`
	}
	if err != nil || code != 0 || json.Unmarshal([]byte(out), &r) != nil ||
		r.CheckErrors+r.Corruptions+r.Leaks+r.LeaksFixed != 0 || r.CorruptionsFixed > 1 {
		t.Fatalf("%s: qemu-img check -r all: exit %d %v: %s", what, code, err, out)
	}
}

// check: every byte reads as at the last flush, or as a later write left it.
func (c *crashCase) check(got []byte) int64 {
	if bytes.Equal(got, c.flushed) || bytes.Equal(got, c.last) {
		return -1
	}
	for i := range got {
		if got[i] != c.flushed[i] && got[i] != c.last[i] && got[i] != c.tried[i] {
			return int64(i)
		}
	}
	return -1
}

// TestCrashQemuReplays cuts the writes of a dynamic image at every write
// operation (as a power cut: only what was synced survives; and as a
// process kill: every completed write stays): vdisk reads the flushed
// data (replaying the log in memory, read-only), qemu opens the image
// read-write (qemu-img check -r all replays the log into the file and
// finds nothing else to fix) and reads exactly what vdisk read.
func TestCrashQemuReplays(t *testing.T) {
	qemutest.Require(t)
	const size = 4 << 20
	// One setup, cloned for every point (the phase is deterministic).
	mem0, m0 := crashSetup(t, size)
	fresh := func() (*memfs.FS, *model.Model) {
		m := model.New(size)
		copy(m.Data, m0.Data)
		return mem0.Clone(), m
	}
	mem, m := fresh()
	ffs := faultfs.New(mem)
	crashPhase(ffs, m, ffs.Reset)
	total := ffs.Writes()
	if total < 100 {
		t.Fatalf("only %d write operations", total)
	}
	var points, replays atomic.Int64
	// The points run two at a time: most of their time is spent waiting
	// for qemu-img.
	t.Run("points", func(t *testing.T) {
		for k := 1; k <= total; k++ {
			kill := k%2 == 0
			what := fmt.Sprintf("crash after write %d of %d (kill=%v)", k, total, kill)
			t.Run(fmt.Sprint(k), func(t *testing.T) {
				t.Parallel()
				dir := t.TempDir()
				mem, m := fresh()
				ffs := faultfs.New(mem)
				var c crashCase
				var st driver.Storage
				if kill {
					c = crashPhase(ffs, m, func() { ffs.KillAfterWrites(k) })
					st = mem
				} else {
					c = crashPhase(ffs, m, func() { ffs.CrashAfterWrites(k) })
					st = ffs.Durable()
				}
				points.Add(1)
				d, err := vdisk.Open(ctx, "/img.vhdx", &vdisk.OpenOptions{Storage: st, ReadOnly: true})
				if err != nil {
					t.Fatalf("%s: vdisk cannot open the image: %v", what, err)
				}
				if topImage(d).replayedInMemory {
					replays.Add(1)
				}
				ours := disktest.ReadAll(t, d)
				disktest.MustClose(t, d)
				if bad := c.check(ours); bad >= 0 {
					t.Fatalf("%s: byte %d reads %#x; flushed %#x, last %#x", what, bad, ours[bad], c.flushed[bad], c.last[bad])
				}
				f := disktest.SaveTo(t, st.(*memfs.FS), "/img.vhdx", dir)
				oursRaw := filepath.Join(dir, "ours.raw")
				if err := os.WriteFile(oursRaw, ours, 0o644); err != nil {
					t.Fatal(err)
				}
				qemuReplayCheck(t, f, what)
				if !qemutest.Compare(t, "vhdx", f, "raw", oursRaw) {
					t.Fatalf("%s: qemu's replay reads differently from vdisk's", what)
				}
				// vdisk replays into the file too, and reads the same.
				d = openVHDX(t, st, "/img.vhdx", false)
				if got := disktest.ReadAll(t, d); !bytes.Equal(got, ours) {
					t.Fatalf("%s: vdisk's read-write replay reads differently", what)
				}
				disktest.MustClose(t, d)
			})
		}
	})
	if t.Failed() {
		return
	}
	if !disktest.Narrowed() && (points.Load() < 100 || replays.Load() == 0) {
		t.Fatalf("%d crash points, %d with a log to replay", points.Load(), replays.Load())
	}
	t.Logf("%d crash points over %d write operations; %d left a log that needed replaying", points.Load(), total, replays.Load())
}
