package iscsistore_test

import (
	"context"
	"errors"
	"io"
	"os/exec"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/iscsi/iscsitest"
	"github.com/vdisk/vdisk/storage/iscsistore"
)

// qemu-io writes through its own initiator; vdisk reads the same bytes, and
// the other way round, at unaligned offsets.
func TestInteropQemu(t *testing.T) {
	tg, file := newTarget(t, 32<<20)
	url := tg.URL(1)
	qemuIO(t, url, "write -P 0x5a 0 1M", "write -P 0xa5 3M 64k", "write -P 0x33 5000 3000")

	d := openRaw(t, url, nil)
	if d.Size() != 32<<20 {
		t.Fatalf("size %d", d.Size())
	}
	buf := make([]byte, 4<<20)
	if _, err := d.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	for i, b := range buf {
		want := byte(0)
		switch {
		case i >= 5000 && i < 8000:
			want = 0x33
		case i < 1<<20:
			want = 0x5a
		case i >= 3<<20 && i < 3<<20+64<<10:
			want = 0xa5
		}
		if b != want {
			t.Fatalf("byte %d = %#x, want %#x", i, b, want)
		}
	}
	// Unaligned writes through vdisk (read-modify-write of the edges),
	// one long enough to be split into many commands.
	if _, err := d.WriteAt(pattern(777, 1), 8<<20+100); err != nil {
		t.Fatal(err)
	}
	if _, err := d.WriteAt(pattern(3<<20+1234, 2), 10<<20+511); err != nil {
		t.Fatal(err)
	}
	if _, err := d.WriteAt(make([]byte, 4096), 20<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := d.WriteAt([]byte{0xee}, 20<<20+4095); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "unaligned write", readFile(t, file, 8<<20+100, 777), pattern(777, 1))
	mustEqual(t, "long write", readFile(t, file, 10<<20+511, 3<<20+1234), pattern(3<<20+1234, 2))
	// qemu-io reads what vdisk wrote.
	qemuIO(t, url, "read -P 0xee 20975615 1", "read -P 0 20971520 4095", "read -P 0x5a 8000 1040576")
	// And qemu-img compares the LUN with the backing file byte by byte.
	qemutest.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", url, file)
}

// The target's backing file and the LUN read the same through vdisk; the
// holes GET LBA STATUS reports are the file's holes, and PunchHole leaves
// zeros and a hole.
func TestSparseAndPunch(t *testing.T) {
	tg, file := newTarget(t, 16<<20)
	url := tg.URL(1)
	qemuIO(t, url, "write -P 1 1M 256k", "write -P 2 8M 1M")
	d := openRaw(t, url, nil)
	defer d.Close()
	var data []vdisk.Extent
	if err := d.Map(context.Background(), 0, d.Size(), func(e vdisk.Extent) error {
		if e.State == driver.Data {
			data = append(data, e)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	var total int64
	for _, e := range data {
		total += e.Length
	}
	// ext4/xfs allocate in 4 KiB blocks: the data is what was written.
	if total != 1<<20+256<<10 {
		t.Fatalf("data extents %+v (total %d)", data, total)
	}
	if err := d.Discard(8<<20+4096, 512<<10); err != nil {
		t.Fatal(err)
	}
	if err := d.WriteZeroes(1<<20+100, 1000, true); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	got := readFile(t, file, 8<<20, 1<<20)
	for i := 4096; i < 4096+512<<10; i++ {
		if got[i] != 0 {
			t.Fatalf("punched byte %d reads %#x", i, got[i])
		}
	}
	if got[0] != 2 || got[4095] != 2 || got[4096+512<<10] != 2 {
		t.Fatal("punch went beyond its range")
	}
	z := readFile(t, file, 1<<20, 4096)
	for i := range z {
		want := byte(1)
		if i >= 100 && i < 1100 {
			want = 0
		}
		if z[i] != want {
			t.Fatalf("zeroed byte %d = %d", i, z[i])
		}
	}
	// qemu's view of the allocation agrees that the punched range is a hole.
	out := qemutest.Run(t, "qemu-img", "map", "--output=json", "-f", "raw", url)
	if !strings.Contains(out, `"start": 8392704, "length": 524288, "depth": 0, "present": false, "zero": true`) &&
		!strings.Contains(out, `"start": 8392704, "length": 524288, "depth": 0, "present": true, "zero": true`) {
		t.Errorf("qemu-img map:\n%s", out)
	}
	qemutest.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", url, file)
}

func TestFileEdges(t *testing.T) {
	tg, _ := newTarget(t, 1<<20)
	st, name, err := openScheme(tg.URL(1))
	if err != nil {
		t.Fatal(err)
	}
	f, err := st.Open(name, driver.ReadWrite)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 100)
	n, err := f.ReadAt(buf, 1<<20-50)
	if n != 50 || err != io.EOF {
		t.Fatalf("read at the end: %d %v", n, err)
	}
	if _, err := f.WriteAt(buf, 1<<20-50); !errors.Is(err, driver.ErrOutOfRange) {
		t.Fatalf("write past the end: %v", err)
	}
	if err := f.Truncate(2 << 20); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("truncate: %v", err)
	}
	if err := f.Truncate(1 << 20); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(f.Name(), tg.IQN) {
		t.Fatalf("name %q", f.Name())
	}
	ro, err := st.Open(name, driver.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ro.WriteAt(buf, 0); !errors.Is(err, driver.ErrReadOnly) {
		t.Fatalf("write on read-only: %v", err)
	}
	ro.Close()
	// vdisk create on a LUN: a raw image of exactly its size works (the
	// LUN is unmapped first), another size is a clear error.
	if _, err := f.WriteAt([]byte("old"), 4096); err != nil {
		t.Fatal(err)
	}
	d, err := vdisk.Create(context.Background(), tg.URL(1), &vdisk.CreateOptions{Format: "raw", Size: 1 << 20, Overwrite: true})
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 3)
	if _, err := d.ReadAt(got, 4096); err != nil || string(got) != "\x00\x00\x00" {
		t.Fatalf("created raw reads %q: %v", got, err)
	}
	d.Close()
	if _, err := vdisk.Create(context.Background(), tg.URL(1), &vdisk.CreateOptions{Format: "raw", Size: 2 << 20, Overwrite: true}); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("create larger than the LUN: %v", err)
	}
	// A missing LUN and a missing target are clear errors.
	if _, err := vdisk.Open(context.Background(), tg.URL(7), &vdisk.OpenOptions{Format: "raw"}); err == nil || !strings.Contains(err.Error(), "LUN 7") {
		t.Fatalf("missing LUN: %v", err)
	}
	bad := strings.Replace(tg.URL(1), tg.IQN, "iqn.2026-12.org.vdisk:nothere", 1)
	if _, err := vdisk.Open(context.Background(), bad, &vdisk.OpenOptions{Format: "raw"}); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Fatalf("missing target: %v", err)
	}
}

