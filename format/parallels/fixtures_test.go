package parallels

import (
	"encoding/binary"

	"github.com/vdisk/vdisk/internal/disktest"
)

// oldMagicImage builds a "WithoutFreeSpace" image by hand: 8 KiB clusters
// (16 sectors), 6 clusters of virtual disk, data_off 0 (the data area
// starts at the first sector after the BAT), and clusters stored out of
// order at sector offsets.
func oldMagicImage() []byte {
	const cs = 8192
	le := binary.LittleEndian
	dataOff := int64(512) // 64 + 6*4 rounded up to a sector
	b := make([]byte, dataOff+3*cs)
	h := header{magic: magicOld, version: version, heads: 16, cylinders: 1, tracks: cs / 512,
		batEntries: 6, nbSectors: 6*cs/512 - 3}
	copy(b, h.encode())
	// cluster 0 -> data cluster 2, cluster 3 -> data cluster 0, cluster 4 -> 1
	for c, k := range map[int]int64{0: 2, 3: 0, 4: 1} {
		le.PutUint32(b[headerSize+4*c:], uint32((dataOff+k*cs)/512))
		copy(b[dataOff+k*cs:], disktest.Fill(cs, byte(0x10+c)))
	}
	return b
}

// unalignedExtImage builds a "WithouFreSpacExt" image whose data_off (one
// sector) is not on the cluster grid: 4 KiB clusters, cluster 0 stored at
// file cluster 1 (entries count clusters).
func unalignedExtImage() []byte {
	const cs = 4096
	b := make([]byte, 2*cs)
	h := header{magic: magicExt, version: version, heads: 16, tracks: cs / 512, batEntries: 4, nbSectors: 4 * cs / 512, dataOff: 1}
	copy(b, h.encode())
	binary.LittleEndian.PutUint32(b[headerSize:], 1)
	copy(b[cs:], disktest.Fill(cs, 0x5e))
	return b
}
