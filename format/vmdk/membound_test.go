package vmdk

import (
	"testing"

	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// TestHostileMemory: a qemu-made sparse VMDK whose header claims a huge
// capacity, grain tables or grain directory opens, reads and checks within
// 64 MiB of heap, or fails with a clear error.
func TestHostileMemory(t *testing.T) {
	good := qemutest.Seeds(t, "vmdk", qemutest.Seed{Name: "m", Size: "64M",
		IO: []string{"write -P 0x11 0 64k", "write -P 0x12 32M 64k"}})["m"]
	le := func(off, size int, v uint64) disktest.Field { return disktest.Field{Off: off, Size: size, Value: v} }
	const capacity, grain, gtes, rgd, gd = 12, 20, 44, 48, 56
	disktest.HostileMemory(t, "vmdk", good, []disktest.Hostile{
		{Name: "huge capacity", Fields: []disktest.Field{le(capacity, 8, 1<<50)}},
		{Name: "capacity max", Fields: []disktest.Field{le(capacity, 8, 1<<63-1)}},
		{Name: "huge grain tables", Fields: []disktest.Field{le(gtes, 4, 0xffffffff)}},
		{Name: "tiny grains huge disk", Fields: []disktest.Field{le(grain, 8, 1), le(capacity, 8, 1<<40)}},
		{Name: "huge grains", Fields: []disktest.Field{le(grain, 8, 1<<40)}},
		{Name: "directory past EOF", Fields: []disktest.Field{le(gd, 8, 1<<50), le(rgd, 8, 1<<50)}},
	}, 64<<20)
}
