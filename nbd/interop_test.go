package nbd

import (
	"bytes"
	"context"
	"encoding/json"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	_ "github.com/vdisk/vdisk/format/all"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// Interoperability with the real clients: libnbd's nbdinfo and nbdcopy,
// qemu-img and qemu-io (nbd+unix:// URIs) and fio's nbd engine. The tools
// are required (./test.sh installs them).

func tool(t *testing.T, name string, args ...string) string {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Fatalf("%s is required by the interoperability tests: run ./test.sh, which installs it", name)
	}
	cmd := exec.Command(name, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\nstdout: %s\nstderr: %s", name, strings.Join(args, " "), err, out.String(), errb.String())
	}
	return out.String()
}

// sampleImage makes a sparse raw image with data runs of several sizes.
func sampleImage(t *testing.T, dir string, size int64) (string, []byte) {
	r := rand.New(rand.NewPCG(5, 6))
	writes := map[int64][]byte{
		0:              randBytes(r, 4096),
		1 << 20:        randBytes(r, 64<<10),
		3<<20 + 4096:   randBytes(r, 1<<20),
		size/2 - 8192:  bytes.Repeat([]byte{0x5a}, 16384),
		size - 64<<10:  randBytes(r, 64<<10),
		7<<20 + 123456: randBytes(r, 1000),
	}
	p := newRaw(t, dir, size, writes)
	return p, fileBytes(t, p)
}

type nbdinfoExport struct {
	Name         string   `json:"export-name"`
	Size         int64    `json:"export-size"`
	Contexts     []string `json:"contexts"`
	ReadOnly     bool     `json:"is_read_only"`
	CanMultiConn bool     `json:"can_multi_conn"`
	CanTrim      bool     `json:"can_trim"`
	CanZero      bool     `json:"can_zero"`
	CanFastZero  bool     `json:"can_fast_zero"`
	CanFlush     bool     `json:"can_flush"`
	CanFUA       bool     `json:"can_fua"`
	CanCache     bool     `json:"can_cache"`
	BlockMin     int64    `json:"block_size_minimum"`
	BlockPref    int64    `json:"block_size_preferred"`
	BlockMax     int64    `json:"block_size_maximum"`
}

type nbdinfoMapEntry struct {
	Offset int64  `json:"offset"`
	Length int64  `json:"length"`
	Type   uint32 `json:"type"`
}

func nbdinfoMap(t *testing.T, uri, ctx string) []BlockExtent {
	t.Helper()
	var entries []nbdinfoMapEntry
	out := tool(t, "nbdinfo", "--map="+ctx, "--json", uri)
	if err := json.Unmarshal([]byte(out), &entries); err != nil {
		t.Fatalf("nbdinfo --map --json: %v\n%s", err, out)
	}
	var list []BlockExtent
	var next int64
	for _, e := range entries {
		if e.Offset != next {
			t.Fatalf("nbdinfo map not contiguous at %d: %s", next, out)
		}
		list = mergeExt(list, BlockExtent{uint32(e.Length), e.Type})
		next += e.Length
	}
	return list
}

func TestNbdinfo(t *testing.T) {
	const size = 16 << 20
	p, _ := sampleImage(t, t.TempDir(), size)
	d := openDisk(t, p, false)
	defer d.Close()
	ro := openDisk(t, newRaw(t, t.TempDir(), 1<<20, nil), true)
	defer ro.Close()
	ts := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: d}, {Name: "ro", Disk: ro, Description: "a read-only one"}}})

	var info struct {
		Protocol   string          `json:"protocol"`
		Structured bool            `json:"structured"`
		Exports    []nbdinfoExport `json:"exports"`
	}
	out := tool(t, "nbdinfo", "--json", ts.uri(""))
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	e := info.Exports[0]
	if info.Protocol != "newstyle-fixed" || !info.Structured || e.Size != size || e.ReadOnly || !e.CanMultiConn ||
		!e.CanTrim || !e.CanZero || !e.CanFastZero || !e.CanFlush || !e.CanFUA || !e.CanCache ||
		e.BlockMin != 1 || e.BlockPref != 4096 || e.BlockMax != 32<<20 {
		t.Errorf("nbdinfo --json:\n%s", out)
	}
	if strings.Join(e.Contexts, ",") != "base:allocation,qemu:allocation-depth" {
		t.Errorf("contexts %v", e.Contexts)
	}
	out = tool(t, "nbdinfo", "--json", ts.uri("ro"))
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatal(err)
	}
	if e := info.Exports[0]; !e.ReadOnly || e.CanTrim || e.CanZero || e.Size != 1<<20 {
		t.Errorf("read-only export:\n%s", out)
	}
	out = tool(t, "nbdinfo", "--list", "--json", ts.uri(""))
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatal(err)
	}
	if len(info.Exports) != 2 || info.Exports[0].Name != "" || info.Exports[1].Name != "ro" {
		t.Errorf("nbdinfo --list:\n%s", out)
	}
	if out := tool(t, "nbdinfo", "--size", ts.uri("")); strings.TrimSpace(out) != "16777216" {
		t.Errorf("nbdinfo --size: %s", out)
	}

	wantBase, wantDepth := expectedStatus(t, d)
	if got := nbdinfoMap(t, ts.uri(""), ContextBaseAllocation); !equalExt(got, wantBase) {
		t.Errorf("nbdinfo --map\n got %v\nwant %v", got, wantBase)
	}
	if got := nbdinfoMap(t, ts.uri(""), ContextAllocationDepth); !equalExt(got, wantDepth) {
		t.Errorf("nbdinfo --map=qemu:allocation-depth\n got %v\nwant %v", got, wantDepth)
	}
	if len(wantBase) < 10 {
		t.Errorf("the sample image should have many runs: %v", wantBase)
	}
}

