package qcow2_test

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/faultfs"
	"github.com/vdisk/vdisk/storage/memfs"
)

// Crash workloads write 8-byte words that encode their own guest offset
// and a write id, so that after a crash any word can be classified: the
// flushed value, a value some later write put at this very offset, zeros
// (zero writes and discards), or garbage (data of another offset, or
// bytes that were never written) — which must never appear.

type crashOp struct {
	kind   int // 0 write, 1 zero, 2 zero+unmap, 3 discard, 4 flush, 5 snapshot, 6 delete snapshot
	off, n int64
	id     uint32
}

func crashWorkload(seed uint64, size int64, nops int, clusters int64, snapshots bool) []crashOp {
	rng := rand.New(rand.NewPCG(seed, 7))
	var ops []crashOp
	for i := 0; i < nops; i++ {
		var o crashOp
		r := rng.IntN(100)
		switch {
		case r < 60:
			o.kind = 0
		case r < 68:
			o.kind = 1
		case r < 76:
			o.kind = 2
		case r < 84:
			o.kind = 3
		case r < 96 || !snapshots:
			o.kind = 4
		case r < 98:
			o.kind = 5
		default:
			o.kind = 6
		}
		// Sizes from a few words to several clusters, 8-byte aligned.
		n := (rng.Int64N(clusters*2)/8 + 1) * 8
		if rng.IntN(3) == 0 {
			n = (rng.Int64N(512)/8 + 1) * 8
		}
		n = min(n, size)
		o.off = rng.Int64N((size-n)/8+1) * 8
		o.n = n
		o.id = uint32(i + 1)
		ops = append(ops, o)
	}
	return append(ops, crashOp{kind: 4})
}

func word(off int64, id uint32) uint64 { return uint64(off/8)<<24 | uint64(id)&0xffffff | 1<<63 }

// crashState tracks what the disk may read as.
type crashState struct {
	flushed []uint64         // word values as of the last completed flush
	alt     map[int64]uint64 // discarded words may also read their old value
	dirty   map[int64]bool   // words touched since
	curAlt  map[int64]uint64
}

