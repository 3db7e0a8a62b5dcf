package vdisk_test

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	_ "github.com/vdisk/vdisk/format/all"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/faultfs"
	"github.com/vdisk/vdisk/storage/memfs"
)

// liveFormat says what qemu can check of a format's images.
type liveFormat struct {
	name, ext string
	// qemuCheckDiff: qemu-img check accepts differencing images too (it
	// accepts base images of every format here but vpc, which has no
	// check at all).
	qemuCheck, qemuCheckDiff bool
	// qemuChain: qemu reads the format's differencing chains, so the top
	// can be compared with the model by qemu-img compare.
	qemuChain bool
}

var liveFormats = []liveFormat{
	{"qcow2", "qcow2", true, true, true},
	{"vdi", "vdi", true, false, false},
	{"vpc", "vhd", false, false, false},
	{"vmdk", "vmdk", true, true, true},
}

const (
	liveSize    = 8 << 20
	liveStripe  = 256 << 10
	liveWorkers = 8
)

// buildLiveChain makes base <- mid <- top in dir, each layer holding
// random writes of its own (unaligned, across unit boundaries, some
// zeroes), and returns the top's name.
func buildLiveChain(t *testing.T, dir string, f liveFormat, seed uint64) string {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 1))
	prev := ""
	var name string
	for _, layer := range []string{"base", "mid", "top"} {
		name = filepath.Join(dir, layer+"."+f.ext)
		o := &vdisk.CreateOptions{Format: f.name, Size: liveSize}
		if prev != "" {
			o = &vdisk.CreateOptions{Format: f.name, Backing: filepath.Base(prev), BackingFormat: f.name}
		}
		d, err := vdisk.Create(ctx, name, o)
		if err != nil {
			t.Fatalf("create %s: %v", name, err)
		}
		size := d.Size()
		for i := 0; i < 40; i++ {
			n := 1 + rng.Int64N(200<<10)
			off := rng.Int64N(size - n)
			if rng.IntN(6) == 0 {
				if err := d.WriteZeroes(off, n, rng.IntN(2) == 0); err != nil {
					t.Fatalf("%s: zero: %v", name, err)
				}
				continue
			}
			p := make([]byte, n)
			fillRandom(rng, p)
			if _, err := d.WriteAt(p, off); err != nil {
				t.Fatalf("%s: write: %v", name, err)
			}
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		prev = name
	}
	return name
}

func fillRandom(rng *rand.Rand, p []byte) {
	b := byte(rng.Uint32())
	for i := range p {
		if i%512 == 0 {
			b = byte(rng.Uint32())
		}
		p[i] = b ^ byte(i)
	}
}

// liveRun opens the chain of top, runs 8 goroutines of random reads and
// writes checked against a model while job runs, and checks the content
// afterwards. Each goroutine owns every 8th stripe, so the model of a byte
// has one writer; the stripes share the formats' units, so the Disk's
// locking and fill paths are exercised across goroutines.
func liveRun(t *testing.T, top string, job func(d *vdisk.Disk) error) (*vdisk.Disk, []byte) {
	t.Helper()
	d, err := vdisk.Open(ctx, top, nil)
	if err != nil {
		t.Fatal(err)
	}
	size := d.Size()
	model := make([]byte, size)
	if _, err := d.ReadAt(model, 0); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var ops atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, liveWorkers)
	for g := 0; g < liveWorkers; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			errs <- liveWorker(d, model, g, stop, &ops)
		}(g)
	}
	time.Sleep(20 * time.Millisecond)
	jobErr := job(d)
	// Keep going after the job: writes land in the chain's new shape.
	before, deadline := ops.Load(), time.Now().Add(10*time.Second)
	for ops.Load() < before+200 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	close(stop)
	wg.Wait()
	close(errs)
	for e := range errs {
		if e != nil {
			t.Fatal(e)
		}
	}
	if jobErr != nil {
		t.Fatalf("job: %v", jobErr)
	}
	if d.Size() != size {
		t.Fatalf("size changed from %d to %d", size, d.Size())
	}
	got := make([]byte, size)
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, model); i >= 0 {
		t.Fatalf("after the job the disk differs from the model at byte %d", i)
	}
	return d, model
}

