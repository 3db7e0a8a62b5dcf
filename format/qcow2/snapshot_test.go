package qcow2_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	_ "github.com/vdisk/vdisk/format/qcow2"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/memfs"
)

func snapshotter(t testing.TB, d *vdisk.Disk) driver.Snapshotter {
	t.Helper()
	s, ok := vdisk.As[driver.Snapshotter](d.Top())
	if !ok {
		t.Fatal("qcow2 image is not a Snapshotter")
	}
	return s
}

// TestSnapshotsWithQemu: snapshots we create, apply and delete agree with
// qemu: listed by qemu-img snapshot -l, readable with convert -l, and every
// step leaves an image qemu-img check finds clean.
func TestSnapshotsWithQemu(t *testing.T) {
	qemutest.Require(t)
	for _, opts := range [][]string{nil, {"compat=0.10", "cluster_size=4k"}, {"extended_l2=on"}, {"refcount_bits=4", "cluster_size=1k"}} {
		t.Run(strings.Join(opts, ","), func(t *testing.T) {
			t.Parallel()
			dir := tempDir(t)
			f := filepath.Join(dir, "s.qcow2")
			const size = 4 << 20
			d, err := vdisk.Create(ctx, f, &vdisk.CreateOptions{Format: "qcow2", Size: size, Options: disktest.KVs(opts...)})
			if err != nil {
				t.Fatal(err)
			}
			m := model.New(size)
			states := map[string][]byte{}
			h := &model.Harness{Seed: 3, Ops: 300, MaxIO: 200 << 10, NoDiscard: true}
			for i, name := range []string{"one", "two", "three"} {
				h.Seed = int64(i + 1)
				d = h.Run(t, d, m)
				if err := snapshotter(t, d).CreateSnapshot(name); err != nil {
					t.Fatal(err)
				}
				states[name] = append([]byte(nil), m.Data...)
			}
			h.Seed = 9
			d = h.Run(t, d, m)
			if err := snapshotter(t, d).CreateSnapshot("two"); err == nil {
				t.Fatal("a duplicate snapshot name was accepted")
			}
			checkClean(t, d)
			d.Close()
			qemutest.Check(t, "qcow2", f)
			list := qemutest.Img(t, "snapshot", "-l", f)
			for _, name := range []string{"one", "two", "three"} {
				if !strings.Contains(list, name) {
					t.Fatalf("qemu does not list snapshot %s:\n%s", name, list)
				}
				got := rawOf(t, "qcow2", f, "-l", "snapshot.name="+name)
				if !bytes.Equal(got, states[name]) {
					t.Fatalf("snapshot %s read by qemu differs at %d", name, firstDiff(got, states[name]))
				}
			}
			// Apply "two": the disk reads as it did then.
			d, err = openRetry(f, nil)
			if err != nil {
				t.Fatal(err)
			}
			// Read snapshots without applying them.
			for name, want := range states {
				v, err := topAs[driver.SnapshotOpener](t, d).OpenSnapshot(name)
				if err != nil {
					t.Fatal(err)
				}
				got := make([]byte, v.Size())
				if _, err := v.ReadAt(got, 0); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, want) {
					t.Fatalf("snapshot %s read through OpenSnapshot differs at %d", name, firstDiff(got, want))
				}
				if _, err := v.WriteAt([]byte{1}, 0); !errors.Is(err, driver.ErrReadOnly) {
					t.Fatalf("write to a snapshot view: %v", err)
				}
				v.Close()
			}
			if err := snapshotter(t, d).ApplySnapshot("two"); err != nil {
				t.Fatal(err)
			}
			if got := disktest.ReadAll(t, d); !bytes.Equal(got, states["two"]) {
				t.Fatalf("after apply, content differs at %d", firstDiff(got, states["two"]))
			}
			checkClean(t, d)
			// Write after applying (copy on write out of shared clusters).
			copy(m.Data, states["two"])
			h.Seed = 10
			d = h.Run(t, d, m)
			if err := snapshotter(t, d).DeleteSnapshot("one"); err != nil {
				t.Fatal(err)
			}
			if err := snapshotter(t, d).DeleteSnapshot("2"); err != nil { // by ID
				t.Fatal(err)
			}
			checkClean(t, d)
			d.Close()
			qemutest.Check(t, "qcow2", f)
			ref := filepath.Join(dir, "ref.raw")
			os.WriteFile(ref, m.Data, 0o644)
			if !qemutest.Compare(t, "qcow2", f, "raw", ref) {
				t.Fatal("content differs from the model")
			}
			if got := rawOf(t, "qcow2", f, "-l", "snapshot.name=three"); !bytes.Equal(got, states["three"]) {
				t.Fatal("snapshot three changed")
			}
			list = qemutest.Img(t, "snapshot", "-l", f)
			if strings.Contains(list, "one") || strings.Contains(list, " two ") || !strings.Contains(list, "three") {
				t.Fatalf("snapshot list after deletes:\n%s", list)
			}
			// Delete the last one: every cluster it held is free again.
			d, _ = openRetry(f, nil)
			if err := snapshotter(t, d).DeleteSnapshot("three"); err != nil {
				t.Fatal(err)
			}
			d.Close()
			qemutest.Check(t, "qcow2", f)
		})
	}
}

