package vdi

import (
	"testing"

	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// TestHostileMemory: a qemu-made VDI whose header claims a huge block map
// or disk opens, reads and checks within 64 MiB of heap, or fails with a
// clear error.
func TestHostileMemory(t *testing.T) {
	good := qemutest.Seeds(t, "vdi", qemutest.Seed{Name: "m", Size: "64M",
		IO: []string{"write -P 0x11 0 64k", "write -P 0x12 32M 64k"}})["m"]
	le := func(off, size int, v uint64) disktest.Field { return disktest.Field{Off: off, Size: size, Value: v} }
	h := preHeaderSize
	offBlocks, offData, disk, block, blocks, allocated := h+268, h+272, h+296, h+304, h+312, h+316
	disktest.HostileMemory(t, "vdi", good, []disktest.Hostile{
		{Name: "huge block map", Fields: []disktest.Field{le(disk, 8, 1<<52), le(blocks, 4, 0xffffffff)}},
		{Name: "blocks max", Fields: []disktest.Field{le(blocks, 4, 0xffffffff)}},
		{Name: "allocated max", Fields: []disktest.Field{le(allocated, 4, 0xffffffff)}},
		{Name: "tiny blocks huge disk", Fields: []disktest.Field{le(block, 4, 512), le(disk, 8, 1<<41), le(blocks, 4, 1<<32-1)}},
		{Name: "huge blocks", Fields: []disktest.Field{le(block, 4, 1<<31)}},
		{Name: "map past EOF", Fields: []disktest.Field{le(offBlocks, 4, 0xfffffff0), le(offData, 4, 0xfffffff8)}},
	}, 64<<20)
}
