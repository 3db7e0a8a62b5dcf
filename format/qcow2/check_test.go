package qcow2_test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// rawImage gives tests access to an image file's structures.
type rawImage struct {
	t    testing.TB
	path string
	b    []byte
}

func loadRaw(t testing.TB, path string) *rawImage {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return &rawImage{t: t, path: path, b: b}
}

func (r *rawImage) u32(off int64) uint32 { return binary.BigEndian.Uint32(r.b[off:]) }
func (r *rawImage) u64(off int64) uint64 { return binary.BigEndian.Uint64(r.b[off:]) }
func (r *rawImage) put64(off int64, v uint64) {
	binary.BigEndian.PutUint64(r.b[off:], v)
}
func (r *rawImage) put16(off int64, v uint16) {
	binary.BigEndian.PutUint16(r.b[off:], v)
}
func (r *rawImage) save() {
	if err := os.WriteFile(r.path, r.b, 0o644); err != nil {
		r.t.Fatal(err)
	}
}
func (r *rawImage) cs() int64    { return 1 << r.u32(20) }
func (r *rawImage) l1Off() int64 { return int64(r.u64(40)) }
func (r *rawImage) rtOff() int64 { return int64(r.u64(48)) }
func (r *rawImage) l2Off(i int) int64 {
	return int64(r.u64(r.l1Off()+int64(i)*8) & 0x00fffffffffffe00)
}

// l2EntryOff is the file offset of the L2 entry of guest cluster gc.
func (r *rawImage) l2EntryOff(gc int64) int64 {
	n := r.cs() / 8
	return r.l2Off(int(gc/n)) + (gc%n)*8
}

// refOff is the file offset of the 16-bit refcount of host cluster c.
func (r *rawImage) refOff(c int64) int64 {
	per := r.cs() / 2
	rb := int64(r.u64(r.rtOff() + (c/per)*8))
	return rb + (c%per)*2
}

// qemuCheck runs qemu-img check and returns its result and exit code.
func qemuCheck(t testing.TB, file string) (qemutest.CheckResult, int) {
	t.Helper()
	cmd := exec.Command("qemu-img", "check", "--output", "json", "-f", "qcow2", file)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	var r qemutest.CheckResult
	if jerr := json.Unmarshal(stdout.Bytes(), &r); jerr != nil {
		t.Fatalf("qemu-img check: %s %s", stdout.String(), stderr.String())
	}
	return r, code
}

func ourCheck(t testing.TB, file string, mode driver.RepairMode) *driver.CheckResult {
	t.Helper()
	d, err := openRetry(file, &vdisk.OpenOptions{ReadOnly: mode == driver.RepairNone, NoBacking: true})
	if err != nil {
		t.Fatalf("open for check: %v", err)
	}
	defer d.Close()
	res, err := d.Check(ctx, mode)
	if err != nil {
		t.Fatalf("check: %v", err)
	}
	return res
}

// TestCheckRepair corrupts images in known ways and compares what our check
// finds with qemu-img check, then repairs and checks that qemu is happy and
// the data intact.
func TestCheckRepair(t *testing.T) {
	qemutest.Require(t)
	cases := []struct {
		name        string
		corrupt     func(r *rawImage)
		leaks, errs int // what qemu-img check finds (and so must we)
		mode        driver.RepairMode
		lost        []int64 // guest clusters whose data the repair may lose
	}{
		{"leak", func(r *rawImage) {
			// A cluster at the end of the file nothing references.
			c := (int64(len(r.b)) + r.cs() - 1) / r.cs()
			r.b = append(r.b, make([]byte, (c+1)*r.cs()-int64(len(r.b)))...)
			r.put16(r.refOff(c), 1)
			r.put16(r.refOff(3), 2) // the L1 table: refcount 2 is a leak too
		}, 2, 0, driver.RepairLeaks, nil},
		{"refcount-too-low", func(r *rawImage) {
			host := int64(r.u64(r.l2EntryOff(0)) & 0x00fffffffffffe00)
			r.put16(r.refOff(host/r.cs()), 0)
		}, 0, 2, driver.RepairAll, nil}, // qemu counts the refcount and the copied flag
		{"copied-flag", func(r *rawImage) {
			o := r.l2EntryOff(1)
			r.put64(o, r.u64(o)&^(1<<63))
		}, 0, 1, driver.RepairAll, nil},
		{"l2-entry-past-eof", func(r *rawImage) {
			r.put64(r.l2EntryOff(2), uint64(len(r.b))*4&^0xffff|1<<63)
		}, 1, 2, driver.RepairAll, []int64{2}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := tempDir(t)
			f := filepath.Join(dir, "c.qcow2")
			qemutest.Create(t, "qcow2", f, "4M")
			qemutest.IO(t, "qcow2", f, "write -P 0x11 0 64k", "write -P 0x22 64k 64k", "write -P 0x33 128k 64k", "write -P 0x44 1M 64k")
			want := rawOf(t, "qcow2", f)
			r := loadRaw(t, f)
			c.corrupt(r)
			r.save()
			q, _ := qemuCheck(t, f)
			if q.Leaks != c.leaks || q.Corruptions != c.errs {
				t.Fatalf("test setup: qemu finds %d leaks, %d corruptions; want %d, %d", q.Leaks, q.Corruptions, c.leaks, c.errs)
			}
			res := ourCheck(t, f, driver.RepairNone)
			if res.Leaks != c.leaks || res.Corruptions != c.errs {
				t.Fatalf("we find %d leaks, %d corruptions; qemu finds %d, %d\n%v", res.Leaks, res.Corruptions, q.Leaks, q.Corruptions, res.Messages)
			}
			res = ourCheck(t, f, c.mode)
			if res.Leaks != 0 || res.Corruptions != 0 || res.LeaksFixed+res.CorruptionsFixed == 0 {
				t.Fatalf("after repair: %+v %v", res, res.Messages)
			}
			qemutest.Check(t, "qcow2", f)
			got := rawOf(t, "qcow2", f)
			for _, gc := range c.lost {
				copy(want[gc*65536:(gc+1)*65536], got[gc*65536:])
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("data changed by the repair at %d", firstDiff(got, want))
			}
		})
	}
}

// TestDirtyImageRepairedOnOpen: an image left dirty with lazy refcounts
// (qemu-io aborted) is repaired when opened read-write.
func TestDirtyImageRepairedOnOpen(t *testing.T) {
	qemutest.Require(t)
	dir := tempDir(t)
	f := filepath.Join(dir, "d.qcow2")
	qemutest.Create(t, "qcow2", f, "4M", "lazy_refcounts=on")
	qemutest.RunCode("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x5b 2M 64k", "-c", "abort", f)
	want := rawOf(t, "qcow2", f, "-U")
	if res := ourCheck(t, f, driver.RepairNone); res.Corruptions == 0 {
		t.Fatalf("a dirty image with lazy refcounts should have stale refcounts: %+v", res)
	}
	d, err := openRetry(f, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d.Top().Info().Dirty {
		t.Fatal("still dirty after a read-write open")
	}
	if _, err := d.WriteAt(bytes.Repeat([]byte{0x77}, 4096), 3<<20); err != nil {
		t.Fatal(err)
	}
	copy(want[3<<20:], bytes.Repeat([]byte{0x77}, 4096))
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	qemutest.Check(t, "qcow2", f)
	if got := rawOf(t, "qcow2", f); !bytes.Equal(got, want) {
		t.Fatalf("content differs at %d", firstDiff(got, want))
	}
}
