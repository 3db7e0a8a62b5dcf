package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"syscall"
	"testing"

	"github.com/vdisk/vdisk/driver"
)

// qemuVirtualSize is the virtual size qemu-img info reports.
func qemuVirtualSize(t *testing.T, format, name string) int64 {
	t.Helper()
	out := mustQemu(t, "qemu-img", "info", "-f", format, "--output", "json", name)
	var v struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatal(err)
	}
	return v.VirtualSize
}

// TestResizeRaw follows qemu-img resize's rules on raw; qemu-img info
// agrees on every new size.
func TestResizeRaw(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "r.raw")
	sparseRaw(t, img, 1<<20, map[int64][]byte{0: pattern(1, 4096), 1<<20 - 4096: pattern(2, 4096)})
	shrinkErr := "vdisk resize: Use the --shrink option to perform a shrink operation.\n" +
		"vdisk resize: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.\n"
	for _, tc := range []struct {
		args   []string
		code   int
		stderr string
		size   int64 // expected size afterwards
	}{
		{[]string{"2M"}, 0, "", 2 << 20},
		{[]string{"1M"}, 1, shrinkErr, 2 << 20},
		{[]string{"--shrink", "1M"}, 0, "", 1 << 20},
		{[]string{"+1M"}, 0, "", 2 << 20},
		{[]string{"--shrink", "-512k"}, 0, "", 1536 << 10},
		{[]string{"-512k"}, 1, shrinkErr, 1536 << 10},
		{[]string{"--shrink", "--", "-512k"}, 0, "", 1 << 20},
		{[]string{"--shrink", "-5M"}, 1, "vdisk resize: New image size must be positive\n", 1 << 20},
		{[]string{"0"}, 1, "vdisk resize: New image size must be positive\n", 1 << 20},
		{[]string{"--preallocation=full", "--shrink", "512k"}, 1, "vdisk resize: Preallocation can only be used for growing images\n", 1 << 20},
		{[]string{"--preallocation=falloc", "1M"}, 1, "vdisk resize: Preallocation can only be used for growing images\n", 1 << 20},
		{[]string{"--preallocation=bogus", "4M"}, 1, "vdisk resize: Invalid preallocation mode 'bogus'\n", 1 << 20},
		{[]string{"--preallocation=metadata", "4M"}, 1, "", 1 << 20}, // raw: the driver refuses, the size stays
		{[]string{"--preallocation=full", "1536k"}, 0, "", 1536 << 10},
		{[]string{"-q", "2M"}, 0, "", 2 << 20},
		{[]string{"1000000"}, 1, shrinkErr, 2 << 20},
		{[]string{"--shrink", "1000000"}, 0, "", 1000448}, // raw rounds up to a sector, as qemu
		{[]string{"12Q"}, 1, "vdisk resize: Parameter 'size' expects a non-negative number below 2^64. Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- and exabytes, respectively.\n", 1000448},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			args := append([]string{"resize", "-f", "raw"}, tc.args[:len(tc.args)-1]...)
			args = append(args, img, tc.args[len(tc.args)-1])
			r := vdiskRun(t, args...)
			if r.code != tc.code {
				t.Errorf("exit %d, want %d (stderr %q)", r.code, tc.code, r.stderr)
			}
			if tc.stderr != "" && r.stderr != tc.stderr {
				t.Errorf("stderr %q, want %q", r.stderr, tc.stderr)
			}
			if tc.code != 0 && tc.stderr == "" {
				oneErrorLine(t, r, "vdisk resize")
			}
			wantOut := ""
			if tc.code == 0 && tc.args[0] != "-q" {
				wantOut = "Image resized.\n"
			}
			if r.stdout != wantOut {
				t.Errorf("stdout %q, want %q", r.stdout, wantOut)
			}
			if got := qemuVirtualSize(t, "raw", img); got != tc.size {
				t.Errorf("qemu-img info: virtual size %d, want %d", got, tc.size)
			}
		})
	}
	// The data below the smallest size survived; the grown part reads zeros.
	mustRun(t, "resize", "-f", "raw", img, "4M")
	want := make([]byte, 4<<20)
	copy(want, pattern(1, 4096))
	sameContent(t, img, want)

	for _, args := range [][]string{{"resize", "-f", "raw", img}, {"resize", "1M"}, {"resize"}} {
		r := vdiskRun(t, args...)
		if want := "vdisk resize: expecting image file name and size\nTry 'vdisk resize --help' for more information.\n"; r.code != 1 || r.stderr != want {
			t.Errorf("%v: exit %d stderr %q", args, r.code, r.stderr)
		}
	}
	if r := mustRun(t, "resize", "--help"); !strings.Contains(r.stdout, "Usage:") {
		t.Errorf("resize --help: %q", r.stdout)
	}
	if r := mustRun(t, "--debug", "resize", "-f", "raw", img, "+0"); r.stdout != "Image resized.\n" {
		t.Errorf("--debug resize: %q", r.stdout)
	}
}