func liveWorker(d *vdisk.Disk, model []byte, g int, stop chan struct{}, ops *atomic.Int64) error {
	rng := rand.New(rand.NewPCG(uint64(g), 7))
	size := int64(len(model))
	stripes := size / liveStripe
	buf := make([]byte, 96<<10)
	for i := 0; ; i++ {
		select {
		case <-stop:
			return nil
		default:
		}
		s := int64(g) + liveWorkers*rng.Int64N(stripes/liveWorkers)
		lo, hi := s*liveStripe, min((s+1)*liveStripe, size)
		off := lo + rng.Int64N(hi-lo)
		n := 1 + rng.Int64N(min(int64(len(buf)), hi-off))
		p := buf[:n]
		switch r := rng.IntN(10); {
		case r < 4:
			fillRandom(rng, p)
			if _, err := d.WriteAt(p, off); err != nil {
				return fmt.Errorf("worker %d: write %d+%d: %w", g, off, n, err)
			}
			copy(model[off:], p)
		case r < 5:
			if err := d.WriteZeroes(off, n, rng.IntN(2) == 0); err != nil {
				return fmt.Errorf("worker %d: zero %d+%d: %w", g, off, n, err)
			}
			clear(model[off : off+n])
		default:
			if _, err := d.ReadAt(p, off); err != nil {
				return fmt.Errorf("worker %d: read %d+%d: %w", g, off, n, err)
			}
			if j := firstDiff(p, model[off:off+n]); j >= 0 {
				return fmt.Errorf("worker %d: read %d+%d differs from the model at byte %d", g, off, n, off+int64(j))
			}
		}
		ops.Add(1)
	}
}

func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return len(a)
}

