package qcow2_test

import (
	"testing"

	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// TestHostileMemory: a qemu-made image whose header claims huge tables (L1,
// refcount table, snapshot table) or a huge disk opens, reads and checks
// within 64 MiB of heap, or fails with a clear error.
func TestHostileMemory(t *testing.T) {
	good := qemutest.Seeds(t, "qcow2", qemutest.Seed{Name: "m", Size: "64M",
		IO: []string{"write -P 0x11 0 64k", "write -P 0x12 32M 64k"}})["m"]
	be := func(off, size int, v uint64) disktest.Field {
		return disktest.Field{Off: off, Size: size, BigEndian: true, Value: v}
	}
	const (
		size, l1Size, l1Off   = 24, 36, 40
		rtOff, rtClusters     = 48, 56
		nbSnap, snapOff       = 60, 64
		clusterBits, hdrBytes = 20, 100
	)
	disktest.HostileMemory(t, "qcow2", good, []disktest.Hostile{
		{Name: "huge L1", Fields: []disktest.Field{be(size, 8, 1<<55), be(l1Size, 4, 0x7fffffff)}},
		{Name: "L1 size max", Fields: []disktest.Field{be(l1Size, 4, 0xffffffff)}},
		{Name: "L1 past EOF", Fields: []disktest.Field{be(l1Off, 8, 1<<50)}},
		{Name: "huge refcount table", Fields: []disktest.Field{be(rtClusters, 4, 0xffffffff)}},
		{Name: "refcount table 1M clusters", Fields: []disktest.Field{be(rtClusters, 4, 1<<20)}},
		{Name: "snapshots max", Fields: []disktest.Field{be(nbSnap, 4, 0xffffffff), be(snapOff, 8, 0x10000)}},
		{Name: "snapshots 65536", Fields: []disktest.Field{be(nbSnap, 4, 65536), be(snapOff, 8, 0x10000)}},
		{Name: "2 MiB clusters huge disk", Fields: []disktest.Field{be(clusterBits, 4, 21), be(size, 8, 1<<60)}},
	}, 64<<20)
}