// TestResizeChain resizes the top of a chain (the test format).
func TestResizeChain(t *testing.T) {
	c := newTestChain(t)
	mustRun(t, "resize", c.top, "+1M")
	sameContent(t, c.top, append(bytes.Clone(c.wantTop), make([]byte, 1<<20)...))
	mustRun(t, "resize", "--shrink", c.top, "-2M")
	sameContent(t, c.top, c.wantTop[:chainSize-1<<20])
	r := vdiskRun(t, "resize", "--preallocation=full", c.top, "+1M")
	oneErrorLine(t, r, "vdisk resize")
	if !strings.Contains(r.stderr, "Unsupported preallocation mode: full") {
		t.Errorf("stderr %q", r.stderr)
	}
}

// TestCheckJSONOrder: the ImageCheck objects qemu-img 7.2 printed for
// qcow2 images (clean, with data, with leaks and corruptions, repaired).
func TestCheckJSONOrder(t *testing.T) {
	for _, tc := range []struct {
		res  driver.CheckResult
		name string
		want string
	}{
		{driver.CheckResult{ImageEndOffset: 262144, TotalClusters: 1024}, "x.qcow2", `{
    "image-end-offset": 262144,
    "total-clusters": 1024,
    "check-errors": 0,
    "filename": "x.qcow2",
    "format": "qcow2"
}`},
		{driver.CheckResult{ImageEndOffset: 1376256, TotalClusters: 1024, AllocatedClusters: 16}, "x.qcow2", `{
    "image-end-offset": 1376256,
    "total-clusters": 1024,
    "check-errors": 0,
    "allocated-clusters": 16,
    "filename": "x.qcow2",
    "format": "qcow2"
}`},
		{driver.CheckResult{ImageEndOffset: 393216, TotalClusters: 1024, Corruptions: 3, Leaks: 2}, "leak.qcow2", `{
    "image-end-offset": 393216,
    "total-clusters": 1024,
    "corruptions": 3,
    "check-errors": 0,
    "leaks": 2,
    "filename": "leak.qcow2",
    "format": "qcow2"
}`},
		{driver.CheckResult{ImageEndOffset: 262144, TotalClusters: 1024, Corruptions: 3, LeaksFixed: 2}, "leak3.qcow2", `{
    "image-end-offset": 262144,
    "total-clusters": 1024,
    "corruptions": 3,
    "check-errors": 0,
    "leaks-fixed": 2,
    "filename": "leak3.qcow2",
    "format": "qcow2"
}`},
	} {
		var b strings.Builder
		writeQJSON(&b, checkJSON(tc.name, "qcow2", &tc.res), 0)
		if b.String() != tc.want {
			t.Errorf("got:\n%s\nwant:\n%s", b.String(), tc.want)
		}
	}
	var h bytes.Buffer
	dumpHumanCheck(&h, &driver.CheckResult{ImageEndOffset: 393216, TotalClusters: 1024, Corruptions: 3, Leaks: 2})
	want := "\n3 errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n\n" +
		"2 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\nImage end offset: 393216\n"
	if h.String() != want {
		t.Errorf("human:\n%q\nwant\n%q", h.String(), want)
	}
	h.Reset()
	dumpHumanCheck(&h, &driver.CheckResult{ImageEndOffset: 1376256, TotalClusters: 1024, AllocatedClusters: 16})
	if want := "No errors were found on the image.\n16/1024 = 1.56% allocated, 0.00% fragmented, 0.00% compressed clusters\nImage end offset: 1376256\n"; h.String() != want {
		t.Errorf("human:\n%q\nwant\n%q", h.String(), want)
	}
}

