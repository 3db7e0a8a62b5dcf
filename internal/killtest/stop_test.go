package killtest

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/faultfs"
	"github.com/vdisk/vdisk/storage/memfs"
)

const (
	stopSize    = 4 << 20
	stopMaxSize = 8 << 20
	stopOps     = 100
)

// stopPoints is the number of write indices checked per format (evenly
// spread over the run): 100, or every index with VDISK_LONG=1.
func stopPoints() int {
	if os.Getenv("VDISK_LONG") != "" {
		return 1 << 30
	}
	return 100
}

// TestStopTheWorld is the storage-level form of TestKill: the same load,
// one worker, on faultfs over memfs, stopped by faultfs.KillAfterWrites
// after write k (every completed write kept, as a killed process's are);
// the frozen image must pass the same checks, for k over every write index
// of the run (or a dense sample of them).
func TestStopTheWorld(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	for _, r := range rows {
		t.Run(r.name, func(t *testing.T) {
			t.Parallel()
			stopRow(t, r)
		})
	}
}

// stopRun creates the image on a fresh memfs and runs the load, killed
// after write k (never, for k = 0); it returns the frozen storage, the
// log, and the number of writes the run made.
func stopRun(t *testing.T, r row, ops, k int) (*memfs.FS, []byte, int) {
	mem := memfs.New()
	d, err := vdisk.Create(ctx, "/disk.img", &vdisk.CreateOptions{Format: r.format, Size: stopSize,
		Options: disktest.KVs(r.opts), Storage: mem})
	if err != nil {
		t.Fatal(err)
	}
	disktest.MustClose(t, d)
	ffs := faultfs.New(mem)
	if k > 0 {
		ffs.KillAfterWrites(k)
	}
	var log bytes.Buffer
	d, err = vdisk.Open(ctx, "/disk.img", &vdisk.OpenOptions{Format: r.format, Storage: ffs})
	if err != nil {
		if k > 0 && errors.Is(err, faultfs.ErrKilled) {
			return mem, nil, ffs.Writes()
		}
		t.Fatalf("open: %v", err)
	}
	f, _ := driver.Lookup(r.format)
	cfg := loadConfig{seed: 21, idBase: 1, workers: 1, ops: ops, maxSize: stopMaxSize, maxIO: 256 << 10}
	if raceOn {
		cfg.maxIO = 64 << 10
	}
	cfg.caps(f)
	err = runLoad(d, cfg, &opLog{w: &log})
	if k == 0 && err != nil {
		t.Fatalf("load without a kill: %v", err)
	}
	if k > 0 && err != nil && !errors.Is(err, faultfs.ErrKilled) {
		t.Fatalf("kill after write %d: the load failed otherwise: %v", k, err)
	}
	// The process is gone: its files close without another write (the
	// storage refuses them).
	d.Close()
	return mem, log.Bytes(), ffs.Writes()
}

func stopRow(t *testing.T, r row) {
	dir := t.TempDir()
	ops := stopOps
	_, _, total := stopRun(t, r, ops, 0)
	if total < stopPoints()+10 && total > 0 {
		// Formats whose operations write little need a longer load for a
		// hundred write indices.
		ops = ops*(stopPoints()+10)/total + 1
		_, _, total = stopRun(t, r, ops, 0)
	}
	n := min(total, stopPoints())
	var st tally
	for i := range n {
		k := 1 + i*total/n
		mem, text, _ := stopRun(t, r, ops, k)
		data, err := mem.ReadFile("/disk.img")
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, "disk.img")
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		m := newModel(make([]byte, stopSize))
		if err := m.apply(text); err != nil {
			t.Fatal(err)
		}
		if err := judgeImage(t, r, path, &st); err != nil {
			keep(t, path, k)
			t.Fatalf("killed after write %d of %d: %v", k, total, err)
		}
		got, err := readImage(r, path)
		if err != nil {
			t.Fatalf("killed after write %d of %d: %v", k, total, err)
		}
		if err := m.verify(got); err != nil {
			keep(t, path, k)
			t.Fatalf("killed after write %d of %d: %v", k, total, err)
		}
	}
	t.Logf("%s: %d of %d write indices: %v", r.name, n, total, st)
}