func openScheme(url string) (driver.Storage, string, error) {
	open, _ := driver.LookupScheme("iscsi")
	return open(context.Background(), url, &driver.SchemeEnv{})
}

// SendTargets lists the target as iscsi-ls does.
func TestDiscovery(t *testing.T) {
	tg := iscsitest.Start(t, testIQN)
	tg.AddLUN(1, 1<<20, false)
	st, _, err := openScheme("iscsi://" + tg.Portal)
	if err != nil {
		t.Fatal(err)
	}
	es, err := st.(driver.Lister).ListExports(context.Background(), "iscsi://"+tg.Portal)
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != 1 || es[0].Name != testIQN+"/1" || es[0].URL != tg.URL(1) || !strings.Contains(es[0].Description, "1048576 bytes") {
		t.Fatalf("exports %+v", es)
	}
	iscsitest.Require(t, "iscsi-ls")
	out, err := exec.Command("iscsi-ls", "iscsi://"+tg.Portal).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Target:"+testIQN) {
		t.Fatalf("iscsi-ls: %v\n%s", err, out)
	}
}

// CRC-32C header and data digests negotiated with tgtd.
func TestDigests(t *testing.T) {
	tg, file := newTarget(t, 4<<20)
	// tgtd answers None unless the target offers CRC32C.
	for _, k := range []string{"HeaderDigest", "DataDigest"} {
		tg.Adm("--op", "update", "--mode", "target", "--tid", "1", "--name", k, "--value", "CRC32C,None")
	}
	// And unsolicited data: InitialR2T=No with a first burst larger than
	// one PDU, so Data-Out follows the immediate data.
	for k, v := range map[string]string{"InitialR2T": "No", "FirstBurstLength": "262144", "MaxBurstLength": "1048576", "MaxRecvDataSegmentLength": "65536"} {
		tg.Adm("--op", "update", "--mode", "target", "--tid", "1", "--name", k, "--value", v)
	}
	st, name, err := iscsistore.Open(context.Background(), tg.URL(1), &driver.SchemeEnv{Options: map[string]string{"header-digest": "crc32c", "data-digest": "crc32c"}})
	if err != nil {
		t.Fatal(err)
	}
	f, err := st.Open(name, driver.ReadWrite)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := f.(*iscsistore.File).Session().Params()
	if !p.HeaderDigest || !p.DataDigest || p.InitialR2T || p.FirstBurstLength != 262144 || p.MaxXmitDataSegmentLength != 65536 {
		t.Fatalf("digests not negotiated: %+v", p)
	}
	data := pattern(1<<20+5, 3)
	if _, err := f.WriteAt(data, 12345); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if _, err := f.ReadAt(got, 12345); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "digest read", got, data)
	mustEqual(t, "digest write", readFile(t, file, 12345, int64(len(data))), data)
}
