package main

import (
	"encoding/json"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/osfs"
)

// TestChain runs the commands over a backing chain of the test-only vdtest
// format: create -b, convert into a non-raw format and with -B, info
// --backing-chain, map across layers, compare across formats.
func TestChain(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	sparseRaw(t, src, 4<<20, map[int64][]byte{
		0:       pattern(1, 64<<10),
		1 << 20: pattern(2, 64<<10),
	})
	base := filepath.Join(dir, "base.vdtest")
	mustRun(t, "convert", "-f", "raw", "-O", "vdtest", "-o", "label=base", src, base)

	top := filepath.Join(dir, "top.vdtest")
	r := mustRun(t, "create", "-f", "vdtest", "-b", "base.vdtest", "-F", "vdtest", top)
	if want := "Formatting '" + top + "', fmt=vdtest size=4194304 backing_file=base.vdtest backing_fmt=vdtest\n"; r.stdout != want {
		t.Errorf("create -b: %q, want %q", r.stdout, want)
	}

	// info: the top names its backing file as recorded and as resolved.
	info := parseJSON(t, mustRun(t, "info", "--output", "json", top).stdout).(map[string]any)
	for k, want := range map[string]any{"backing-filename": "base.vdtest", "full-backing-filename": base,
		"backing-filename-format": "vdtest", "virtual-size": 4194304.0, "filename": top, "format": "vdtest",
		"cluster-size": 65536.0, "dirty-flag": false} {
		if !reflect.DeepEqual(info[k], want) {
			t.Errorf("info %s = %v, want %v", k, info[k], want)
		}
	}
	chain, _ := parseJSON(t, mustRun(t, "info", "--output", "json", "--backing-chain", top).stdout).([]any)
	if len(chain) != 2 || chain[0].(map[string]any)["filename"] != top || chain[1].(map[string]any)["filename"] != base ||
		chain[1].(map[string]any)["backing-filename"] != nil {
		t.Errorf("info --backing-chain: %v", chain)
	}
	human := mustRun(t, "info", "--backing-chain", top).stdout
	for _, want := range []string{"image: " + top + "\nfile format: vdtest\nvirtual size: 4 MiB (4194304 bytes)\n",
		"backing file: base.vdtest (actual path: " + base + ")\nbacking file format: vdtest\n",
		"\n\nimage: " + base + "\nfile format: vdtest\n"} {
		if !strings.Contains(human, want) {
			t.Errorf("info --backing-chain (human) lacks %q:\n%s", want, human)
		}
	}
	// map: the data is in the base (depth 1), the rest is unallocated
	// everywhere; runs tile the disk.
	var runs []struct {
		Start, Length, Depth int64
		Present, Zero, Data  bool
	}
	if err := json.Unmarshal([]byte(mustRun(t, "map", "--output", "json", top).stdout), &runs); err != nil {
		t.Fatal(err)
	}
	var next int64
	data := map[int64]int64{}
	for _, r := range runs {
		if r.Start != next || r.Depth != 1 || r.Data != r.Present || r.Zero == r.Data {
			t.Errorf("map run %+v", r)
		}
		if r.Data {
			data[r.Start] = r.Length
		}
		next = r.Start + r.Length
	}
	if next != 4<<20 || !reflect.DeepEqual(data, map[int64]int64{0: 64 << 10, 1 << 20: 64 << 10}) {
		t.Errorf("map: data runs %v, end %d", data, next)
	}
	hmap := mustRun(t, "map", top).stdout
	if lines := strings.Split(strings.TrimSpace(hmap), "\n"); len(lines) != 3 || !strings.HasPrefix(lines[1], "0               0x10000 ") ||
		!strings.HasPrefix(lines[2], "0x100000        0x10000 ") || !strings.HasSuffix(lines[2], base) {
		t.Errorf("map (human):\n%s", hmap)
	}

	if r := vdiskRun(t, "compare", "-f", "vdtest", "-F", "raw", top, src); r.code != 0 || r.stdout != "Images are identical.\n" {
		t.Errorf("compare top with its source: exit %d %q %q", r.code, r.stdout, r.stderr)
	}

	// A source that differs from the backing file, also where it reads
	// zeros over the backing's data: convert -B must write those zeros.
	src2 := filepath.Join(dir, "src2.raw")
	sparseRaw(t, src2, 4<<20, map[int64][]byte{
		1 << 20: pattern(2, 64<<10),
		2 << 20: pattern(3, 4096),
	})
	top2 := filepath.Join(dir, "top2.vdtest")
	mustRun(t, "convert", "-f", "raw", "-O", "vdtest", "-B", "base.vdtest", "-F", "vdtest", src2, top2)
	if r := vdiskRun(t, "compare", "-f", "vdtest", "-F", "raw", top2, src2); r.code != 0 {
		t.Errorf("convert -B: result differs from its source: %q %q", r.stdout, r.stderr)
	}
	if r := mustRun(t, "info", "--output", "json", top2); !strings.Contains(r.stdout, `"backing-filename": "base.vdtest"`) {
		t.Errorf("convert -B: target has no backing file:\n%s", r.stdout)
	}
	flat := filepath.Join(dir, "flat.raw")
	mustRun(t, "convert", "-O", "raw", top2, flat)
	if out, code := runQemu(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", flat, src2); code != 0 {
		t.Errorf("flattened chain differs from the source (qemu-img compare): %s", out)
	}
}