func TestCheck(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "r.raw")
	sparseRaw(t, raw, 1<<20, nil)
	// Like qemu-img: exit 63 for a format without checks.
	r := vdiskRun(t, "check", "-f", "raw", raw)
	if r.code != 63 || r.stderr != "vdisk check: This image format does not support checks\n" || r.stdout != "" {
		t.Errorf("check raw: exit %d %q %q", r.code, r.stdout, r.stderr)
	}
	_, qcode := runQemu(t, "qemu-img", "check", "-f", "raw", raw)
	if qcode != r.code {
		t.Errorf("qemu-img check raw exits %d, vdisk %d", qcode, r.code)
	}

	img := filepath.Join(dir, "c.vdtest")
	mustRun(t, "create", "-q", "-f", "vdtest", img, "4M")
	writeImage(t, img, map[int64][]byte{0: pattern(1, 100), 1 << 20: pattern(2, 64<<10)}, nil)
	end := fileSize(t, img)
	r = mustRun(t, "check", img)
	if want := fmt.Sprintf("No errors were found on the image.\n2/64 = 3.12%% allocated, 0.00%% fragmented, 0.00%% compressed clusters\nImage end offset: %d\n", end); r.stdout != want {
		t.Errorf("human: %q, want %q", r.stdout, want)
	}
	r = mustRun(t, "check", "--output", "json", img)
	wantCheck := map[string]any{"image-end-offset": float64(end), "total-clusters": 64.0, "check-errors": 0.0,
		"allocated-clusters": 2.0, "filename": img, "format": "vdtest"}
	if got := parseJSON(t, r.stdout); !reflect.DeepEqual(got, wantCheck) {
		t.Errorf("check --output json: %v, want %v", got, wantCheck)
	}
	if r := mustRun(t, "check", "-q", img); r.stdout != "" {
		t.Errorf("-q: %q", r.stdout)
	}

	// Leaks only: exit 3; repaired by -r leaks.
	setVdtMeta(t, img, func(im *vdtImage) { im.meta.Leaks = 2 })
	r = vdiskRun(t, "check", img)
	if r.code != 3 || !strings.Contains(r.stdout, "\n2 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n") ||
		r.stderr != "Leaked cluster 1000 refcount=1 reference=0\nLeaked cluster 1001 refcount=1 reference=0\n" {
		t.Errorf("leaks: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	r = vdiskRun(t, "check", "-r", "leaks", "--output", "json", img)
	if r.code != 0 {
		t.Errorf("-r leaks: exit %d %s", r.code, r.stderr)
	}
	wantCheck["leaks-fixed"] = 2.0
	if got := parseJSON(t, r.stdout); !reflect.DeepEqual(got, wantCheck) {
		t.Errorf("check -r leaks --output json: %v, want %v", got, wantCheck)
	}

	// Corruptions: exit 2; -r leaks does not repair them, repair does.
	setVdtMeta(t, img, func(im *vdtImage) { im.alloc[40] = true; im.meta.Leaks = 1 })
	r = vdiskRun(t, "check", "-r", "leaks", img)
	if r.code != 2 || !strings.HasPrefix(r.stdout, "The following inconsistencies were found and repaired:\n\n    1 leaked clusters\n    0 corruptions\n\nDouble checking the fixed image now...\n\n1 errors were found on the image.\n") {
		t.Errorf("-r leaks with a corruption: exit %d\n%s", r.code, r.stdout)
	}
	r = vdiskRun(t, "repair", img)
	if r.code != 0 || !strings.HasPrefix(r.stdout, "The following inconsistencies were found and repaired:\n\n    0 leaked clusters\n    1 corruptions\n\nDouble checking the fixed image now...\nNo errors were found on the image.\n") {
		t.Errorf("repair: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	if r := vdiskRun(t, "repair", "--dry-run", img); r.code != 0 {
		t.Errorf("repair --dry-run of a clean image: exit %d", r.code)
	}

	// Check errors: the result, then "Check failed", exit 1.
	setVdtMeta(t, img, func(im *vdtImage) { im.meta.CheckErrors = 1 })
	r = vdiskRun(t, "check", img)
	if r.code != 1 || !strings.Contains(r.stdout, "\n1 internal errors have occurred during the check.\n") || r.stderr != "vdisk check: Check failed\n" {
		t.Errorf("check errors: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"check", "-r", "bogus", img}, "vdisk check: Unknown option value for -r (expecting 'leaks' or 'all'): bogus\nTry 'vdisk check --help' for more information.\n"},
		{[]string{"check", "--output", "xml", img}, "vdisk check: --output must be used with human or json as argument\nTry 'vdisk check --help' for more information.\n"},
	} {
		if r := vdiskRun(t, tc.args...); r.code != 1 || r.stderr != tc.want {
			t.Errorf("%v: exit %d stderr %q", tc.args, r.code, r.stderr)
		}
	}
}

// TestMeasureRaw: vdisk measure prints exactly what qemu-img measure
// prints for raw targets.
func TestMeasureRaw(t *testing.T) {
	dir := t.TempDir()
	ref := qemuSparseRaw(t, dir)
	odd := filepath.Join(dir, "odd.raw")
	sparseRaw(t, odd, 1000, map[int64][]byte{0: pattern(1, 10)})
	for _, args := range [][]string{
		{"--size", "1G"},
		{"--size", "1G", "--output", "json"},
		{"--size", "1000", "--output", "json"},
		{"--size", "1.5M"},
		{"-O", "raw", "--size", "64k", "-o", "preallocation=full", "--output=json"},
		{"-f", "raw", ref},
		{"-f", "raw", ref, "--output", "json"},
		{"-f", "raw", "-O", "raw", odd, "--output", "json"},
	} {
		r := mustRun(t, append([]string{"measure"}, args...)...)
		want := mustQemu(t, "qemu-img", append([]string{"measure"}, args...)...)
		if r.stdout != want {
			t.Errorf("measure %v:\n%s\nqemu-img:\n%s", args, r.stdout, want)
		}
	}

	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "vdisk measure: Either --size N or one filename must be specified.\nTry 'vdisk measure --help' for more information.\n"},
		{[]string{"--size", "1G", ref}, "vdisk measure: --size N cannot be used together with a filename.\nTry 'vdisk measure --help' for more information.\n"},
		{[]string{"--size", "abc"}, "vdisk measure: Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n"},
		{[]string{"--size", "1G", "-o", "bogus=1"}, ""},
		{[]string{"--size", "1G", "-O", "nosuch"}, ""},
		{[]string{"-f", "raw", filepath.Join(dir, "missing.raw")}, ""},
	} {
		r := vdiskRun(t, append([]string{"measure"}, tc.args...)...)
		if r.code != 1 {
			t.Errorf("%v: exit %d", tc.args, r.code)
		}
		if tc.want != "" && r.stderr != tc.want {
			t.Errorf("%v: stderr %q, want %q", tc.args, r.stderr, tc.want)
		}
		if tc.want == "" {
			oneErrorLine(t, r, "vdisk measure")
		}
	}
	if r := mustRun(t, "measure", "-O", "raw", "-o", "help"); !strings.HasPrefix(r.stdout, "Supported raw options:\n") {
		t.Errorf("-o help: %q", r.stdout)
	}
}

func TestCompact(t *testing.T) {
	c := newTestChain(t)
	// Clusters that equal the parent's content or read zeros over nothing.
	w := map[int64][]byte{
		1 << 20:                    c.wantMid[1<<20 : 1<<20+64<<10], // same as below
		chainSize - 3*vdtCluster:   make([]byte, vdtCluster),        // zeros over zeros
		chainSize - 128<<10 + 4096: c.wantMid[chainSize-128<<10+4096 : chainSize-128<<10+8192],
	}
	writeImage(t, c.top, w, nil)
	want := apply(c.wantTop, w, nil)
	before := len(vdtMetaOf(t, c.top).Alloc)
	r := mustRun(t, "compact", "-p", c.top)
	if r.stdout != "" || !strings.Contains(r.stderr, "(100.00/100%)") {
		t.Errorf("compact -p: %q %q", r.stdout, r.stderr)
	}
	after := len(vdtMetaOf(t, c.top).Alloc)
	if after != before-3 {
		t.Errorf("%d allocated clusters before, %d after; want 3 freed", before, after)
	}
	sameContent(t, c.top, want)

	// Raw compacts too, by the container's discards: written zeros
	// become holes.
	raw := filepath.Join(t.TempDir(), "z.raw")
	if err := os.WriteFile(raw, make([]byte, 4<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	rawBlocks := func() int64 {
		var st syscall.Stat_t
		if err := syscall.Stat(raw, &st); err != nil {
			t.Fatal(err)
		}
		return st.Blocks
	}
	if rawBlocks() == 0 {
		t.Fatal("the raw file was written sparse")
	}
	mustRun(t, "compact", "-f", "raw", raw)
	if b := rawBlocks(); b != 0 {
		t.Errorf("raw compact left %d blocks allocated", b)
	}
	// A fixed VHD cannot deallocate: refused.
	fixed := filepath.Join(t.TempDir(), "f.vhd")
	mustRun(t, "create", "-q", "-f", "vpc", "-o", "subformat=fixed", fixed, "4M")
	r = vdiskRun(t, "compact", "-f", "vpc", fixed)
	oneErrorLine(t, r, "vdisk compact")
	if !strings.Contains(r.stderr, "cannot be compacted") || !strings.Contains(r.stderr, "unsupported") {
		t.Errorf("fixed vpc: %q", r.stderr)
	}
}

var snapshotRow = regexp.MustCompile(`^(\d+) +(\S+) +0 B \d{4}-\d\d-\d\d \d\d:\d\d:\d\d 00:00:00\.000 +$`)

func TestSnapshotCmd(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "s.vdtest")
	mustRun(t, "create", "-q", "-f", "vdtest", img, "1M")
	if r := mustRun(t, "snapshot", "-l", img); r.stdout != "" {
		t.Errorf("no snapshots: %q", r.stdout)
	}
	writeImage(t, img, map[int64][]byte{0: pattern(1, 4096)}, nil)
	for _, args := range [][]string{{"-c", "s1"}, {"-c", "s2"}, {"-q", "-c", "s1"}} {
		if r := mustRun(t, append(append([]string{"snapshot"}, args...), img)...); r.stdout != "" || r.stderr != "" {
			t.Errorf("%v: %q %q", args, r.stdout, r.stderr)
		}
	}
	for _, args := range [][]string{{"-l"}, {}} {
		r := mustRun(t, append(append([]string{"snapshot"}, args...), img)...)
		lines := strings.Split(strings.TrimSuffix(r.stdout, "\n"), "\n")
		if len(lines) != 5 || lines[0] != "Snapshot list:" || lines[1] != "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT" {
			t.Fatalf("list:\n%s", r.stdout)
		}
		for i, want := range [][2]string{{"1", "s1"}, {"2", "s2"}, {"3", "s1"}} {
			m := snapshotRow.FindStringSubmatch(lines[2+i])
			if m == nil || m[1] != want[0] || m[2] != want[1] {
				t.Errorf("row %q, want id %s tag %s", lines[2+i], want[0], want[1])
			}
		}
	}
	// The same table as info.
	if r := mustRun(t, "info", img); !strings.Contains(r.stdout, mustRun(t, "snapshot", "-l", img).stdout) {
		t.Errorf("info shows another table:\n%s", r.stdout)
	}
	writeImage(t, img, map[int64][]byte{512 << 10: pattern(2, 4096)}, nil)
	mustRun(t, "snapshot", "-a", "s2", img)
	if n := len(vdtMetaOf(t, img).Alloc); n != 1 {
		t.Errorf("after -a: %d allocated clusters, want 1", n)
	}
	mustRun(t, "snapshot", "-d", "2", img)
	mustRun(t, "snapshot", "-d", "s1", img)
	if r := mustRun(t, "snapshot", "-l", img); strings.Count(r.stdout, "\n") != 3 {
		t.Errorf("after two deletes:\n%s", r.stdout)
	}

	raw := filepath.Join(dir, "r.raw")
	sparseRaw(t, raw, 1<<20, nil)
	if r := mustRun(t, "snapshot", "-f", "raw", "-l", raw); r.stdout != "" {
		t.Errorf("raw -l: %q", r.stdout)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"-d", "nosuch", img}, "vdisk snapshot: Could not delete snapshot 'nosuch': " + img + ": snapshot not found\n"},
		{[]string{"-a", "nosuch", img}, "vdisk snapshot: Could not apply snapshot 'nosuch': " + img + ": snapshot not found\n"},
		{[]string{"-f", "raw", "-c", "a", raw}, "vdisk snapshot: " + raw + ": Could not create snapshot 'a': format raw does not support internal snapshots (unsupported)\n"},
		{[]string{"-l", "-c", "x", img}, "vdisk snapshot: Cannot mix '-l', '-a', '-c', '-d'\nTry 'vdisk snapshot --help' for more information.\n"},
	} {
		if r := vdiskRun(t, append([]string{"snapshot"}, tc.args...)...); r.code != 1 || r.stderr != tc.want {
			t.Errorf("%v: exit %d, stderr %q, want %q", tc.args, r.code, r.stderr, tc.want)
		}
	}
}