// liveVerify closes d, reopens the chain of top from its files and
// compares it with the model, checks every remaining image (with qemu-img
// where qemu reads it, else with vdisk's own check) and, where qemu reads
// the chain, compares it with the model through qemu-img compare.
func liveVerify(t *testing.T, d *vdisk.Disk, f liveFormat, model []byte, wantDepth int) {
	t.Helper()
	layers := d.Layers()
	if len(layers) != wantDepth {
		t.Fatalf("chain has %d layers after the job, want %d", len(layers), wantDepth)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	top := layers[0].Name
	r, err := vdisk.Open(ctx, top, &vdisk.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	got := make([]byte, len(model))
	if _, err := r.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if n := len(r.Layers()); n != wantDepth {
		t.Fatalf("reopened chain has %d layers, want %d", n, wantDepth)
	}
	r.Close()
	if i := firstDiff(got, model); i >= 0 {
		t.Fatalf("reopened chain differs from the model at byte %d", i)
	}
	for i, l := range layers {
		diff := l.ParentRef() != nil
		if f.qemuCheck && (!diff || f.qemuCheckDiff) {
			qemutest.Check(t, f.name, l.Name)
		}
		c, err := vdisk.Open(ctx, l.Name, &vdisk.OpenOptions{ReadOnly: true, NoBacking: true})
		if err != nil {
			t.Fatalf("layer %d: %v", i, err)
		}
		if _, ok := vdisk.As[driver.Checker](c.Top()); ok {
			res, err := c.Check(ctx, driver.RepairNone)
			if err != nil || res.Corruptions != 0 || res.Leaks != 0 || res.CheckErrors != 0 {
				t.Fatalf("vdisk check %s: %+v %v", l.Name, res, err)
			}
		}
		c.Close()
	}
	if f.qemuChain {
		raw := filepath.Join(t.TempDir(), "model.raw")
		if err := os.WriteFile(raw, model, 0o644); err != nil {
			t.Fatal(err)
		}
		if !qemutest.Compare(t, f.name, top, "raw", raw) {
			t.Fatalf("qemu-img compare: %s differs from the model", top)
		}
	}
}

func forLiveFormats(t *testing.T, fn func(t *testing.T, f liveFormat, dir, top string)) {
	qemutest.Require(t, "qemu-img")
	for i, f := range liveFormats {
		t.Run(f.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			top := buildLiveChain(t, dir, f, uint64(i+1))
			fn(t, f, dir, top)
		})
	}
}

func TestLiveCommit(t *testing.T) {
	forLiveFormats(t, func(t *testing.T, f liveFormat, dir, top string) {
		for _, c := range []struct {
			name  string
			o     vdisk.CommitOptions
			depth int
		}{
			{"into-base", vdisk.CommitOptions{Base: 2}, 2},
			{"into-parent", vdisk.CommitOptions{Base: 1}, 3},
		} {
			t.Run(c.name, func(t *testing.T) {
				sub := t.TempDir()
				copyDir(t, dir, sub)
				var last atomic.Int64
				c.o.Progress = func(done, total int64) { last.Store(done) }
				d, model := liveRun(t, filepath.Join(sub, filepath.Base(top)), func(d *vdisk.Disk) error { return d.Commit(ctx, &c.o) })
				if last.Load() == 0 {
					t.Error("no progress reported")
				}
				liveVerify(t, d, f, model, c.depth)
			})
		}
	})
}

func TestLiveMerge(t *testing.T) {
	forLiveFormats(t, func(t *testing.T, f liveFormat, dir, top string) {
		for _, c := range []struct {
			name     string
			from, to int
			depth    int
			newTop   string
		}{
			{"forward-active", 0, 1, 2, "mid"},
			{"forward-lower", 1, 2, 2, "top"},
			{"backward-lower", 2, 1, 2, "top"},
			{"backward-into-top", 1, 0, 2, "top"},
		} {
			t.Run(c.name, func(t *testing.T) {
				sub := t.TempDir()
				copyDir(t, dir, sub)
				var dropped []string
				d, model := liveRun(t, filepath.Join(sub, filepath.Base(top)), func(d *vdisk.Disk) error {
					var err error
					dropped, err = d.Merge(ctx, c.from, c.to, nil)
					return err
				})
				if len(dropped) != 1 {
					t.Errorf("dropped %v, want one image", dropped)
				}
				if got := filepath.Base(d.Top().Name); got != c.newTop+"."+f.ext {
					t.Errorf("top is %s, want %s", got, c.newTop)
				}
				liveVerify(t, d, f, model, c.depth)
			})
		}
	})
}

func TestLiveStream(t *testing.T) {
	forLiveFormats(t, func(t *testing.T, f liveFormat, dir, top string) {
		for _, c := range []struct {
			name  string
			base  int
			depth int
		}{
			{"all", 0, 1},
			{"keep-base", 2, 2},
		} {
			t.Run(c.name, func(t *testing.T) {
				sub := t.TempDir()
				copyDir(t, dir, sub)
				d, model := liveRun(t, filepath.Join(sub, filepath.Base(top)), func(d *vdisk.Disk) error {
					_, err := d.Stream(ctx, &vdisk.StreamOptions{Base: c.base})
					return err
				})
				liveVerify(t, d, f, model, c.depth)
			})
		}
	})
}

func TestLiveSnapshot(t *testing.T) {
	forLiveFormats(t, func(t *testing.T, f liveFormat, dir, top string) {
		snap := filepath.Join(dir, "snap."+f.ext)
		var frozen []byte
		d, model := liveRun(t, top, func(d *vdisk.Disk) error {
			if err := d.Snapshot(ctx, snap, nil); err != nil {
				return err
			}
			// The old top is now read-only and frozen: remember it.
			o, err := vdisk.Open(ctx, top, &vdisk.OpenOptions{ReadOnly: true})
			if err != nil {
				return err
			}
			defer o.Close()
			frozen = make([]byte, o.Size())
			_, err = o.ReadAt(frozen, 0)
			return err
		})
		if d.Top().Name != snap {
			t.Fatalf("top is %s, want %s", d.Top().Name, snap)
		}
		liveVerify(t, d, f, model, 4)
		// The snapshot (the old top's chain) did not change after it was
		// taken, although the disk went on being written.
		o, err := vdisk.Open(ctx, top, &vdisk.OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		defer o.Close()
		got := make([]byte, o.Size())
		if _, err := o.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if i := firstDiff(got, frozen); i >= 0 {
			t.Fatalf("the snapshotted chain changed at byte %d", i)
		}
	})
}

func copyDir(t *testing.T, from, to string) {
	t.Helper()
	ents, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, e.Name()), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestJobCrashFormats crashes commit and stream on qcow2, vdi, vpc and vmdk
// chains at every write (faultfs: unsynced writes are lost): every image
// still opens and the chain reads what was flushed before the job.
func TestJobCrashFormats(t *testing.T) {
	for i, f := range liveFormats {
		t.Run(f.name, func(t *testing.T) {
			t.Parallel()
			base := memfs.New()
			top, model := buildMemChain(t, base, f, uint64(i+20))
			points := 0
			for _, op := range []string{"commit", "commit-parent", "stream", "merge-active"} {
				for n := 1; n < 5000; n++ {
					fs := faultfs.New(base.Clone())
					fs.CrashAfterWrites(n)
					var err error
					o := &vdisk.OpenOptions{Storage: fs}
					switch op {
					case "commit":
						err = vdisk.Commit(ctx, top, &vdisk.CommitOptions{Base: 2, Open: o})
					case "commit-parent":
						err = vdisk.Commit(ctx, top, &vdisk.CommitOptions{Open: o})
					case "stream":
						_, err = vdisk.Stream(ctx, top, &vdisk.StreamOptions{Open: o})
					case "merge-active":
						// The top into mid, which becomes the top: the
						// chain is then opened from mid.
						_, err = vdisk.Merge(ctx, top, 0, 1, &vdisk.MergeOptions{Open: o})
					}
					if err == nil && !fs.Crashed() {
						break
					}
					if err != nil && !errors.Is(err, faultfs.ErrCrashed) {
						t.Fatalf("%s crash at write %d: %v", op, n, err)
					}
					points++
					name := top
					if op == "merge-active" && err == nil {
						name = strings.Replace(top, "top.", "mid.", 1)
					}
					d, err := vdisk.Open(ctx, name, &vdisk.OpenOptions{Storage: fs.Durable(), ReadOnly: true})
					if err != nil {
						t.Fatalf("%s crash at write %d: reopen: %v", op, n, err)
					}
					got := make([]byte, len(model))
					_, err = d.ReadAt(got, 0)
					d.Close()
					if err != nil {
						t.Fatalf("%s crash at write %d: read: %v", op, n, err)
					}
					if j := firstDiff(got, model); j >= 0 {
						t.Fatalf("%s crash at write %d: content differs at byte %d", op, n, j)
					}
				}
			}
			if points < 100 {
				t.Fatalf("only %d crash points", points)
			}
			t.Logf("%d crash points", points)
		})
	}
}

// buildMemChain makes base <- mid <- top of format f on st (2 MiB, a few
// writes per layer) and returns the top's name and the chain's content.
func buildMemChain(t *testing.T, st driver.Storage, f liveFormat, seed uint64) (string, []byte) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 3))
	prev, name := "", ""
	// VDI writes a whole block per allocation: smaller blocks give its
	// jobs as many write points as the other formats' have.
	var opts []driver.KV
	if f.name == "vdi" {
		opts = []driver.KV{{Key: "block_size", Value: "64K"}}
	}
	for _, layer := range []string{"base", "mid", "top"} {
		name = "/c/" + layer + "." + f.ext
		o := &vdisk.CreateOptions{Format: f.name, Size: 4 << 20, Options: opts, Storage: st}
		if prev != "" {
			o = &vdisk.CreateOptions{Format: f.name, Backing: filepath.Base(prev), BackingFormat: f.name, Options: opts, Storage: st}
		}
		d, err := vdisk.Create(ctx, name, o)
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 24; i++ {
			n := 1 + rng.Int64N(100<<10)
			off := rng.Int64N(d.Size() - n)
			p := make([]byte, n)
			fillRandom(rng, p)
			if _, err := d.WriteAt(p, off); err != nil {
				t.Fatal(err)
			}
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		prev = name
	}
	d, err := vdisk.Open(ctx, name, &vdisk.OpenOptions{Storage: st, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	content := make([]byte, d.Size())
	if _, err := d.ReadAt(content, 0); err != nil {
		t.Fatal(err)
	}
	return name, content
}