func TestNbdcopy(t *testing.T) {
	const size = 16 << 20
	dir := t.TempDir()
	src, want := sampleImage(t, dir, size)
	d := openDisk(t, src, true)
	defer d.Close()
	// The destination starts full of garbage: nbdcopy must zero the holes.
	dstDir := t.TempDir()
	dst := newRaw(t, dstDir, size, map[int64][]byte{0: bytes.Repeat([]byte{0xee}, size)})
	dd := openDisk(t, dst, false)
	defer dd.Close()
	ts := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: d}, {Name: "dst", Disk: dd}}})

	// From the server to a file.
	out := filepath.Join(dir, "out.raw")
	tool(t, "nbdcopy", ts.uri(""), out)
	if !bytes.Equal(fileBytes(t, out), want) {
		t.Error("nbdcopy from the server: content differs")
	}
	// From a file to the server, with several connections (multi-conn).
	tool(t, "nbdcopy", "--connections=4", "--requests=16", src, ts.uri("dst"))
	if err := dd.Flush(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(fileBytes(t, dst), want) {
		t.Error("nbdcopy to the server: content differs")
	}
	// Server to server through the same process.
	tool(t, "nbdcopy", "--flush", ts.uri(""), ts.uri("dst"))
	if !bytes.Equal(fileBytes(t, dst), want) {
		t.Error("nbdcopy server to server: content differs")
	}
}