func TestSetUUIDGeometryComment(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "m.vdtest")
	mustRun(t, "create", "-q", "-f", "vdtest", img, "1M")
	old := vdtMetaOf(t, img).UUID
	r := mustRun(t, "setuuid", img)
	m := vdtMetaOf(t, img)
	if m.UUID == old || !uuidRE.MatchString(m.UUID) {
		t.Errorf("setuuid: UUID %q (was %q)", m.UUID, old)
	}
	if want := "Old image UUID:  " + old + "\nOld parent UUID: " + nullUUID + "\nNew image UUID:  " + m.UUID + "\n"; r.stdout != want {
		t.Errorf("stdout %q, want %q", r.stdout, want)
	}
	const u1, u2 = "01234567-89ab-cdef-0123-456789abcdef", "11111111-2222-3333-4444-555555555555"
	r = mustRun(t, "setuuid", "--parent-uuid", u1, "--modification-uuid", strings.ToUpper(u2), img)
	m = vdtMetaOf(t, img)
	if m.ParentUUID != u1 || m.ModUUID != u2 {
		t.Errorf("parent %q mod %q", m.ParentUUID, m.ModUUID)
	}
	if want := "Old image UUID:  " + m.UUID + "\nOld parent UUID: " + nullUUID + "\nOld modification UUID: " + nullUUID +
		"\nNew parent UUID: " + u1 + "\nNew modification UUID: " + u2 + "\n"; r.stdout != want {
		t.Errorf("stdout %q, want %q", r.stdout, want)
	}
	if r := mustRun(t, "setuuid", "-q", "--parent-modification-uuid", u2, img); r.stdout != "" || vdtMetaOf(t, img).ParentModUUID != u2 {
		t.Errorf("-q: %q", r.stdout)
	}

	if r := mustRun(t, "geometry", img); r.stdout != "PCHS: none\nLCHS: none\n" {
		t.Errorf("geometry: %q", r.stdout)
	}
	mustRun(t, "geometry", "--pchs", "1024/16/63", "--lchs", "64/255/63", img)
	if r := mustRun(t, "geometry", img); r.stdout != "PCHS: 1024/16/63\nLCHS: 64/255/63\n" {
		t.Errorf("geometry: %q", r.stdout)
	}

	if r := mustRun(t, "comment", img); r.stdout != "" {
		t.Errorf("comment: %q", r.stdout)
	}
	mustRun(t, "comment", "--set", "hello, world", img)
	if r := mustRun(t, "comment", img); r.stdout != "hello, world\n" {
		t.Errorf("comment: %q", r.stdout)
	}
	mustRun(t, "comment", "--set", "", img)
	if r := mustRun(t, "comment", img); r.stdout != "" {
		t.Errorf("cleared comment: %q", r.stdout)
	}

	raw := filepath.Join(dir, "r.raw")
	sparseRaw(t, raw, 1<<20, nil)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"setuuid", "-f", "raw", raw}, "does not record UUIDs"},
		{[]string{"geometry", "-f", "raw", raw}, "does not record a disk geometry"},
		{[]string{"geometry", "-f", "raw", "--lchs", "1/1/1", raw}, "does not record a disk geometry"},
		{[]string{"comment", "-f", "raw", raw}, "does not record a comment"},
		{[]string{"comment", "-f", "raw", "--set", "x", raw}, "does not record a comment"},
		{[]string{"setuuid", "--uuid", "nope", img}, `invalid UUID "nope" for --uuid`},
		{[]string{"geometry", "--pchs", "1/2", img}, `invalid geometry "1/2" for --pchs`},
		{[]string{"geometry", "--pchs", "100/17/63", img}, "at most 16 heads"},
	} {
		r := vdiskRun(t, tc.args...)
		stderr := strings.TrimSuffix(r.stderr, "Try 'vdisk "+tc.args[0]+" --help' for more information.\n")
		oneErrorLine(t, result{r.stdout, stderr, r.code}, "vdisk "+tc.args[0])
		if !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: %q lacks %q", tc.args, stderr, tc.want)
		}
	}
}