// TestQemuSnapshotsApplyDelete: snapshots qemu made are applied and deleted
// by us correctly.
func TestQemuSnapshotsApplyDelete(t *testing.T) {
	qemutest.Require(t)
	dir := tempDir(t)
	f := filepath.Join(dir, "q.qcow2")
	qemutest.Create(t, "qcow2", f, "4M")
	qemutest.IO(t, "qcow2", f, "write -P 0x10 0 2M")
	qemutest.Img(t, "snapshot", "-c", "s1", f)
	s1 := rawOf(t, "qcow2", f)
	qemutest.IO(t, "qcow2", f, "write -P 0x20 1M 2M")
	qemutest.Img(t, "snapshot", "-c", "s2", f)
	qemutest.IO(t, "qcow2", f, "write -P 0x30 512k 64k")
	d, err := openRetry(f, nil)
	if err != nil {
		t.Fatal(err)
	}
	list, _ := snapshotter(t, d).Snapshots()
	if len(list) != 2 || list[0].Name != "s1" || list[1].Name != "s2" || list[0].ID != "1" {
		t.Fatalf("snapshots %+v", list)
	}
	if err := snapshotter(t, d).ApplySnapshot("s1"); err != nil {
		t.Fatal(err)
	}
	if err := snapshotter(t, d).DeleteSnapshot("s2"); err != nil {
		t.Fatal(err)
	}
	d.Close()
	qemutest.Check(t, "qcow2", f)
	if got := rawOf(t, "qcow2", f); !bytes.Equal(got, s1) {
		t.Fatal("applied snapshot differs")
	}
}

// TestModelInternalSnapshots runs the model while internal snapshots are
// taken and deleted, so writes go through copy on write of shared
// clusters and tables, with reopen steps.
func TestModelInternalSnapshots(t *testing.T) {
	for _, opts := range [][]string{{"cluster_size=4k"}, {"extended_l2=on", "cluster_size=16k"}} {
		t.Run(strings.Join(opts, ","), func(t *testing.T) {
			t.Parallel()
			st := memfs.New()
			const size = 2 << 20
			d, err := vdisk.Create(ctx, "/s.qcow2", &vdisk.CreateOptions{Format: "qcow2", Size: size, Options: disktest.KVs(opts...), Storage: st})
			if err != nil {
				t.Fatal(err)
			}
			n := 0
			h := &model.Harness{Seed: 21, Ops: 5000, MaxIO: 16 << 10,
				Reopen: func(d *vdisk.Disk) (*vdisk.Disk, error) {
					if err := d.Close(); err != nil {
						return nil, err
					}
					return vdisk.Open(ctx, "/s.qcow2", &vdisk.OpenOptions{Storage: st})
				},
				Snapshot: func(d *vdisk.Disk) (*vdisk.Disk, error) {
					s := snapshotter(t, d)
					n++
					if err := s.CreateSnapshot(fmt.Sprint("s", n)); err != nil {
						return nil, err
					}
					if n%3 == 0 {
						if err := s.DeleteSnapshot(fmt.Sprint("s", n-1)); err != nil {
							return nil, err
						}
					}
					return nil, nil
				}}
			d = h.Run(t, d, model.New(size))
			if n < 3 {
				t.Fatalf("only %d snapshots taken", n)
			}
			checkClean(t, d)
			d.Close()
		})
	}
}

// TestResize grows (moving the L1 table) and shrinks images.
func TestResize(t *testing.T) {
	qemutest.Require(t)
	for _, opts := range [][]string{{"cluster_size=512"}, nil, {"compat=0.10", "cluster_size=4k"}, {"extended_l2=on"}} {
		t.Run(strings.Join(opts, ","), func(t *testing.T) {
			t.Parallel()
			dir := tempDir(t)
			// A larger backing file: the grown range must read zeros, not it.
			base := filepath.Join(dir, "base.raw")
			qemutest.Create(t, "raw", base, "16M")
			qemutest.IO(t, "raw", base, "write -P 0x99 0 16M")
			f := filepath.Join(dir, "r.qcow2")
			d, err := vdisk.Create(ctx, f, &vdisk.CreateOptions{Format: "qcow2", Size: 1 << 20, Backing: "base.raw", BackingFormat: "raw", Options: disktest.KVs(opts...)})
			if err != nil {
				t.Fatal(err)
			}
			m := model.New(1 << 20)
			copy(m.Data, bytes.Repeat([]byte{0x99}, 1<<20))
			h := &model.Harness{Seed: 4, Ops: 200, MaxIO: 64 << 10}
			d = h.Run(t, d, m)
			for _, sz := range []int64{3<<20 + 512, 8 << 20, 2<<20 - 4096, 5 << 20, 700 << 10, 6 << 20} {
				old := d.Size()
				if err := d.Resize(ctx, sz, ""); err != nil {
					t.Fatalf("resize %d -> %d: %v", old, sz, err)
				}
				nm := model.New(sz)
				copy(nm.Data, m.Data[:min(old, sz)])
				m = nm
				h.Seed++
				d = h.Run(t, d, m)
				checkClean(t, d)
			}
			d.Close()
			qemutest.Check(t, "qcow2", f)
			ref := filepath.Join(dir, "ref.raw")
			os.WriteFile(ref, m.Data, 0o644)
			if !qemutest.Compare(t, "qcow2", f, "raw", ref) {
				t.Fatal("content differs from the model")
			}
		})
	}
}

// TestSnapshotRefcountOverflow: a snapshot that would overflow 1-bit
// refcounts is refused and leaves the image clean.
func TestSnapshotRefcountOverflow(t *testing.T) {
	st := memfs.New()
	d, err := vdisk.Create(ctx, "/o.qcow2", &vdisk.CreateOptions{Format: "qcow2", Size: 1 << 20, Options: disktest.KVs("refcount_bits=1"), Storage: st})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, err := d.WriteAt(bytes.Repeat([]byte{1}, 100000), 0); err != nil {
		t.Fatal(err)
	}
	if err := snapshotter(t, d).CreateSnapshot("x"); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("err = %v", err)
	}
	checkClean(t, d)
}