func TestSnapshots(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "snap.vdtest")
	mustRun(t, "create", "-q", "-f", "vdtest", img, "1M")
	// Record a snapshot in the header, as a format with snapshots would.
	st := mustOpenFile(t, img)
	im, err := vdtLoad(st)
	if err != nil {
		t.Fatal(err)
	}
	im.meta.Snapshots = []driver.Snapshot{{ID: "1", Name: "s1", VMStateSize: 0, DateSec: 1700000000, VMClockSec: 3723, VMClockNsec: 4000000}}
	if err := im.writeHeader(); err != nil {
		t.Fatal(err)
	}
	st.Close()

	r := mustRun(t, "info", img)
	if !strings.Contains(r.stdout, "Snapshot list:\nID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT\n1         s1                    0 B ") ||
		!strings.Contains(r.stdout, " 01:02:03.004           \n") {
		t.Errorf("snapshot list:\n%s", r.stdout)
	}
	if r := mustRun(t, "info", "--output", "json", img); !strings.Contains(r.stdout, `"snapshots": [`) {
		t.Errorf("JSON has no snapshots:\n%s", r.stdout)
	}
	out := filepath.Join(dir, "out.raw")
	for _, tc := range []struct{ param, want string }{
		{"snapshot.name=s1", "cannot read an internal snapshot"},
		{"1", "cannot read an internal snapshot"},
		{"snapshot.name=nosuch", "no snapshot"},
		{"bogus=1", "snapshot.name"},
	} {
		r := vdiskRun(t, "convert", "-l", tc.param, img, out)
		oneErrorLine(t, r, "vdisk convert")
		if !strings.Contains(r.stderr, tc.want) {
			t.Errorf("-l %s: %q lacks %q", tc.param, r.stderr, tc.want)
		}
		if exists(out) {
			t.Errorf("-l %s: target left behind", tc.param)
		}
	}
}

// TestConvertSnapshot converts internal snapshots of a qemu-made qcow2
// (-l by name, by ID, by both) and measures one; the copies compare equal
// to qemu-img's own convert -l.
func TestConvertSnapshot(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "s.qcow2")
	mustQemu(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "4M")
	mustQemu(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", img)
	mustQemu(t, "qemu-img", "snapshot", "-c", "first", img)
	mustQemu(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x22 512k 1M", "-c", "write -z 0 64k", img)
	mustQemu(t, "qemu-img", "snapshot", "-c", "second", img)
	mustQemu(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 3M", img)
	for _, tc := range []struct{ param, qemu string }{
		{"snapshot.name=first", "snapshot.name=first"},
		{"1", "1"},
		{"second", "second"},
		{"snapshot.id=2,snapshot.name=second", "snapshot.id=2,snapshot.name=second"},
	} {
		want := filepath.Join(dir, "want.raw")
		got := filepath.Join(dir, "got.qcow2")
		mustQemu(t, "qemu-img", "convert", "-l", tc.qemu, "-O", "raw", img, want)
		r := mustRun(t, "convert", "-l", tc.param, "-O", "qcow2", img, got)
		if r.stderr != "" {
			t.Errorf("-l %s: stderr %q", tc.param, r.stderr)
		}
		if out, code := runQemu(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", want, got); code != 0 {
			t.Errorf("-l %s: copy differs from qemu-img's: %s", tc.param, out)
		}
		if out, code := runQemu(t, "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", img, got); code == 0 {
			t.Errorf("-l %s: the copy equals the current state: %s", tc.param, out)
		}
	}
	r := vdiskRun(t, "convert", "-l", "snapshot.id=1,snapshot.name=second", img, filepath.Join(dir, "x.raw"))
	if !strings.Contains(r.stderr, "no snapshot") {
		t.Errorf("mismatched id and name: %q", r.stderr)
	}
	m := mustRun(t, "measure", "--output", "json", "-l", "first", "-O", "qcow2", img)
	q, _ := runQemu(t, "qemu-img", "measure", "--output", "json", "-l", "first", "-O", "qcow2", img)
	if m.stdout != q {
		t.Errorf("measure -l: %q, qemu-img: %q", m.stdout, q)
	}
}

// mustOpenFile opens a file read-write through the storage the CLI uses.
func mustOpenFile(t *testing.T, name string) driver.File {
	t.Helper()
	f, err := osfs.New().Open(name, driver.ReadWrite)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// TestConvertSourceErrorMidway: the source fails while its data is copied
// (clusters recorded as allocated lie past the end of the file): convert
// fails with one line and removes the target it created.
func TestConvertSourceErrorMidway(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "broken.vdtest")
	mustRun(t, "create", "-q", "-f", "vdtest", src, "4M")
	f := mustOpenFile(t, src)
	im, err := vdtLoad(f)
	if err != nil {
		t.Fatal(err)
	}
	// Clusters recorded as allocated but never written: the file ends
	// after the header, so reading them fails.
	im.alloc[20], im.alloc[40] = true, true
	if err := im.writeHeader(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	for _, args := range [][]string{
		{"convert", "-O", "raw", src},
		{"convert", "-m", "1", "-p", "-O", "vdtest", src},
	} {
		dst := filepath.Join(dir, "out.img")
		r := vdiskRun(t, append(args, dst)...)
		// With -p the progress line ends before the error line.
		last := strings.TrimSuffix(r.stderr, "\n")
		r.stderr = last[strings.LastIndex(last, "\n")+1:] + "\n"
		oneErrorLine(t, r, "vdisk convert")
		if !strings.Contains(r.stderr, "unexpected EOF") {
			t.Errorf("%v: %q is not the read error", args, r.stderr)
		}
		if exists(dst) {
			t.Errorf("%v: failed convert left its target behind", args)
		}
	}
}