func TestAmend(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "a.vdtest")
	mustRun(t, "create", "-q", "-f", "vdtest", "-o", "label=old", img, "1M")
	if r := mustRun(t, "amend", "-o", "label=new", img); r.stdout != "" || r.stderr != "" {
		t.Errorf("amend: %q %q", r.stdout, r.stderr)
	}
	if m := vdtMetaOf(t, img); m.Label != "new" {
		t.Errorf("label %q", m.Label)
	}
	raw := filepath.Join(dir, "r.raw")
	sparseRaw(t, raw, 1<<20, nil)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"amend", "-f", "raw", "-o", "preallocation=full", raw}, "vdisk amend: " + raw + ": Format driver 'raw' does not support option amendment (unsupported)\n"},
		{[]string{"amend", img}, "vdisk amend: Must specify options (-o)\nTry 'vdisk amend --help' for more information.\n"},
		{[]string{"amend", "-o", "bogus=1", img}, "vdisk amend: " + img + ": amend: Invalid parameter 'bogus' (invalid option)\n"},
	} {
		if r := vdiskRun(t, tc.args...); r.code != 1 || r.stderr != tc.want {
			t.Errorf("%v: exit %d stderr %q, want %q", tc.args, r.code, r.stderr, tc.want)
		}
	}
	if r := mustRun(t, "amend", "-o", "help", img); !strings.HasPrefix(r.stdout, "Supported vdtest options:\n") {
		t.Errorf("-o help: %q", r.stdout)
	}
}

