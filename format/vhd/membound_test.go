package vhd_test

import (
	"encoding/binary"
	"testing"

	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// vhdFix recomputes the checksums of both footers and the dynamic header
// (at 512) so that the smashed fields are believed.
func vhdFix(b []byte) {
	sum := func(p []byte, at int) {
		binary.BigEndian.PutUint32(p[at:], 0)
		var s uint32
		for _, c := range p {
			s += uint32(c)
		}
		binary.BigEndian.PutUint32(p[at:], ^s)
	}
	copy(b[len(b)-512:], b[:512])
	sum(b[:512], 64)
	sum(b[len(b)-512:], 64)
	sum(b[512:512+1024], 36)
}

// TestHostileMemory: a qemu-made dynamic VHD whose headers (with valid
// checksums) claim a huge BAT, disk or block size opens, reads and checks
// within 64 MiB of heap, or fails with a clear error.
func TestHostileMemory(t *testing.T) {
	good := qemutest.Seeds(t, "vpc", qemutest.Seed{Name: "m", Size: "64M",
		IO: []string{"write -P 0x11 0 64k", "write -P 0x12 32M 64k"}})["m"]
	be := func(off, size int, v uint64) disktest.Field {
		return disktest.Field{Off: off, Size: size, BigEndian: true, Value: v}
	}
	const origSize, curSize = 40, 48
	const tableOff, maxEntries, blockSize = 512 + 16, 512 + 28, 512 + 32
	disktest.HostileMemory(t, "vpc", good, []disktest.Hostile{
		{Name: "huge BAT", Fields: []disktest.Field{be(maxEntries, 4, 0xffffffff), be(curSize, 8, 1<<52), be(origSize, 8, 1<<52)}, Fix: vhdFix},
		{Name: "entries max", Fields: []disktest.Field{be(maxEntries, 4, 0xffffffff)}, Fix: vhdFix},
		{Name: "tiny blocks huge disk", Fields: []disktest.Field{be(blockSize, 4, 512), be(maxEntries, 4, 1<<31), be(curSize, 8, 1<<40)}, Fix: vhdFix},
		{Name: "huge blocks", Fields: []disktest.Field{be(blockSize, 4, 1<<31)}, Fix: vhdFix},
		{Name: "BAT past EOF", Fields: []disktest.Field{be(tableOff, 8, 1<<50)}, Fix: vhdFix},
	}, 64<<20)
}