func TestQemuImg(t *testing.T) {
	const size = 16 << 20
	dir := t.TempDir()
	src, _ := sampleImage(t, dir, size)
	d := openDisk(t, src, true)
	defer d.Close()

	// A chain qemu cannot read itself (testdiff over raw): the server
	// flattens it; compare against the Disk's own content.
	cdir := t.TempDir()
	newRaw(t, cdir, size, map[int64][]byte{0: bytes.Repeat([]byte{3}, 2<<20)})
	chain, err := vdisk.Create(context.Background(), filepath.Join(cdir, "top.tdf"), &vdisk.CreateOptions{Format: "testdiff", Backing: "disk.raw", BackingFormat: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	defer chain.Close()
	if _, err := chain.WriteAt(bytes.Repeat([]byte{8}, 100000), 1<<20+5); err != nil {
		t.Fatal(err)
	}
	ts := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: d}, {Name: "chain", Disk: chain}}})

	out := tool(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, ts.uri(""))
	if !strings.Contains(out, "Images are identical") {
		t.Errorf("qemu-img compare: %s", out)
	}
	flat := filepath.Join(dir, "flat.raw")
	tool(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", ts.uri("chain"), flat)
	want := make([]byte, size)
	if _, err := chain.ReadAt(want, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(fileBytes(t, flat), want) {
		t.Error("qemu-img convert of the chain differs from the chain's content")
	}
	// qemu-img map over NBD sees the same allocation.
	out = tool(t, "qemu-img", "map", "--output=json", "-f", "raw", ts.uri(""))
	if !strings.Contains(out, `"data": false`) || !strings.Contains(out, `"data": true`) {
		t.Errorf("qemu-img map over NBD shows no holes or no data:\n%s", out)
	}
}

// TestQemuIo: the same qemu-io commands against the server and against a
// copy of the image (the model) leave identical images.
func TestQemuIo(t *testing.T) {
	const size = 16 << 20
	dir := t.TempDir()
	src, orig := sampleImage(t, dir, size)
	model := filepath.Join(dir, "model.raw")
	if err := os.WriteFile(model, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	cmds := []string{
		"write -P 0xab 0 64k",
		"write -P 0x01 100 1000",
		"write -z 1M 128k",
		"write -z -u 3M 512k",
		"discard 5M 64k",
		"write -P 0xcd 8M 4M",
		"aio_write -P 0x77 13M 64k",
		"aio_write -P 0x78 14M 3000",
		"aio_flush",
		"write -P 0x99 -f 15M 8k",
		"write -z -n 6M 64k",
		"flush",
		"read -P 0xab 4096 60k",
		"read -P 0xcd 9M 1M",
	}
	var args []string
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	tool(t, "qemu-io", append([]string{"-f", "raw", model}, args...)...)

	d := openDisk(t, src, false)
	ts := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: d}}})
	tool(t, "qemu-io", append([]string{"-f", "raw", ts.uri("")}, args...)...)
	out := tool(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", model, ts.uri(""))
	if !strings.Contains(out, "Images are identical") {
		t.Errorf("qemu-img compare (over NBD): %s", out)
	}
	if err := ts.stop(); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	out = tool(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", model, src)
	if !strings.Contains(out, "Images are identical") {
		t.Errorf("qemu-img compare (files): %s", out)
	}
}

// TestFioVerify runs fio's nbd engine with a random read/write verify job.
func TestFioVerify(t *testing.T) {
	if _, err := exec.LookPath("fio"); err != nil {
		t.Fatal("fio is required: run ./test.sh")
	}
	if out, _ := exec.Command("fio", "--enghelp=nbd").CombinedOutput(); !strings.Contains(string(out), "uri") {
		t.Fatalf("this fio has no nbd engine:\n%s", out)
	}
	p := newRaw(t, t.TempDir(), 32<<20, nil)
	d := openDisk(t, p, false)
	defer d.Close()
	ts := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: d}}})
	for _, job := range [][]string{
		{"--rw=randrw", "--bs=4k", "--iodepth=16", "--size=16M"},
		{"--rw=randwrite", "--bsrange=512-256k", "--iodepth=8", "--size=24M", "--offset=8M"},
	} {
		args := append([]string{"--name=verify", "--ioengine=nbd", "--uri=" + ts.uri(""),
			"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=json"}, job...)
		out := tool(t, "fio", args...)
		i := strings.Index(out, "{")
		var res struct {
			Jobs []struct {
				Error int `json:"error"`
				Read  struct {
					IOBytes int64 `json:"io_bytes"`
				} `json:"read"`
				Write struct {
					IOBytes int64 `json:"io_bytes"`
				} `json:"write"`
			} `json:"jobs"`
		}
		if i < 0 || json.Unmarshal([]byte(out[i:]), &res) != nil || len(res.Jobs) != 1 {
			t.Fatalf("fio output:\n%s", out)
		}
		j := res.Jobs[0]
		if j.Error != 0 || j.Write.IOBytes == 0 || j.Read.IOBytes == 0 {
			t.Errorf("fio %v: error %d, read %d, written %d", job, j.Error, j.Read.IOBytes, j.Write.IOBytes)
		}
	}
}

