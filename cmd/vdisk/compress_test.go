package main

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk/internal/qemutest"
)

// TestConvertCompressed: convert -c writes compressed qcow2 clusters (zlib
// and zstd) that qemu-img checks clean and compares equal to the source,
// and the output is no larger than qemu-img's own -c output.
func TestConvertCompressed(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	src := qemuSparseRaw(t, dir)
	for _, ct := range []string{"zlib", "zstd"} {
		t.Run(ct, func(t *testing.T) {
			ours := filepath.Join(dir, "ours-"+ct+".qcow2")
			theirs := filepath.Join(dir, "qemu-"+ct+".qcow2")
			mustRun(t, "convert", "-c", "-o", "compression_type="+ct, "-f", "raw", "-O", "qcow2", src, ours)
			qemutest.Img(t, "convert", "-c", "-o", "compression_type="+ct, "-f", "raw", "-O", "qcow2", src, theirs)
			r := qemutest.Check(t, "qcow2", ours)
			if !qemutest.Compare(t, "raw", src, "qcow2", ours) {
				t.Fatal("compressed image differs from the source")
			}
			oi, _ := os.Stat(ours)
			ti, _ := os.Stat(theirs)
			if oi.Size() > ti.Size() {
				t.Errorf("our -c output is %d bytes, qemu-img's %d", oi.Size(), ti.Size())
			}
			if r.AllocatedClusters == 0 {
				t.Error("no clusters allocated")
			}
		})
	}
	// -c on a format without compression is a one-line error.
	res := vdiskRun(t, "convert", "-c", "-f", "raw", "-O", "raw", src, filepath.Join(dir, "x.raw"))
	if res.code == 0 {
		t.Fatal("convert -c -O raw succeeded")
	}
}