// TestDD: vdisk dd writes what qemu-img dd writes (and dd(1) for count
// with skip).
func TestDD(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	data := make([]byte, 3000000)
	for i := range data {
		data[i] = byte(i*7 + i/4096)
	}
	copy(data[1<<20:], make([]byte, 200<<10)) // a zero run inside data
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	padded := append(bytes.Clone(data), make([]byte, 3000320-3000000)...)
	for i, tc := range []struct {
		ops  []string
		want []byte // nil: what qemu-img dd writes
	}{
		{nil, nil},
		{[]string{"bs=64k", "skip=2"}, nil},
		{[]string{"bs=1k", "count=5"}, nil},
		{[]string{"bs=1000", "count=2000"}, nil},
		{[]string{"bs=513"}, nil},
		{[]string{"bs=4k", "count=1k"}, nil},
		{[]string{"bs=64k", "count=3", "skip=2"}, padded[2*64<<10 : 5*64<<10]},
		{[]string{"bs=1M", "count=10", "skip=2"}, padded[2<<20:]},
	} {
		t.Run(strings.Join(tc.ops, " "), func(t *testing.T) {
			out := filepath.Join(dir, fmt.Sprintf("v%d.raw", i))
			r := mustRun(t, append(append([]string{"dd", "-f", "raw", "-O", "raw"}, tc.ops...), "if="+src, "of="+out)...)
			if r.stdout != "" || r.stderr != "" {
				t.Errorf("output %q %q", r.stdout, r.stderr)
			}
			got, err := os.ReadFile(out)
			if err != nil {
				t.Fatal(err)
			}
			want := tc.want
			if want == nil {
				q := filepath.Join(dir, fmt.Sprintf("q%d.raw", i))
				mustQemu(t, "qemu-img", append(append([]string{"dd", "-f", "raw", "-O", "raw"}, tc.ops...), "if="+src, "of="+q)...)
				if want, err = os.ReadFile(q); err != nil {
					t.Fatal(err)
				}
			}
			if !bytes.Equal(got, want) {
				t.Errorf("output differs: %d bytes, want %d", len(got), len(want))
			}
		})
	}
	// Into a chain format, from a chain.
	c := newTestChain(t)
	out := filepath.Join(dir, "chain.vdtest")
	mustRun(t, "dd", "-O", "vdtest", "bs=1M", "skip=1", "count=2", "if="+c.top, "of="+out)
	sameContent(t, out, c.wantTop[1<<20:3<<20])

	// Skipping past the end: a warning and an empty image, as qemu-img.
	empty := filepath.Join(dir, "empty.raw")
	r := mustRun(t, "dd", "-f", "raw", "skip=100000", "if="+src, "of="+empty)
	if r.stderr != "vdisk dd: "+src+": cannot skip to specified offset\n" || fileSize(t, empty) != 0 {
		t.Errorf("skip past the end: %q, size %d", r.stderr, fileSize(t, empty))
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"if=" + src}, "vdisk dd: Must specify both input and output files\n"},
		{[]string{"bs=0", "if=" + src, "of=" + out}, "vdisk dd: Invalid bs specified. Must be between 1 and 2147483647.\n"},
		{[]string{"foo=1", "if=" + src, "of=" + out}, "vdisk dd: unrecognized operand foo\n"},
		{[]string{"bar", "if=" + src, "of=" + out}, "vdisk dd: unrecognized operand bar\n"},
		{[]string{"count=-1", "if=" + src, "of=" + out}, "vdisk dd: Invalid count specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n"},
		{[]string{"-f", "raw", "if=" + src, "of=" + src}, "vdisk dd: the input and the output are the same file (" + src + ")\n"},
		{[]string{"-O", "nosuch", "if=" + src, "of=" + filepath.Join(dir, "n.raw")}, ""},
		{[]string{"-f", "raw", "if=" + filepath.Join(dir, "missing"), "of=" + filepath.Join(dir, "n.raw")}, ""},
	} {
		r := vdiskRun(t, append([]string{"dd"}, tc.args...)...)
		if tc.want != "" && r.stderr != tc.want {
			t.Errorf("%v: stderr %q, want %q", tc.args, r.stderr, tc.want)
		}
		oneErrorLine(t, r, "vdisk dd")
		if exists(filepath.Join(dir, "n.raw")) {
			t.Errorf("%v: output left behind", tc.args)
		}
	}
}

