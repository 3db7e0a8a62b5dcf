package cache

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/memfs"
)

// goodCache builds a cache file over a source of size bytes whose blocks
// were read in a shuffled order (so the LRU list differs from the block
// order); it returns the source, its data and the cache file's bytes.
func goodCache(t testing.TB, size int64, o Options) (*memfs.FS, []byte, []byte) {
	t.Helper()
	mem, data := source(t, size, 11)
	cst := memfs.New()
	// One fetch at a time: the same slots every run (the fuzzer's workers
	// rebuild the file and must get the one its seeds came from).
	o.Parallel = 1
	f := openCached(t, mem, cst, "/c.vci", o, driver.ReadOnly)
	readAll(t, f, data, 40000, rand.New(rand.NewPCG(1, 2)))
	mustClose(t, f)
	b, err := cst.ReadFile("/c.vci")
	if err != nil {
		t.Fatal(err)
	}
	return mem, data, b
}

// fixCRCs recomputes the metadata and header checksums of a cache file
// whose header still says where its metadata is, so that mutations reach
// the checks behind the checksums.
func fixCRCs(l *layout, b []byte) {
	if len(b) < hdrSize {
		return
	}
	le := binary.LittleEndian
	bm, cbm, nodes := le.Uint64(b[offBlkMap:]), uint64(le.Uint32(b[offCBlkMap:])), uint64(le.Uint32(b[offNodesUsed:]))
	if bm < 1<<40 && cbm < 1<<20 && nodes < 1<<20 {
		start, n := bm*sectorSize, (cbm+l.crcSecs)*sectorSize+nodes*nodeSize
		if start+n <= uint64(len(b)) {
			le.PutUint32(b[offMetaCRC:], crc32.Checksum(b[start:start+n], castagnoli))
		}
	}
	le.PutUint32(b[offHdrCRC:], crc32.Checksum(b[:offHdrCRC], castagnoli))
}

// tryCache opens a cache file holding b over src and reads everything: the
// data must be right whether the cache was used or discarded. It reports
// whether the cache was discarded.
func tryCache(t testing.TB, src driver.Storage, data, b []byte, o Options) bool {
	t.Helper()
	f := openCached(t, src, newCow(b), "/c.vci", o, driver.ReadOnly)
	defer mustClose(t, f)
	discarded := f.Stats().Discarded != ""
	readAll(t, f, data, 1<<20, nil)
	return discarded
}

