package vhdx

import (
	"bytes"
	"fmt"
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

const (
	reorgSize = 16 << 20
	reorgBig  = 130 << 30 // past what a 1 MiB BAT of 1 MiB blocks holds
)

// reorgSetup: every block written, every other one discarded (holes for
// Compact to fill).
func reorgSetup(t *testing.T) (*memfs.FS, *model.Model) {
	mem := memfs.New()
	m := model.New(reorgSize)
	d := createVHDX(t, mem, "/img.vhdx", reorgSize, "", disktest.KVs("block_size=1M")...)
	for b := int64(0); b < reorgSize>>20; b++ {
		// Sparse blocks: three pieces (each copied by its own write).
		disktest.MustWrite(t, d, m, disktest.Fill(64<<10, byte(b+1)), b<<20)
		disktest.MustWrite(t, d, m, disktest.Fill(4096, byte(b+0x41)), b<<20+500<<10)
		disktest.MustWrite(t, d, m, disktest.Fill(4096, byte(b+0x81)), b<<20+900<<10)
	}
	for b := int64(0); b < reorgSize>>20; b += 2 {
		if err := d.Discard(b<<20, 1<<20); err != nil {
			t.Fatal(err)
		}
		m.Zero(b<<20, 1<<20)
	}
	disktest.MustClose(t, d)
	return mem, m
}

// reorgPhase compacts the image, then grows it past its BAT region (the
// BAT moves). Neither changes what the first reorgSize bytes read.
func reorgPhase(st driver.Storage, arm func()) {
	d, err := vdisk.Open(ctx, "/img.vhdx", &vdisk.OpenOptions{Storage: st})
	if err != nil {
		panic(err)
	}
	arm()
	if d.Compact(ctx, nil) == nil {
		d.Resize(ctx, reorgBig, "")
	}
	d.Close()
}

// TestCrashCompactMoveBAT stops Compact and a BAT-moving grow after every
// write operation, as a power cut (only synced writes survive) and as a
// process kill (every completed write stays): vdisk reads the old content
// at the old or the new size (the grown range unallocated), qemu-img
// check -r all replays the log and finds nothing else, qemu reads the
// same size and bytes (every other point), and vdisk's read-write replay
// reads the same (every fourth).
func TestCrashCompactMoveBAT(t *testing.T) {
	qemutest.Require(t)
	mem0, m := reorgSetup(t)
	ffs := faultfs.New(mem0.Clone())
	reorgPhase(ffs, ffs.Reset)
	total := ffs.Writes()
	var points, replays, grown atomic.Int64
	t.Run("points", func(t *testing.T) {
		for k := 1; k <= total; k++ {
			for _, kill := range []bool{false, true} {
				what := fmt.Sprintf("stop after write %d of %d (kill=%v)", k, total, kill)
				t.Run(fmt.Sprintf("%d-%v", k, kill), func(t *testing.T) {
					t.Parallel()
					mem := mem0.Clone()
					ffs := faultfs.New(mem)
					var st driver.Storage = mem
					if kill {
						reorgPhase(ffs, func() { ffs.KillAfterWrites(k) })
					} else {
						reorgPhase(ffs, func() { ffs.CrashAfterWrites(k) })
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
					size := d.Size()
					if size == reorgBig {
						grown.Add(1)
					} else if size != reorgSize {
						t.Fatalf("%s: size %d", what, size)
					}
					reorgVerify(t, d, m, what)
					disktest.MustClose(t, d)
					f := saveSparse(t, st, "/img.vhdx", t.TempDir())
					qemuReplayCheck(t, f, what)
					// qemu's reads (and size), at every other point.
					if k%2 == 0 {
						if got := int64(qemutest.Info(t, "vhdx", f)["virtual-size"].(float64)); got != size {
							t.Fatalf("%s: qemu sees %d bytes, vdisk %d", what, got, size)
						}
						out := f + ".raw"
						qemutestImg(t, "dd", "-f", "vhdx", "-O", "raw", "bs=1M", fmt.Sprint("count=", reorgSize>>20), "if="+f, "of="+out)
						if b, err := os.ReadFile(out); err != nil || !bytes.Equal(b, m.Data) {
							t.Fatalf("%s: qemu reads differently (%v)", what, err)
						}
					}
					if k%4 == 1 {
						d = openVHDX(t, st, "/img.vhdx", false)
						reorgVerify(t, d, m, what+", replayed read-write")
						disktest.MustClose(t, d)
					}
				})
			}
		}
	})
	if t.Failed() {
		return
	}
	if !disktest.Narrowed() && (points.Load() < 100 || replays.Load() == 0 || grown.Load() == 0) {
		t.Fatalf("%d stop points over %d writes, %d with a log to replay, %d grown", points.Load(), total, replays.Load(), grown.Load())
	}
	t.Logf("%d stop points over %d write operations; %d left a log to replay, %d had grown", points.Load(), total, replays.Load(), grown.Load())
}

// reorgVerify: the first reorgSize bytes read as the model says, the rest
// (after a grow) holds nothing.
func reorgVerify(t *testing.T, d *vdisk.Disk, m *model.Model, what string) {
	t.Helper()
	got := make([]byte, 1<<20)
	for off := int64(0); off < reorgSize; off += int64(len(got)) {
		if _, err := d.ReadAt(got, off); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if i := m.Check(got, off); i >= 0 {
			t.Fatalf("%s: byte %d reads %#x, want %#x", what, i, got[i-off], m.Data[i])
		}
	}
	im := topImage(d)
	for pos := int64(reorgSize); pos < d.Size(); {
		e, err := im.Status(pos, d.Size()-pos)
		if err != nil || e.State == driver.Data {
			t.Fatalf("%s: %v %+v past the old end", what, err, e)
		}
		pos += e.Length
	}
}

// saveSparse copies a file out for qemu a MiB at a time, leaving holes
// where it reads zeros (cheaper than saveTo under the race detector).
func saveSparse(t *testing.T, st driver.Storage, name, dir string) string {
	t.Helper()
	src, err := st.Open(name, driver.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	size, err := src.Size()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, filepath.Base(name))
	out, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		b := buf[:min(int64(len(buf)), size-off)]
		if err := readFull(src, b, off); err != nil {
			t.Fatal(err)
		}
		if !driver.IsZero(b) {
			if _, err := out.WriteAt(b, off); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := out.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return p
}