func runCrashOps(d *vdisk.Disk, ops []crashOp, st *crashState, cur []uint64) error {
	buf := make([]byte, 0, 1<<20)
	for _, o := range ops {
		var err error
		switch o.kind {
		case 0:
			buf = buf[:o.n]
			for i := int64(0); i < o.n; i += 8 {
				binary.LittleEndian.PutUint64(buf[i:], word(o.off+i, o.id))
			}
			_, err = d.WriteAt(buf, o.off)
			for i := int64(0); i < o.n; i += 8 {
				cur[(o.off+i)/8] = word(o.off+i, o.id)
				st.dirty[(o.off+i)/8] = true
				delete(st.curAlt, (o.off+i)/8)
			}
		case 1, 2:
			err = d.WriteZeroes(o.off, o.n, o.kind == 2)
			for i := int64(0); i < o.n; i += 8 {
				cur[(o.off+i)/8] = 0
				st.dirty[(o.off+i)/8] = true
				delete(st.curAlt, (o.off+i)/8)
			}
		case 3:
			err = d.Discard(o.off, o.n)
			for i := int64(0); i < o.n; i += 8 {
				// A discarded word reads zeros or its old value.
				w := (o.off + i) / 8
				if cur[w] != 0 {
					st.curAlt[w] = cur[w]
				}
				cur[w] = 0
				st.dirty[w] = true
			}
		case 4, 5, 6:
			sn, _ := vdisk.As[driver.Snapshotter](d.Top())
			switch o.kind {
			case 4:
				err = d.Flush()
			case 5:
				err = sn.CreateSnapshot(fmt.Sprint("s", o.id))
			case 6:
				var list []driver.Snapshot
				if list, err = sn.Snapshots(); err == nil && len(list) > 0 {
					err = sn.DeleteSnapshot(list[0].ID)
				} else if err == nil {
					// Nothing to delete: success below must still
					// mean flushed.
					err = d.Flush()
				}
			}
			// Snapshot operations flush first: success means flushed.
			if err == nil {
				copy(st.flushed, cur)
				clear(st.dirty)
				clear(st.alt)
				for k, v := range st.curAlt {
					st.alt[k] = v
				}
			}
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// verifyCrashed checks an image recovered from a crash.
// A crash in the middle of a snapshot operation may leave copied flags
// that disagree with refcounts (as with qemu: refcounts and L2 tables are
// different clusters); that is harmless for data and fixed by check -r
// all. allowCopied accepts those.
func verifyCrashed(t *testing.T, label string, stor driver.Storage, name string, size int64, st *crashState, repair, allowCopied bool) {
	t.Helper()
	verifyCrashedWith(t, label, vdisk.OpenOptions{}, stor, name, size, st, repair, allowCopied)
}

// verifyCrashedWith is verifyCrashed opening the image with oo (secrets,
// options) on stor.
func verifyCrashedWith(t *testing.T, label string, oo vdisk.OpenOptions, stor driver.Storage, name string, size int64, st *crashState, repair, allowCopied bool) {
	t.Helper()
	oo.Storage = stor
	d, err := vdisk.Open(ctx, name, &oo)
	if err != nil {
		t.Fatalf("%s: the crashed image does not open: %v", label, err)
	}
	defer d.Close()
	res, err := d.Check(ctx, driver.RepairNone)
	if err != nil {
		t.Fatalf("%s: check: %v", label, err)
	}
	other := 0
	for _, m := range res.Messages {
		if strings.HasPrefix(m, "ERROR") && !(allowCopied && strings.HasPrefix(m, "ERROR OFLAG_COPIED")) {
			other++
		}
	}
	if other != 0 || res.CheckErrors != 0 || (res.Corruptions != 0 && !allowCopied) {
		msgs := res.Messages
		if len(msgs) > 6 {
			msgs = msgs[:6]
		}
		t.Fatalf("%s: check finds more than leaks: %d corruptions, %d errors: %v", label, res.Corruptions, res.CheckErrors, msgs)
	}
	if res.Corruptions != 0 {
		repair = true
	}
	data := make([]byte, size)
	if _, err := d.ReadAt(data, 0); err != nil {
		t.Fatalf("%s: read: %v", label, err)
	}
	for w := int64(0); w < size/8; w++ {
		v := binary.LittleEndian.Uint64(data[w*8:])
		if a, ok := st.alt[w]; v == st.flushed[w] || ok && v == a {
			continue
		}
		if !st.dirty[w] {
			t.Fatalf("%s: flushed word at %d reads %#x, want %#x", label, w*8, v, st.flushed[w])
		}
		if v == 0 {
			continue
		}
		if v>>63 == 1 && int64((v&^(1<<63))>>24) == w {
			continue // some write to this very word
		}
		t.Fatalf("%s: word at %d reads %#x: garbage (not written there)", label, w*8, v)
	}
	if !repair {
		return
	}
	// Repair the leaks and make sure the image is then clean.
	res, err = d.Check(ctx, driver.RepairAll)
	if err != nil || res.Corruptions != 0 || res.Leaks != 0 {
		t.Fatalf("%s: repair: %d corruptions, %d leaks left: %v", label, res.Corruptions, res.Leaks, err)
	}
}

// TestCrashPoints crashes the storage after every n-th write of workloads
// that go through the allocation paths (new clusters, copy on write,
// refcount block allocation and refcount table growth, L2 allocation,
// freeing and reuse) and checks both what a sync-respecting disk keeps and
// what an in-order disk keeps.
func TestCrashPoints(t *testing.T) {
	layouts := []struct {
		name   string
		opts   []string
		size   int64
		cs     int64
		points int
		snaps  bool // the workload takes and deletes internal snapshots
	}{
		{"v3-64k", nil, 1 << 20, 64 << 10, 20, false},
		{"v3-512-refbits64", []string{"cluster_size=512", "refcount_bits=64"}, 1 << 20, 512, 30, false},
		{"extl2-16k-snapshots", []string{"extended_l2=on", "cluster_size=16k"}, 1 << 20, 16 << 10, 20, true},
		{"lazy-4k", []string{"lazy_refcounts=on", "cluster_size=4k"}, 1 << 20, 4 << 10, 20, false},
		{"v2-4k-snapshots", []string{"compat=0.10", "cluster_size=4k"}, 1 << 20, 4 << 10, 20, true},
	}
	total := 0
	for _, l := range layouts {
		total += l.points
	}
	if total < 100 {
		t.Fatalf("only %d crash points", total)
	}
	qemuDir := tempDir(t)
	for li, l := range layouts {
		t.Run(l.name, func(t *testing.T) {
			t.Parallel()
			ops := crashWorkload(uint64(li+1), l.size, 150, l.cs, l.snaps)
			// A dry run counts the writes.
			mem := memfs.New()
			ffs := faultfs.New(mem)
			d, err := vdisk.Create(ctx, "/c.qcow2", &vdisk.CreateOptions{Format: "qcow2", Size: l.size, Options: disktest.KVs(l.opts...), Storage: ffs})
			if err != nil {
				t.Fatal(err)
			}
			base := ffs.Writes()
			st := &crashState{flushed: make([]uint64, l.size/8), dirty: map[int64]bool{}, alt: map[int64]uint64{}, curAlt: map[int64]uint64{}}
			if err := runCrashOps(d, ops, st, make([]uint64, l.size/8)); err != nil {
				t.Fatal(err)
			}
			d.Close()
			nw := ffs.Writes() - base
			rng := rand.New(rand.NewPCG(uint64(li), 99))
			for p := 0; p < l.points; p++ {
				n := 1 + rng.IntN(nw)
				mem := memfs.New()
				ffs := faultfs.New(mem)
				d, err := vdisk.Create(ctx, "/c.qcow2", &vdisk.CreateOptions{Format: "qcow2", Size: l.size, Options: disktest.KVs(l.opts...), Storage: ffs})
				if err != nil {
					t.Fatal(err)
				}
				if err := d.Flush(); err != nil {
					t.Fatal(err)
				}
				st := &crashState{flushed: make([]uint64, l.size/8), dirty: map[int64]bool{}, alt: map[int64]uint64{}, curAlt: map[int64]uint64{}}
				ffs.CrashAfterWrites(n)
				err = runCrashOps(d, ops, st, make([]uint64, l.size/8))
				if err == nil && ffs.Crashed() {
					t.Logf("crash at write %d happened after the last flush", n)
				}
				d.Close()
				label := fmt.Sprintf("crash after write %d/%d", n, nw)
				verifyCrashed(t, label+" (durable)", ffs.Durable(), "/c.qcow2", l.size, st, p%3 == 0, l.snaps)
				verifyCrashed(t, label+" (in-order)", mem.Clone(), "/c.qcow2", l.size, st, p%3 == 1, l.snaps)
				if p%10 == 0 && l.name != "lazy-4k" {
					// qemu agrees: at most leaks.
					b, err := ffs.Durable().(*memfs.FS).ReadFile("/c.qcow2")
					if err != nil {
						t.Fatal(err)
					}
					f := filepath.Join(qemuDir, fmt.Sprintf("%s-%d.qcow2", l.name, p))
					if err := os.WriteFile(f, b, 0o644); err != nil {
						t.Fatal(err)
					}
					out, code, _ := qemutest.RunCode("qemu-img", "check", "-f", "qcow2", f)
					if code != 0 && code != 3 && !(l.snaps && code == 2) {
						t.Fatalf("%s: qemu-img check exit %d:\n%s", label, code, out)
					}
				}
			}
		})
	}
}
