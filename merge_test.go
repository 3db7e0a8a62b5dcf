package vdisk_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/storage/faultfs"
	"github.com/vdisk/vdisk/storage/memfs"
)

const chainSize = 2 << 20

// buildChain makes /c/base.raw <- /c/l1.tdf <- /c/l2.tdf with random
// writes, zeroes and discards in every layer, and returns the model of the
// chain's content as seen from l2 (and from l1).
func buildChain(t *testing.T, st driver.Storage, seed uint64) (top, mid *model.Model) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 1))
	m := model.New(chainSize)
	scribble := func(d *vdisk.Disk, ops int) {
		for i := 0; i < ops; i++ {
			n := rng.Int64N(100<<10) + 1
			off := rng.Int64N(chainSize - n)
			switch rng.IntN(5) {
			case 0:
				if err := d.WriteZeroes(off, n, rng.IntN(2) == 0); err != nil {
					t.Fatal(err)
				}
				m.Zero(off, n)
			default:
				p := make([]byte, n)
				for k := range p {
					p[k] = byte(rng.Uint32())
				}
				if _, err := d.WriteAt(p, off); err != nil {
					t.Fatal(err)
				}
				m.Write(p, off)
			}
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
	}
	scribble(mustCreate(t, st, "/c/base.raw", "raw", chainSize, ""), 30)
	d, err := vdisk.Create(ctx, "/c/l1.tdf", &vdisk.CreateOptions{Format: "testdiff", Backing: "base.raw", BackingFormat: "raw", Storage: st})
	if err != nil {
		t.Fatal(err)
	}
	scribble(d, 30)
	mid = &model.Model{Data: bytes.Clone(m.Data)}
	d, err = vdisk.Create(ctx, "/c/l2.tdf", &vdisk.CreateOptions{Format: "testdiff", Backing: "l1.tdf", BackingFormat: "testdiff", Storage: st})
	if err != nil {
		t.Fatal(err)
	}
	scribble(d, 30)
	return m, mid
}