// TestCorrupt mutates every metadata byte of a cache file (raw, so the
// checksums catch it, and with the checksums recomputed, so the checks
// behind them must), truncates it and replaces it by garbage: every such
// cache is discarded or, where the change is harmless (UUIDs, the
// generation), used, and the data read is always the source's.
func TestCorrupt(t *testing.T) {
	o := Options{Size: 8 << 20, BlockSize: 64 << 10}
	// 112 blocks: two leaves under an internal root.
	src, data, good := goodCache(t, 7<<20, o)
	l, _ := newLayout(o.Size, o.BlockSize)
	h, err := decodeHeader("good", good)
	if err != nil {
		t.Fatal(err)
	}
	if h.nodesUsed != 3 || h.extents != 112 {
		t.Fatalf("good cache has %d extents in %d nodes", h.extents, h.nodesUsed)
	}
	if tryCache(t, src, data, good, o) {
		t.Fatal("the good cache was discarded")
	}
	regionStart := int(h.blkMap * sectorSize)
	regionEnd := regionStart + int(l.fixedBytes()) + int(h.nodesUsed)*nodeSize
	// Positions: the whole header and every byte of the active metadata.
	var pos []int
	for i := range hdrSize {
		pos = append(pos, i)
	}
	for i := regionStart; i < regionEnd; i++ {
		pos = append(pos, i)
	}
	// With the checksums recomputed, the UUIDs and the generation are not
	// checked, and a changed data checksum of a used slot only makes that
	// block fetch again (its first read finds the mismatch).
	crcTable := regionStart + int(l.cBlkMap)*sectorSize
	usedSlots := int(h.extents)
	harmless := func(i int) bool {
		return (i >= offUUIDImage && i < offReserved) || (i >= offGeneration && i < offGeneration+8) ||
			(i >= offHdrCRC && i < hdrSize) || (i >= offMetaCRC && i < offMetaCRC+4) ||
			(i >= crcTable && i < crcTable+4*usedSlots)
	}
	used := 0
	le := binary.LittleEndian
	long := os.Getenv("VDISK_LONG") != ""
	tried := 0
	for _, fix := range []bool{false, true} {
		for _, i := range pos {
			// Without VDISK_LONG: the checksums alone are sampled (every
			// 16th metadata byte) and the region's bytes flipped one way.
			if !long && !fix && i >= hdrSize && i%16 != 0 {
				continue
			}
			for _, x := range []byte{0x01, 0x80} {
				if !long && i >= hdrSize && x == 0x80 {
					continue
				}
				tried++
				cst := newCow(good)
				cst.f.WriteAt([]byte{good[i] ^ x}, int64(i))
				if fix {
					var hd [hdrSize]byte
					cst.f.ReadAt(hd[:], 0)
					bs, cbm, nodes := le.Uint64(hd[offBlkMap:]), uint64(le.Uint32(hd[offCBlkMap:])), uint64(le.Uint32(hd[offNodesUsed:]))
					if bs == h.blkMap && cbm == uint64(l.cBlkMap) && nodes == uint64(h.nodesUsed) {
						reg := make([]byte, regionEnd-regionStart)
						cst.f.ReadAt(reg, int64(regionStart))
						le.PutUint32(hd[offMetaCRC:], crc32.Checksum(reg, castagnoli))
					}
					le.PutUint32(hd[offHdrCRC:], crc32.Checksum(hd[:offHdrCRC], castagnoli))
					cst.f.WriteAt(hd[:], 0)
				}
				// Checking the data of every discarded cache is slow and
				// proves little; check the ones that were used.
				f := openCached(t, src, cst, "/c.vci", o, driver.ReadOnly)
				if f.Stats().Discarded == "" {
					used++
					if !fix || !harmless(i) {
						t.Errorf("byte %d ^ %#x (crc fixed %v) was not detected", i, x, fix)
					}
					readAll(t, f, data, 1<<20, nil)
				}
				mustClose(t, f)
			}
		}
	}
	t.Logf("%d mutations, %d used (UUIDs, generation, checksums), all others discarded", tried, used)

	// Some discarded ones, read in full, then the rebuilt cache is warm.
	for _, i := range []int{offSignature, offCacheBlks, offTreeRoot, offSrcSize, offLRUHead, regionStart + 600, regionEnd - 4000} {
		b := bytes.Clone(good)
		b[i] ^= 4
		fixCRCs(&l, b)
		if !tryCache(t, src, data, b, o) {
			t.Fatalf("byte %d not detected", i)
		}
	}

	// Field values with the checksums fixed.
	for _, c := range []struct {
		off, n int
		v      uint64
	}{
		{offVersion, 4, 2}, {offCacheBlks, 8, 0}, {offCacheBlks, 8, 1 << 62}, {offUnclean, 1, 1}, {offUnclean, 1, 7},
		{offCacheType, 4, vciTypeFixed}, {offTreeRoot, 8, 0}, {offTreeRoot, 8, 1 << 60}, {offBlkMap, 8, 1 << 63},
		{offCBlkMap, 4, 0xffffffff}, {offBlockSize, 4, 128 << 10}, {offBlockSize, 4, 0}, {offSrcSize, 8, 0},
		{offExtents, 4, 0}, {offExtents, 4, 0xffffffff}, {offNodesUsed, 4, 0}, {offNodesUsed, 4, 1 << 30},
		{offLRUHead, 8, 0}, {offLRUHead, 8, 1}, {offExtVersion, 4, 9}, {offMetaCRC + 40, 4, 1},
	} {
		b := bytes.Clone(good)
		switch c.n {
		case 1:
			b[c.off] = byte(c.v)
		case 4:
			le.PutUint32(b[c.off:], uint32(c.v))
		case 8:
			le.PutUint64(b[c.off:], c.v)
		}
		fixCRCs(&l, b)
		if !tryCache(t, src, data, b, o) {
			t.Errorf("field at %d = %d not detected", c.off, c.v)
		}
	}

	// Truncated files.
	for _, n := range []int{0, 1, 511, 1023, 1024, 1025, regionStart, regionEnd - 1, regionEnd, int(l.dataStart), int(l.dataStart) + 1, len(good) - 65536, len(good) - 1} {
		discarded := tryCache(t, src, data, good[:n], o)
		if n > 0 && !discarded {
			t.Errorf("file truncated to %d bytes was used", n)
		}
	}
	// Garbage.
	rng := rand.New(rand.NewPCG(3, 3))
	for _, n := range []int{100, 1024, 4096, 70000, len(good)} {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		if !tryCache(t, src, data, b, o) {
			t.Errorf("%d bytes of garbage were used", n)
		}
		copy(b, good[:hdrSize])
		if !tryCache(t, src, data, b, o) {
			t.Errorf("a good header over %d bytes of garbage was used", n)
		}
	}
	if !tryCache(t, src, data, make([]byte, len(good)), o) {
		t.Error("zeros were used")
	}

	// Data slots: a flipped byte in a cached block is caught by its
	// checksum on first use, and the block fetched again.
	for _, slot := range []int64{0, 1, 50, l.nslots - 1} {
		at := l.dataStart + slot*l.bs + 12345
		if at >= int64(len(good)) {
			continue
		}
		cst := newCow(good)
		cst.f.WriteAt([]byte{good[at] ^ 0x20}, at)
		f := openCached(t, src, cst, "/c.vci", o, driver.ReadOnly)
		readAll(t, f, data, 4096, nil)
		if st := f.Stats(); st.Discarded != "" || st.BytesFetched != o.BlockSize {
			t.Fatalf("slot %d corrupted: %+v (want one block refetched)", slot, st)
		}
		mustClose(t, f)
	}
}