var benchRE = regexp.MustCompile(`^Sending (\d+) (read|write) requests, (\d+) bytes each, (\d+) in parallel \(starting at offset (\d+), step size (\d+)\)\n(Sending flush every \d+ requests\n)?Run completed in \d+\.\d{3} seconds\.\n$`)

func TestBench(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "b.raw")
	sparseRaw(t, img, 16<<20, nil)
	for _, args := range [][]string{
		{"-f", "raw", "-c", "2000"},
		{"-f", "raw", "-c", "500", "-d", "8", "-s", "64k", "-S", "1M", "-t", "none"},
		{"-f", "raw", "-c", "0"},
		{"-f", "raw", "-q", "-c", "100", "-o", "16M", "-s", "0"},
	} {
		r := mustRun(t, append(append([]string{"bench"}, args...), img)...)
		if !benchRE.MatchString(r.stdout) {
			t.Errorf("%v: %q", args, r.stdout)
		}
	}
	r := mustRun(t, "bench", "-f", "raw", "-w", "-c", "100", "-d", "4", "-s", "8k", "-S", "16k", "-o", "4096", "--pattern=7", "--flush-interval=10", img)
	if m := benchRE.FindStringSubmatch(r.stdout); m == nil || m[2] != "write" || m[7] != "Sending flush every 10 requests\n" ||
		!strings.HasPrefix(r.stdout, "Sending 100 write requests, 8192 bytes each, 4 in parallel (starting at offset 4096, step size 16384)\n") {
		t.Errorf("write bench: %q", r.stdout)
	}
	// What the writes left: 8 KiB of 7 every 16 KiB from 4096 on.
	got := content(t, img)
	for i := int64(0); i < 100; i++ {
		off := 4096 + i*16<<10
		if !bytes.Equal(got[off:off+8192], pattern(7, 8192)) || !bytes.Equal(got[off+8192:off+16384], make([]byte, 8192)) {
			t.Fatalf("request %d at %d did not write the pattern", i, off)
		}
	}
	mustRun(t, "bench", "-w", "--no-drain", "--flush-interval=64", "-t", "writethrough", "-c", "300", img)
	mustRun(t, "bench", "-w", "-t", "unsafe", "-c", "300", "-d", "1", img)
	c := newTestChain(t)
	mustRun(t, "bench", "-c", "1000", "-d", "16", "-s", "4096", "-S", "12288", c.top)
	mustRun(t, "bench", "-w", "-c", "200", "-d", "16", "-s", "5000", c.top)

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--flush-interval=10"}, "vdisk bench: --flush-interval is only available in write tests\n"},
		{[]string{"-w", "--flush-interval=2", "-d", "4"}, "vdisk bench: Flush interval can't be smaller than depth\n"},
		{[]string{"-t", "bogus"}, "vdisk bench: Invalid cache mode\n"},
		{[]string{"-w", "--pattern=300"}, "vdisk bench: Invalid pattern byte specified\n"},
		{[]string{"-d", "0"}, "vdisk bench: Invalid queue depth specified\n"},
		{[]string{"-c", "-1"}, "vdisk bench: Invalid request count specified\n"},
		{[]string{"-s", "3G"}, "vdisk bench: Invalid buffer size specified. Must be between 0 and 2147483647.\n"},
	} {
		r := vdiskRun(t, append(append([]string{"bench", "-f", "raw"}, tc.args...), img)...)
		if r.code != 1 || r.stderr != tc.want || r.stdout != "" {
			t.Errorf("%v: exit %d stdout %q stderr %q, want %q", tc.args, r.code, r.stdout, r.stderr, tc.want)
		}
	}
	r = vdiskRun(t, "bench", "-f", "raw", "-c", "10", "-o", "100M", img)
	if r.code != 1 || !strings.HasPrefix(r.stderr, "vdisk bench: Failed request: Input/output error") || !strings.HasPrefix(r.stdout, "Sending 10 read requests") {
		t.Errorf("past the end: exit %d %q %q", r.code, r.stdout, r.stderr)
	}
}

