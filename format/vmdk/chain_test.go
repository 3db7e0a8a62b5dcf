package vmdk

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// TestDeltaInterop: delta disks made by qemu-img read as qemu reads them;
// delta disks vdisk makes over a qemu parent pass qemu-img check and read
// the same in qemu; a parent modified after the child was made (CID
// mismatch) is refused.
func TestDeltaInterop(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	base := filepath.Join(dir, "base.vmdk")
	qemutest.Create(t, "vmdk", base, "6M")
	qemutest.IO(t, "vmdk", base, "write -P 0x11 0 3M", "write -P 0x12 5M 1M")

	// qemu's child.
	qc := filepath.Join(dir, "qchild.vmdk")
	qemutest.Img(t, "create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", qc)
	qemutest.IO(t, "vmdk", qc, "write -P 0x21 1M 100k", "write -P 0x22 4M 4k")
	want := qemuRaw(t, qc)
	d := openDisk(t, nil, qc, true)
	if len(d.Layers()) != 2 {
		t.Fatalf("%d layers", len(d.Layers()))
	}
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
		t.Fatal("qemu's delta disk reads differently")
	}
	ref := d.Top().ParentRef()
	pid, ok := vdisk.As[driver.Identifier](d.Layers()[1])
	if ref == nil || ref.Name != "base.vmdk" || ref.Format != "vmdk" || !ok || ref.ModUUID != pid.UUID() {
		t.Fatalf("parent ref %+v", ref)
	}
	disktest.MustClose(t, d)

	// vdisk's child over qemu's base.
	vc := filepath.Join(dir, "vchild.vmdk")
	d = createDisk(t, nil, vc, 0, "base.vmdk")
	if d.Size() != 6<<20 {
		t.Fatalf("child size %d", d.Size())
	}
	disktest.MustWrite(t, d, nil, disktest.Fill(5000, 0x31), 2<<20+700) // copy-on-write of a partial grain
	disktest.MustWrite(t, d, nil, disktest.Fill(64<<10, 0x32), 5<<20)
	disktest.MustClose(t, d)
	qemutest.Check(t, "vmdk", vc)
	raw := filepath.Join(dir, "v.raw")
	d = openDisk(t, nil, vc, true)
	if err := os.WriteFile(raw, disktest.ReadAll(t, d), 0o644); err != nil {
		t.Fatal(err)
	}
	disktest.MustClose(t, d)
	if !qemutest.Compare(t, "vmdk", vc, "raw", raw) {
		t.Fatal("qemu reads vdisk's delta disk differently")
	}
	if got := qemutest.Info(t, "vmdk", vc)["backing-filename"]; got != "base.vmdk" {
		t.Fatalf("qemu sees backing %v", got)
	}

	// Writing the parent changes its CID: the child's parentCID no longer
	// matches. Like a stale modification UUID of other formats (and as
	// qemu, which does not check the CID), that is a warning, not an
	// error: a commit interrupted half-way leaves exactly this, and the
	// chain must still open.
	qemutest.IO(t, "vmdk", base, "write -P 0x13 0 512")
	var logged bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logged, nil))
	d, err := vdisk.Open(ctx, vc, &vdisk.OpenOptions{ReadOnly: true, Logger: log})
	if err != nil {
		t.Fatalf("open with a modified parent: %v", err)
	}
	disktest.MustClose(t, d)
	if !bytes.Contains(logged.Bytes(), []byte("parent was modified")) {
		t.Fatalf("no warning about the modified parent: %q", logged.String())
	}
}

// TestCommitKeepsCIDChain: committing a delta disk into its parent changes
// the parent's CID; the child's parentCID follows, so the chain still opens
// and reads the same.
func TestCommitKeepsCIDChain(t *testing.T) {
	for _, keep := range []bool{true, false} {
		t.Run(fmt.Sprint("keep=", keep), func(t *testing.T) { commitChain(t, keep) })
	}
}

func commitChain(t *testing.T, keep bool) {
	st := memfs.New()
	m := model.New(4 << 20)
	b := createDisk(t, st, "/base.vmdk", 4<<20, "")
	disktest.MustWrite(t, b, m, disktest.Fill(1<<20, 1), 0)
	disktest.MustClose(t, b)
	c := createDisk(t, st, "/child.vmdk", 0, "base.vmdk")
	disktest.MustWrite(t, c, m, disktest.Fill(100000, 2), 500000)
	disktest.MustClose(t, c)
	if err := vdisk.Commit(ctx, "/child.vmdk", &vdisk.CommitOptions{Base: 1, Keep: keep, Open: &vdisk.OpenOptions{Storage: st}}); err != nil {
		t.Fatal(err)
	}
	d := openDisk(t, st, "/child.vmdk", true)
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, m.Data) {
		t.Fatal("content after commit differs")
	}
	disktest.MustClose(t, d)
}