// TestFormats serves images of every image format qemu also knows (made by
// qemu-img and qemu-io): qemu-img compare says the export is identical to
// the image, qemu-io writes through the server land as the same writes made
// by qemu-io on a copy (the model), and the image checks clean afterwards.
func TestFormats(t *testing.T) {
	qemuNames := map[string]bool{"qcow2": true, "vdi": true, "vpc": true, "vhdx": true, "vmdk": true, "qed": true, "parallels": true}
	var names []string
	for _, f := range driver.Formats() {
		if qemuNames[f.Name] && f.Caps&driver.CapWrite != 0 {
			names = append(names, f.Name)
		}
	}
	if len(names) == 0 {
		t.Fatal("no image format besides raw is registered")
	}
	setup := []string{"-c", "write -P 0x5a 1M 64k", "-c", "write -P 0x11 5M 1M", "-c", "write -z 9M 64k", "-c", "write -P 0x22 15M 4k"}
	writes := []string{"-c", "write -P 0xab 0 64k", "-c", "write -P 0x01 100 1000", "-c", "write -z 5M 128k",
		"-c", "write -P 0xcd 8M 2M", "-c", "aio_write -P 0x77 13M 64k", "-c", "aio_flush", "-c", "flush"}
	for _, name := range names {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "img."+name)
			model := filepath.Join(dir, "model."+name)
			tool(t, "qemu-img", "create", "-q", "-f", name, img, "16M")
			tool(t, "qemu-io", append([]string{"-f", name, img}, setup...)...)
			tool(t, "qemu-img", "create", "-q", "-f", name, model, "16M")
			tool(t, "qemu-io", append(append([]string{"-f", name, model}, setup...), writes...)...)

			d, err := vdisk.Open(context.Background(), img, &vdisk.OpenOptions{Format: name})
			if err != nil {
				t.Fatal(err)
			}
			ts := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: d}}})
			out := tool(t, "qemu-img", "compare", "-f", name, "-F", "raw", "-U", img, ts.uri(""))
			if !strings.Contains(out, "Images are identical") {
				t.Errorf("compare before writes: %s", out)
			}
			if got, want := nbdinfoMap(t, ts.uri(""), ContextBaseAllocation), fst(expectedStatus(t, d)); !equalExt(got, want) {
				t.Errorf("nbdinfo --map\n got %v\nwant %v", got, want)
			}
			tool(t, "qemu-io", append([]string{"-f", "raw", ts.uri("")}, writes...)...)
			out = tool(t, "qemu-img", "compare", "-f", name, "-F", "raw", model, ts.uri(""))
			if !strings.Contains(out, "Images are identical") {
				t.Errorf("compare after writes (over NBD): %s", out)
			}
			if err := ts.stop(); err != nil {
				t.Fatal(err)
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			// Exit 63: qemu cannot check this format (vpc).
			if out, code, err := qemutest.RunCode("qemu-img", "check", "-f", name, img); err != nil || (code != 0 && code != 63) {
				t.Errorf("qemu-img check after serving: exit %d %v\n%s", code, err, out)
			}
			out = tool(t, "qemu-img", "compare", "-f", name, "-F", name, model, img)
			if !strings.Contains(out, "Images are identical") {
				t.Errorf("compare after writes (files): %s", out)
			}
		})
	}
}

func fst[A, B any](a A, _ B) A { return a }

// TestStatusMatchesQemuNbd serves a qcow2 chain with vdisk and with
// qemu-nbd -A and compares what nbdinfo --map reports for both contexts.
func TestStatusMatchesQemuNbd(t *testing.T) {
	if _, err := driver.Lookup("qcow2"); err != nil {
		t.Fatal("qcow2 is not registered")
	}
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	top := filepath.Join(dir, "top.qcow2")
	tool(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "16M")
	tool(t, "qemu-io", "-f", "qcow2", base, "-c", "write -P 1 0 1M", "-c", "write -P 2 4M 2M", "-c", "write -z 8M 1M", "-c", "write -P 3 12M 64k")
	tool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
	tool(t, "qemu-io", "-f", "qcow2", top, "-c", "write -P 4 512k 1M", "-c", "write -z 4M 64k", "-c", "write -z -u 12M 64k", "-c", "write -P 5 15M 128k")

	d, err := vdisk.Open(context.Background(), top, &vdisk.OpenOptions{ReadOnly: true, AllowUnsafeBacking: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ts := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: d}}})

	qsock := filepath.Join(sockDir(t), "q")
	q := exec.Command("qemu-nbd", "-r", "-A", "-t", "-k", qsock, "-f", "qcow2", top)
	if err := q.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		q.Process.Kill()
		q.Wait()
	}()
	for i := 0; ; i++ {
		if _, err := os.Stat(qsock); err == nil {
			break
		}
		if i > 500 {
			t.Fatal("qemu-nbd did not start")
		}
		time.Sleep(10 * time.Millisecond)
	}
	quri := "nbd+unix:///?socket=" + qsock
	for _, ctx := range []string{ContextBaseAllocation, ContextAllocationDepth} {
		ours, theirs := nbdinfoMap(t, ts.uri(""), ctx), nbdinfoMap(t, quri, ctx)
		if !equalExt(ours, theirs) {
			t.Errorf("%s differs from qemu-nbd's\nvdisk:    %v\nqemu-nbd: %v", ctx, ours, theirs)
		}
	}
	out := tool(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", ts.uri(""), quri)
	if !strings.Contains(out, "Images are identical") {
		t.Errorf("content differs from qemu-nbd's: %s", out)
	}
}