// TestConvertIncremental: convert -B onto an image of the source's chain
// copies only the layers above it.
func TestConvertIncremental(t *testing.T) {
	c := newTestChain(t)
	full := filepath.Join(c.dir, "full.vdtest")
	mustRun(t, "convert", "-O", "vdtest", "-B", "base.raw", "-F", "raw", c.top, full)
	inc := filepath.Join(c.dir, "inc.vdtest")
	mustRun(t, "convert", "-O", "vdtest", "-B", "mid.vdtest", "-F", "vdtest", c.top, inc)
	sameContent(t, inc, c.wantTop)
	sameContent(t, full, c.wantTop)
	// The incremental copy holds exactly the top's clusters.
	topAlloc, incAlloc := vdtMetaOf(t, c.top).Alloc, vdtMetaOf(t, inc).Alloc
	if fmt.Sprint(topAlloc) != fmt.Sprint(incAlloc) {
		t.Errorf("incremental copy holds clusters %v, the top %v", incAlloc, topAlloc)
	}
	if n := len(vdtMetaOf(t, full).Alloc); n <= len(topAlloc) {
		t.Errorf("the copy onto the base holds %d clusters, no more than the top's %d", n, len(topAlloc))
	}
	// A backing file outside the chain: the whole content is copied.
	other := filepath.Join(c.dir, "other.raw")
	sparseRaw(t, other, chainSize, map[int64][]byte{0: pattern(0x33, 1<<20)})
	out := filepath.Join(c.dir, "out.vdtest")
	mustRun(t, "convert", "-O", "vdtest", "-B", "other.raw", "-F", "raw", c.top, out)
	sameContent(t, out, c.wantTop)
}

// TestOpsBadInput: the new commands' runtime errors are one line.
func TestOpsBadInput(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.vdtest")
	img := filepath.Join(dir, "ok.raw")
	sparseRaw(t, img, 1<<20, nil)
	for _, args := range [][]string{
		{"commit", missing},
		{"commit", "-f", "nosuch", img},
		{"merge", "--from", "0", "--to", "1", missing},
		{"rebase", "-b", "", missing},
		{"resize", missing, "1M"},
		{"resize", "-f", "nosuch", img, "1M"},
		{"check", missing},
		{"repair", missing},
		{"measure", "-f", "raw", missing},
		{"compact", missing},
		{"snapshot", "-l", missing},
		{"snapshot", "-c", "x", missing},
		{"setuuid", missing},
		{"geometry", missing},
		{"comment", missing},
		{"amend", "-o", "a=b", missing},
		{"dd", "if=" + missing, "of=" + filepath.Join(dir, "o.raw")},
		{"bench", missing},
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			r := vdiskRun(t, args...)
			oneErrorLine(t, r, "vdisk "+args[0])
			if r.code != 1 {
				t.Errorf("exit %d", r.code)
			}
			if r.stdout != "" {
				t.Errorf("stdout %q", r.stdout)
			}
		})
	}
	for _, args := range [][]string{
		{"commit"}, {"merge", "--from", "0", "--to", "1"}, {"rebase", "-b", "x"}, {"check"}, {"repair"},
		{"compact"}, {"snapshot"}, {"setuuid"}, {"geometry"}, {"comment"}, {"amend", "-o", "a=b"}, {"bench"},
		{"measure", "a", "b"},
	} {
		r := vdiskRun(t, args...)
		lines := strings.Split(strings.TrimSuffix(r.stderr, "\n"), "\n")
		if r.code != 1 || len(lines) != 2 || lines[1] != "Try 'vdisk "+args[0]+" --help' for more information." {
			t.Errorf("%v: exit %d stderr %q", args, r.code, r.stderr)
		}
	}
}
