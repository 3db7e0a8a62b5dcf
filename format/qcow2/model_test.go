package qcow2_test

import (
	"bytes"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/storage/memfs"
)

// checkClean runs our own check and fails on anything but a clean image.
func checkClean(t testing.TB, d *vdisk.Disk) {
	t.Helper()
	res, err := d.Check(ctx, driver.RepairNone)
	if err != nil {
		t.Fatalf("check: %v", err)
	}
	if res.Corruptions != 0 || res.Leaks != 0 || res.CheckErrors != 0 {
		msgs := res.Messages
		if len(msgs) > 8 {
			msgs = msgs[:8]
		}
		t.Fatalf("check: %d corruptions, %d leaks, %d errors: %v", res.Corruptions, res.Leaks, res.CheckErrors, msgs)
	}
}

type modelCase struct {
	name string
	opts []string
	size int64
	ops  int
	io   int64
	open []string // open options (reopen steps)
}

// Sizes are kept small for speed under -race; operations still cross
// cluster, subcluster and L2 table boundaries.
var modelCases = []modelCase{
	{"v2", []string{"compat=0.10"}, 4 << 20, 10000, 48 << 10, nil},
	{"v3", nil, 4 << 20, 10000, 48 << 10, nil},
	{"v3-4k", []string{"cluster_size=4k"}, 4 << 20, 10000, 24 << 10, nil},
	{"v3-64k-lazy", []string{"lazy_refcounts=on"}, 4 << 20, 10000, 48 << 10, nil},
	{"extl2", []string{"extended_l2=on"}, 4 << 20, 10000, 48 << 10, nil},
	{"extl2-16k", []string{"extended_l2=on", "cluster_size=16k"}, 2 << 20, 10000, 24 << 10, nil},
	{"512-refbits1", []string{"cluster_size=512", "refcount_bits=1"}, 1 << 20, 10000, 4 << 10, nil},
	{"2m", []string{"cluster_size=2M"}, 12 << 20, 10000, 64 << 10, nil},
	// Tiny caches: write-back on eviction in the middle of writes.
	{"4k-tiny-caches", []string{"cluster_size=4k"}, 4 << 20, 6000, 24 << 10, []string{"l2_cache_size=16k", "refcount_cache_size=16k"}},
	{"lazy-4k-tiny-caches", []string{"cluster_size=4k", "lazy_refcounts=on"}, 4 << 20, 6000, 24 << 10, []string{"l2_cache_size=16k", "refcount_cache_size=16k"}},
}

// TestModel runs the reference model over qcow2 images on memfs, with
// reopen steps, for several layouts.
func TestModel(t *testing.T) {
	for _, c := range modelCases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			st := memfs.New()
			name := "/m.qcow2"
			d, err := vdisk.Create(ctx, name, &vdisk.CreateOptions{Format: "qcow2", Size: c.size, Options: disktest.KVs(c.opts...), Storage: st})
			if err != nil {
				t.Fatal(err)
			}
			if c.open != nil {
				d.Close()
				if d, err = vdisk.Open(ctx, name, &vdisk.OpenOptions{Storage: st, Options: disktest.KVs(c.open...)}); err != nil {
					t.Fatal(err)
				}
			}
			reopens := 0
			h := &model.Harness{Seed: int64(len(c.name)), Ops: c.ops, MaxIO: c.io,
				Reopen: func(d *vdisk.Disk) (*vdisk.Disk, error) {
					if err := d.Close(); err != nil {
						return nil, err
					}
					nd, err := vdisk.Open(ctx, name, &vdisk.OpenOptions{Storage: st, Options: disktest.KVs(c.open...)})
					if err != nil {
						return nil, err
					}
					if reopens++; reopens%4 == 1 {
						checkClean(t, nd)
					}
					return nd, nil
				}}
			d = h.Run(t, d, model.New(c.size))
			checkClean(t, d)
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestModelChain runs the model over a 3-deep qcow2 chain grown by snapshot
// steps on top of a raw base.
func TestModelChain(t *testing.T) {
	for _, opts := range [][]string{nil, {"extended_l2=on"}, {"compat=0.10", "cluster_size=4k"}} {
		t.Run(strings.Join(opts, ","), func(t *testing.T) {
			t.Parallel()
			st := memfs.New()
			const size = 4 << 20
			m := model.New(size)
			base, err := vdisk.Create(ctx, "/base.raw", &vdisk.CreateOptions{Format: "raw", Size: size - 65536, Storage: st})
			if err != nil {
				t.Fatal(err)
			}
			pat := bytes.Repeat([]byte{0xb7}, 300000)
			base.WriteAt(pat, size-65536-300000)
			m.Write(pat, size-65536-300000)
			base.Close()
			d, err := vdisk.Create(ctx, "/l1.qcow2", &vdisk.CreateOptions{Format: "qcow2", Size: size, Backing: "base.raw", BackingFormat: "raw", Options: disktest.KVs(opts...), Storage: st})
			if err != nil {
				t.Fatal(err)
			}
			g := &model.Chain{Storage: st, Format: "qcow2", Ext: "qcow2", Options: disktest.KVs(opts...), RecordFormat: true, MaxDepth: 3, Top: "/l1.qcow2", Depth: 1}
			h := &model.Harness{Seed: 5, Ops: 10000, MaxIO: 32 << 10, Reopen: g.Reopen, Snapshot: g.Snapshot}
			d = h.Run(t, d, m)
			if g.Depth < 3 {
				t.Errorf("chain depth %d, want 3", g.Depth)
			}
			checkClean(t, d)
			d.Close()
		})
	}
}
