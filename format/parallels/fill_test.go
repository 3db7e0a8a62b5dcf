package parallels

import (
	"bytes"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// TestNeverFills: Parallels images have no parent, so a write covering
// part of an unallocated cluster (head, tail, both, whole clusters, across
// allocated ones) never asks the container for a fill; the rest of the
// cluster reads zeros, and writes of zeros into unallocated clusters
// allocate nothing.
func TestNeverFills(t *testing.T) {
	const cs = 4096
	st := memfs.New()
	img, err := Format.Create(ctx, &driver.CreateParams{Storage: st, Name: "/f.hds", Size: 16 * cs,
		Options: driver.Values{"cluster_size": int64(cs), "prealloc-size": int64(0)}})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	want := make([]byte, 16*cs)
	write := func(p []byte, off int64) {
		t.Helper()
		if _, err := img.WriteAt(p, off); err != nil {
			if _, ok := driver.AsFill(err); ok {
				t.Fatalf("write of %d at %d asked for a fill", len(p), off)
			}
			t.Fatal(err)
		}
		copy(want[off:], p)
	}
	write(disktest.Fill(100, 1), 3*cs+10)          // inside one cluster
	write(disktest.Fill(cs, 2), cs/2)              // tail of 0, head of 1
	write(disktest.Fill(3*cs, 3), 5*cs)            // whole clusters
	write(disktest.Fill(5*cs+7, 4), 2*cs+100)      // across the allocated cluster 3
	write(make([]byte, 2*cs), 12*cs)               // zeros: nothing allocated
	write(append(make([]byte, cs), 9), 14*cs+cs-1) // a zero cluster, then 1 byte
	got := make([]byte, len(want))
	if _, err := img.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("content")
	}
	for _, c := range []int64{12, 13} {
		if e, _ := img.Status(c*cs, cs); e.State != driver.Unallocated {
			t.Fatalf("cluster %d written with zeros is %v", c, e.State)
		}
	}
}