func verifyChain(t *testing.T, st driver.Storage, name string, m *model.Model, layers int) {
	t.Helper()
	d, err := vdisk.Open(ctx, name, &vdisk.OpenOptions{Storage: st, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if layers > 0 && len(d.Layers()) != layers {
		t.Fatalf("%s: chain has %d layers, want %d", name, len(d.Layers()), layers)
	}
	(&model.Harness{}).Verify(t, d, m)
}

func TestCommit(t *testing.T) {
	for _, c := range []struct {
		base       int
		keep       bool
		wantLayers int
	}{{1, false, 3}, {1, true, 3}, {2, false, 2}} {
		t.Run(fmt.Sprintf("base%d-keep%v", c.base, c.keep), func(t *testing.T) {
			st := memfs.New()
			m, _ := buildChain(t, st, 1)
			if err := vdisk.Commit(ctx, "/c/l2.tdf", &vdisk.CommitOptions{Base: c.base, Keep: c.keep, Open: &vdisk.OpenOptions{Storage: st}}); err != nil {
				t.Fatal(err)
			}
			verifyChain(t, st, "/c/l2.tdf", m, c.wantLayers)
			// The commit target alone now holds the whole content.
			target := "/c/l1.tdf"
			if c.base == 2 {
				target = "/c/base.raw"
			}
			verifyChain(t, st, target, m, 0)
			if !c.keep {
				d, _ := vdisk.Open(ctx, "/c/l2.tdf", &vdisk.OpenOptions{Storage: st, ReadOnly: true, NoBacking: true})
				e, err := d.Status(0, chainSize)
				d.Close()
				if err != nil || e.Present() || e.Length != chainSize {
					t.Fatalf("top not emptied: %+v %v", e, err)
				}
			}
		})
	}
}

func TestMerge(t *testing.T) {
	for _, c := range []struct {
		from, to   int
		wantLayers int
		check      string
	}{
		{0, 1, 2, "/c/l1.tdf"}, // top merged into its parent
		{1, 2, 2, "/c/l2.tdf"}, // middle merged into base; top reparented
		{0, 2, 1, "/c/base.raw"},
		{2, 1, 2, "/c/l2.tdf"}, // base into l1 (backward): l1 standalone
		{1, 0, 2, "/c/l2.tdf"}, // l1 into top (backward)
		{2, 0, 1, "/c/l2.tdf"}, // everything into top
	} {
		t.Run(fmt.Sprintf("%d-%d", c.from, c.to), func(t *testing.T) {
			st := memfs.New()
			m, _ := buildChain(t, st, 2)
			dropped, err := vdisk.Merge(ctx, "/c/l2.tdf", c.from, c.to, &vdisk.MergeOptions{Open: &vdisk.OpenOptions{Storage: st}})
			if err != nil {
				t.Fatal(err)
			}
			if len(dropped) != abs(c.from-c.to) {
				t.Errorf("dropped %v", dropped)
			}
			verifyChain(t, st, c.check, m, c.wantLayers)
		})
	}
}

func abs(x int) int {
	if x < 0 {
		return -x
	}
	return x
}

func TestRebase(t *testing.T) {
	st := memfs.New()
	m, mid := buildChain(t, st, 3)
	_ = mid
	// Safe rebase of l2 straight onto base: content unchanged.
	if err := vdisk.Rebase(ctx, "/c/l2.tdf", "base.raw", &vdisk.RebaseOptions{Format: "raw", Open: &vdisk.OpenOptions{Storage: st}}); err != nil {
		t.Fatal(err)
	}
	verifyChain(t, st, "/c/l2.tdf", m, 2)
	// Safe rebase onto nothing: standalone, content unchanged.
	if err := vdisk.Rebase(ctx, "/c/l2.tdf", "", &vdisk.RebaseOptions{Open: &vdisk.OpenOptions{Storage: st}}); err != nil {
		t.Fatal(err)
	}
	verifyChain(t, st, "/c/l2.tdf", m, 1)
	// Unsafe rebase only rewrites the reference: l1 now reads through l1's
	// chain wherever l1 itself is unallocated... so content changes.
	if err := vdisk.Rebase(ctx, "/c/l1.tdf", "", &vdisk.RebaseOptions{Unsafe: true, Open: &vdisk.OpenOptions{Storage: st}}); err != nil {
		t.Fatal(err)
	}
	d, err := vdisk.Open(ctx, "/c/l1.tdf", &vdisk.OpenOptions{Storage: st, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Layers()) != 1 {
		t.Fatalf("unsafe rebase left %d layers", len(d.Layers()))
	}
	d.Close()
}

// TestMergeCrash interrupts merges, commits and streams at every write
// (faultfs: what was not synced is lost): the chain must still open and
// read the same content.
func TestMergeCrash(t *testing.T) {
	base := memfs.New()
	m, _ := buildChain(t, base, 4)
	crashes := 0
	for _, op := range []string{"commit", "commit-parent", "merge-back", "merge-forward", "stream"} {
		for n := 1; n < 2000; n++ {
			fs := faultfs.New(base.Clone())
			fs.CrashAfterWrites(n)
			var err error
			switch op {
			case "commit":
				err = vdisk.Commit(ctx, "/c/l2.tdf", &vdisk.CommitOptions{Base: 2, Open: &vdisk.OpenOptions{Storage: fs}})
			case "commit-parent":
				err = vdisk.Commit(ctx, "/c/l2.tdf", &vdisk.CommitOptions{Open: &vdisk.OpenOptions{Storage: fs}})
			case "merge-back":
				_, err = vdisk.Merge(ctx, "/c/l2.tdf", 2, 0, &vdisk.MergeOptions{Open: &vdisk.OpenOptions{Storage: fs}})
			case "merge-forward":
				// l1 into l0: l2 is reparented onto l0.
				_, err = vdisk.Merge(ctx, "/c/l2.tdf", 1, 2, &vdisk.MergeOptions{Open: &vdisk.OpenOptions{Storage: fs}})
			case "stream":
				_, err = vdisk.Stream(ctx, "/c/l2.tdf", &vdisk.StreamOptions{Open: &vdisk.OpenOptions{Storage: fs}})
			}
			if err == nil && !fs.Crashed() {
				break // the operation finished before the crash point
			}
			if err != nil && !errors.Is(err, faultfs.ErrCrashed) {
				t.Fatalf("%s crash at write %d: unexpected error %v", op, n, err)
			}
			crashes++
			verifyChain(t, fs.Durable(), "/c/l2.tdf", m, 0)
		}
	}
	if crashes < 100 {
		t.Fatalf("only %d crash points were exercised", crashes)
	}
	t.Logf("%d crash points", crashes)
}

// TestIncrementalCopy copies only the top layer of a chain into a new diff
// on the same backing: the new chain reads the same as the old one.
func TestIncrementalCopy(t *testing.T) {
	st := memfs.New()
	m, _ := buildChain(t, st, 5)
	src, err := vdisk.Open(ctx, "/c/l2.tdf", &vdisk.OpenOptions{Storage: st, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := vdisk.Create(ctx, "/c/inc.tdf", &vdisk.CreateOptions{Format: "testdiff", Backing: "l1.tdf", BackingFormat: "testdiff", Storage: st})
	if err != nil {
		t.Fatal(err)
	}
	if err := vdisk.Convert(ctx, dst, src, &vdisk.ConvertOptions{Above: 1}); err != nil {
		t.Fatal(err)
	}
	// Only the top's runs were written.
	var topBytes, incBytes int64
	src.Map(ctx, 0, chainSize, func(e vdisk.Extent) error {
		if e.Depth == 0 {
			topBytes += e.Length
		}
		return nil
	})
	dst.Map(ctx, 0, chainSize, func(e vdisk.Extent) error {
		if e.Depth == 0 {
			incBytes += e.Length
		}
		return nil
	})
	if incBytes > topBytes+64<<10 {
		t.Errorf("incremental copy wrote %d bytes, the source top holds %d", incBytes, topBytes)
	}
	dst.Close()
	verifyChain(t, st, "/c/inc.tdf", m, 3)
}

// TestJobBusyAndCancel: one job at a time per disk, structural changes
// wait for the job, and a cancelled job leaves the disk reading the same.
func TestJobBusyAndCancel(t *testing.T) {
	st := memfs.New()
	m, _ := buildChain(t, st, 11)
	d, err := vdisk.Open(ctx, "/c/l2.tdf", &vdisk.OpenOptions{Storage: st})
	if err != nil {
		t.Fatal(err)
	}
	jctx, cancel := context.WithCancel(ctx)
	inJob := make(chan struct{})
	release := make(chan struct{})
	var once sync.Once
	done := make(chan error, 1)
	go func() {
		done <- d.Commit(jctx, &vdisk.CommitOptions{Base: 2, Progress: func(n, total int64) {
			if n > 0 {
				once.Do(func() { close(inJob); <-release })
			}
		}})
	}()
	<-inJob
	if err := d.Resize(ctx, d.Size()*2, "off"); !errors.Is(err, vdisk.ErrBusy) {
		t.Errorf("resize during a job: %v, want ErrBusy", err)
	}
	if _, err := d.Stream(ctx, nil); !errors.Is(err, vdisk.ErrBusy) {
		t.Errorf("second job: %v, want ErrBusy", err)
	}
	if err := d.SetComment("x"); !errors.Is(err, vdisk.ErrBusy) && !errors.Is(err, vdisk.ErrUnsupported) {
		t.Errorf("set comment during a job: %v", err)
	}
	if d.Job() != "commit" {
		t.Errorf("Job() = %q", d.Job())
	}
	cancel()
	close(release)
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled commit: %v", err)
	}
	if d.Job() != "" || len(d.Layers()) != 3 {
		t.Fatalf("after cancel: job %q, %d layers", d.Job(), len(d.Layers()))
	}
	got := make([]byte, chainSize)
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if i := m.Check(got, 0); i >= 0 {
		t.Fatalf("after a cancelled commit the disk differs at %d", i)
	}
	// The job can run again, to the end.
	if err := d.Commit(ctx, &vdisk.CommitOptions{Base: 2}); err != nil {
		t.Fatal(err)
	}
	d.Close()
	verifyChain(t, st, "/c/l2.tdf", m, 2)
}