// FuzzVCI feeds the cache file parser mutated metadata (the first 64 KiB
// of a cache file our code wrote; the data slots stay as written), with
// the checksums optionally recomputed so mutations reach the structural
// checks. It must never panic, and the data read must be the source's.
func FuzzVCI(f *testing.F) {
	o := Options{Size: 4 << 20, BlockSize: 64 << 10}
	src, data, good := goodCache(f, 1<<20+300, o)
	l, _ := newLayout(o.Size, o.BlockSize)
	meta := good[:l.dataStart]
	f.Add(bytes.Clone(meta), false)
	f.Add(bytes.Clone(meta), true)
	f.Add(bytes.Clone(meta[:hdrSize]), true)
	// A cache with an empty tree and one with a single block.
	for _, n := range []int64{0, 1} {
		cst := memfs.New()
		cf := openCached(f, src, cst, "/c.vci", o, driver.ReadOnly)
		if n > 0 {
			readAll(f, cf, data[:1000], 1000, nil)
		}
		mustClose(f, cf)
		// Whole: the fuzz body pads only short inputs with good's slots.
		b, _ := cst.ReadFile("/c.vci")
		if len(b) <= int(l.dataStart) {
			b = append(b, make([]byte, int(l.dataStart)+1-len(b))...)
		}
		f.Add(b, false)
	}
	f.Fuzz(func(t *testing.T, m []byte, fix bool) {
		if len(m) > 2*int(l.dataStart) {
			return
		}
		b := m
		if len(m) <= int(l.dataStart) {
			b = append(bytes.Clone(m), good[len(m):]...)
		}
		if fix {
			fixCRCs(&l, b)
		}
		tryCache(t, src, data, b, o)
	})
}
