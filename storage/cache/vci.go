package cache

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"hash/crc32"
	"math"

	"github.com/vdisk/vdisk/driver"
)

// On-disk constants of VirtualBox's VCI format (VCICache.cpp). Every
// address and length in the metadata counts 512-byte sectors.
const (
	sectorSize = 512

	hdrSize        = 1024 // VciHdr: two sectors at offset 0
	vciSignature   = 0x00494356
	vciVersion     = 1
	vciTypeDynamic = 1
	vciTypeFixed   = 2

	blkMapHdrSize  = 512 // VciBlkMap, followed by the allocation bitmap
	blkMapMagic    = 0x4b4c4256
	blkMapVersion  = 1
	nodeSize       = 4096 // VciTreeNode: type byte + 4095 bytes of entries
	nodeLeaf       = 2
	nodeInternal   = 1
	extentSize     = 38  // VciCacheExtent
	internalSize   = 20  // VciTreeNodeInternal
	extentsPerNode = 107 // (4096-1)/38
	childsPerNode  = 204 // (4096-1)/20
	maxTreeDepth   = 8

	// bitmapGranule is the cache size unit: VirtualBox sizes the bitmap by
	// rounding up to whole sectors on create but checks it rounding down
	// on open, so only caches whose bitmap fills whole sectors (multiples
	// of 4096 sectors = 2 MiB) pass both.
	bitmapGranule = 4096 * sectorSize
)

// Header fields (packed, little endian) and our extension in VciHdr's
// 951 reserved bytes.
const (
	offSignature = 0
	offVersion   = 4
	offCacheBlks = 8
	offUnclean   = 16
	offCacheType = 17
	offTreeRoot  = 21
	offBlkMap    = 29
	offCBlkMap   = 37
	offUUIDImage = 41
	offUUIDMod   = 57
	offReserved  = 73

	offExtMagic   = 73  // [8]byte "vdiskVCI"
	offExtVersion = 81  // u32
	offBlockSize  = 85  // u32: bytes per cached block
	offGeneration = 89  // u64
	offSrcSize    = 97  // u64
	offIdentity   = 105 // [32]byte SHA-256 of the source identity
	offMetaCRC    = 137 // u32 CRC-32C over the active metadata region
	offLRUHead    = 141 // u64 data address of the most recently used extent
	offExtents    = 149 // u32
	offNodesUsed  = 153 // u32
	offHdrCRC     = 1020

	extVersion = 1
)

var extMagic = []byte("vdiskVCI")

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// layout is where everything lives in a cache file of a given size and
// block size. It is a pure function of those two, so a header that
// disagrees with it is corrupt.
type layout struct {
	bs           int64  // bytes per cached block
	secPerBlk    uint64 // sectors per cached block
	cacheSecs    uint64 // VciHdr.cBlocksCache
	bitmapBytes  int64
	cBlkMap      uint64 // sectors of block map header + bitmap
	crcSecs      uint64 // sectors of the per-slot data checksums
	nodes        int64  // tree nodes reserved per region
	regionSecs   uint64 // sectors of one metadata region
	dataStart    int64  // byte offset of slot 0, aligned to bs
	nslots       int64
	metaSecs     uint64 // sectors allocated to metadata (header, both regions, padding)
	maxFileBytes int64
}

// treeNodes is the number of nodes a tree of n extents needs.
func treeNodes(n int64) int64 {
	if n <= extentsPerNode {
		return 1
	}
	level := (n + extentsPerNode - 1) / extentsPerNode
	total := level
	for level > 1 {
		level = (level + childsPerNode - 1) / childsPerNode
		total += level
	}
	return total
}

func newLayout(size, bs int64) (layout, bool) {
	if bs < sectorSize || bs&(bs-1) != 0 || size < bitmapGranule || size%bitmapGranule != 0 || size > maxCacheSize {
		return layout{}, false
	}
	l := layout{bs: bs, secPerBlk: uint64(bs / sectorSize), cacheSecs: uint64(size / sectorSize)}
	l.bitmapBytes = size / sectorSize / 8
	l.cBlkMap = 1 + uint64(l.bitmapBytes/sectorSize)
	// Size the tree for the slots there would be without metadata: an
	// upper bound, and deterministic.
	l.nodes = treeNodes(size / bs)
	l.crcSecs = uint64((size/bs*4 + sectorSize - 1) / sectorSize)
	l.regionSecs = l.cBlkMap + l.crcSecs + uint64(l.nodes)*nodeSize/sectorSize
	metaEnd := int64(hdrSize/sectorSize+2*l.regionSecs) * sectorSize
	l.dataStart = (metaEnd + bs - 1) / bs * bs
	l.nslots = (size - l.dataStart) / bs
	if l.nslots < 2 {
		return layout{}, false
	}
	l.metaSecs = uint64(l.dataStart / sectorSize)
	l.maxFileBytes = l.dataStart + l.nslots*bs
	return l, true
}

// regionSec is the first sector of metadata region r (0 or 1).
func (l *layout) regionSec(r int) uint64 { return hdrSize/sectorSize + uint64(r)*l.regionSecs }

// rootSec is the sector of region r's root node (the first node).
func (l *layout) rootSec(r int) uint64 { return l.regionSec(r) + l.cBlkMap + l.crcSecs }

// fixedBytes is the size of a region's block map and checksum table,
// which precede its tree nodes.
func (l *layout) fixedBytes() int64 { return int64(l.cBlkMap+l.crcSecs) * sectorSize }

func (l *layout) slotSec(slot int64) uint64 {
	return uint64(l.dataStart/sectorSize) + uint64(slot)*l.secPerBlk
}

// header is the decoded VciHdr with our extension.
type header struct {
	cacheSecs  uint64
	unclean    bool
	treeRoot   uint64
	blkMap     uint64
	cBlkMap    uint32
	uuidImage  [16]byte
	uuidMod    [16]byte
	blockSize  uint32
	generation uint64
	srcSize    uint64
	identity   [32]byte
	metaCRC    uint32
	lruHead    uint64
	extents    uint32
	nodesUsed  uint32
}

func (h *header) encode() []byte {
	b := make([]byte, hdrSize)
	le := binary.LittleEndian
	le.PutUint32(b[offSignature:], vciSignature)
	le.PutUint32(b[offVersion:], vciVersion)
	le.PutUint64(b[offCacheBlks:], h.cacheSecs)
	if h.unclean {
		b[offUnclean] = 1
	}
	le.PutUint32(b[offCacheType:], vciTypeDynamic)
	le.PutUint64(b[offTreeRoot:], h.treeRoot)
	le.PutUint64(b[offBlkMap:], h.blkMap)
	le.PutUint32(b[offCBlkMap:], h.cBlkMap)
	copy(b[offUUIDImage:], h.uuidImage[:])
	copy(b[offUUIDMod:], h.uuidMod[:])
	copy(b[offExtMagic:], extMagic)
	le.PutUint32(b[offExtVersion:], extVersion)
	le.PutUint32(b[offBlockSize:], h.blockSize)
	le.PutUint64(b[offGeneration:], h.generation)
	le.PutUint64(b[offSrcSize:], h.srcSize)
	copy(b[offIdentity:], h.identity[:])
	le.PutUint32(b[offMetaCRC:], h.metaCRC)
	le.PutUint64(b[offLRUHead:], h.lruHead)
	le.PutUint32(b[offExtents:], h.extents)
	le.PutUint32(b[offNodesUsed:], h.nodesUsed)
	le.PutUint32(b[offHdrCRC:], crc32.Checksum(b[:offHdrCRC], castagnoli))
	return b
}

// decodeHeader checks everything the header says by itself; the caller
// checks it against the layout and the source.
func decodeHeader(name string, b []byte) (header, error) {
	var h header
	if len(b) < hdrSize {
		return h, driver.Corruptf(name, 0, "cache file shorter than its %d-byte header", hdrSize)
	}
	le := binary.LittleEndian
	if v := le.Uint32(b[offSignature:]); v != vciSignature {
		return h, driver.Corruptf(name, offSignature, "signature %#x is not VCI's %#x", v, vciSignature)
	}
	if v := le.Uint32(b[offVersion:]); v != vciVersion {
		return h, driver.Corruptf(name, offVersion, "VCI version %d, want %d", v, vciVersion)
	}
	if !bytes.Equal(b[offExtMagic:offExtMagic+8], extMagic) {
		return h, driver.Corruptf(name, offExtMagic, "no vdisk cache extension (a VCI file not written by vdisk)")
	}
	if v := le.Uint32(b[offExtVersion:]); v != extVersion {
		return h, driver.Corruptf(name, offExtVersion, "vdisk extension version %d, want %d", v, extVersion)
	}
	if want, got := crc32.Checksum(b[:offHdrCRC], castagnoli), le.Uint32(b[offHdrCRC:]); want != got {
		return h, driver.Corruptf(name, offHdrCRC, "header checksum %#x, computed %#x", got, want)
	}
	switch b[offUnclean] {
	case 0:
	case 1:
		h.unclean = true
	default:
		return h, driver.Corruptf(name, offUnclean, "shutdown flag %d is neither 0 nor 1", b[offUnclean])
	}
	if v := le.Uint32(b[offCacheType:]); v != vciTypeDynamic {
		return h, driver.Corruptf(name, offCacheType, "cache type %d, want dynamic (%d)", v, vciTypeDynamic)
	}
	h.cacheSecs = le.Uint64(b[offCacheBlks:])
	h.treeRoot = le.Uint64(b[offTreeRoot:])
	h.blkMap = le.Uint64(b[offBlkMap:])
	h.cBlkMap = le.Uint32(b[offCBlkMap:])
	copy(h.uuidImage[:], b[offUUIDImage:])
	copy(h.uuidMod[:], b[offUUIDMod:])
	h.blockSize = le.Uint32(b[offBlockSize:])
	h.generation = le.Uint64(b[offGeneration:])
	h.srcSize = le.Uint64(b[offSrcSize:])
	copy(h.identity[:], b[offIdentity:])
	h.metaCRC = le.Uint32(b[offMetaCRC:])
	h.lruHead = le.Uint64(b[offLRUHead:])
	h.extents = le.Uint32(b[offExtents:])
	h.nodesUsed = le.Uint32(b[offNodesUsed:])
	for i := offNodesUsed + 4; i < offHdrCRC; i++ {
		if b[i] != 0 {
			return h, driver.Corruptf(name, int64(i), "reserved header byte is %#x, not zero", b[i])
		}
	}
	return h, nil
}

// identityHash names the source content a cache holds: its name and its
// Version (ETag) when it has one. The size is recorded separately.
func identityHash(name, version string) [32]byte {
	return sha256.Sum256([]byte("vdisk-cache\x00" + name + "\x00" + version))
}

// metaEntry is one cached block as the metadata records it.
type metaEntry struct {
	blk  int64 // source block index
	slot int64
	crc  uint32 // CRC-32C of the slot's bs bytes
}

// encodeRegion builds one metadata region: the block map and the B+-tree
// of extents (root first, then each level down to the leaves). byBlock is
// sorted by block; lru lists the same entries most recently used first.
func encodeRegion(l *layout, r int, byBlock, lru []metaEntry) (region []byte, nodesUsed int64) {
	le := binary.LittleEndian
	n := int64(len(byBlock))
	nodesUsed = treeNodes(n)
	region = make([]byte, l.fixedBytes()+nodesUsed*nodeSize)

	// Block map: header, both regions and padding are metadata; used slots
	// are data. Bits are LSB first, set = allocated.
	bm := region[:int64(l.cBlkMap)*sectorSize]
	dataSecs := uint64(n) * l.secPerBlk
	le.PutUint32(bm[0:], blkMapMagic)
	le.PutUint32(bm[4:], blkMapVersion)
	le.PutUint64(bm[8:], l.cacheSecs)
	le.PutUint64(bm[16:], l.cacheSecs-l.metaSecs-dataSecs)
	le.PutUint64(bm[24:], l.metaSecs)
	le.PutUint64(bm[32:], dataSecs)
	bits := bm[blkMapHdrSize:]
	setBits(bits, 0, l.metaSecs)
	crcs := region[int64(l.cBlkMap)*sectorSize : l.fixedBytes()]
	for _, e := range byBlock {
		setBits(bits, l.slotSec(e.slot), l.secPerBlk)
		le.PutUint32(crcs[e.slot*4:], e.crc)
	}

	// LRU links: the data address of the neighbours, 0 at the ends.
	prev := make(map[int64]uint64, n)
	next := make(map[int64]uint64, n)
	for i, e := range lru {
		if i > 0 {
			prev[e.slot] = l.slotSec(lru[i-1].slot)
		}
		if i+1 < len(lru) {
			next[e.slot] = l.slotSec(lru[i+1].slot)
		}
	}

	// Levels from the leaves up; levels[0] are the leaves.
	type span struct{ first, end uint64 }
	leaves := max((n+extentsPerNode-1)/extentsPerNode, 1)
	levels := []int64{leaves}
	for levels[len(levels)-1] > 1 {
		c := levels[len(levels)-1]
		levels = append(levels, (c+childsPerNode-1)/childsPerNode)
	}
	// Node index of level k's first node: root (top level) first.
	base := make([]int64, len(levels))
	idx := int64(0)
	for k := len(levels) - 1; k >= 0; k-- {
		base[k] = idx
		idx += levels[k]
	}
	nodes := region[l.fixedBytes():]
	nodeSec := func(i int64) uint64 { return l.rootSec(r) + uint64(i)*nodeSize/sectorSize }
	spans := make([]span, leaves)
	for i := int64(0); i < leaves; i++ {
		nd := nodes[(base[0]+i)*nodeSize:][:nodeSize]
		nd[0] = nodeLeaf
		lo, hi := i*extentsPerNode, min((i+1)*extentsPerNode, n)
		for j := lo; j < hi; j++ {
			e := byBlock[j]
			x := nd[1+(j-lo)*extentSize:]
			le.PutUint64(x[0:], prev[e.slot])
			le.PutUint64(x[8:], next[e.slot])
			off := uint64(e.blk) * l.secPerBlk
			le.PutUint64(x[18:], off)
			le.PutUint32(x[26:], uint32(l.secPerBlk))
			le.PutUint64(x[30:], l.slotSec(e.slot))
			if j == lo {
				spans[i].first = off
			}
			spans[i].end = off + l.secPerBlk
		}
	}
	for k := 1; k < len(levels); k++ {
		next := make([]span, levels[k])
		below := int64(len(spans))
		for i := int64(0); i < levels[k]; i++ {
			nd := nodes[(base[k]+i)*nodeSize:][:nodeSize]
			nd[0] = nodeInternal
			lo, hi := i*childsPerNode, min((i+1)*childsPerNode, below)
			for j := lo; j < hi; j++ {
				x := nd[1+(j-lo)*internalSize:]
				s := spans[j]
				le.PutUint64(x[0:], s.first)
				le.PutUint32(x[8:], uint32(min(s.end-s.first, math.MaxUint32)))
				le.PutUint64(x[12:], nodeSec(base[k-1]+j))
				if j == lo {
					next[i].first = s.first
				}
				next[i].end = s.end
			}
		}
		spans = next
	}
	return region, nodesUsed
}

func setBits(b []byte, from, n uint64) {
	for i := from; i < from+n; i++ {
		b[i/8] |= 1 << (i % 8)
	}
}

// decodeRegion reads the extents of a region that encodeRegion wrote:
// it walks the tree from the root as VirtualBox does, bounding every
// address, then re-encodes what it found and requires the very same
// bytes, so anything but our canonical encoding is rejected.
func decodeRegion(name string, l *layout, r int, h *header, region []byte) (byBlock, lru []metaEntry, err error) {
	le := binary.LittleEndian
	nodes := region[l.fixedBytes():]
	nused := int64(len(nodes)) / nodeSize
	base := int64(l.rootSec(r)) * sectorSize
	visited := make([]bool, nused)
	type ext struct {
		prev, next uint64
		off, addr  uint64
	}
	var exts []ext
	leafDepth := -1
	var walk func(sec uint64, depth int) error
	walk = func(sec uint64, depth int) error {
		if depth > maxTreeDepth {
			return driver.Corruptf(name, int64(sec)*sectorSize, "B+-tree deeper than %d levels", maxTreeDepth)
		}
		if sec < l.rootSec(r) || (sec-l.rootSec(r))%(nodeSize/sectorSize) != 0 {
			return driver.Corruptf(name, int64(sec)*sectorSize, "tree node address %d is not a node slot of the metadata region", sec)
		}
		i := int64((sec - l.rootSec(r)) / (nodeSize / sectorSize))
		if i >= nused {
			return driver.Corruptf(name, int64(sec)*sectorSize, "tree node %d beyond the %d nodes in use", i, nused)
		}
		if visited[i] {
			return driver.Corruptf(name, int64(sec)*sectorSize, "tree node %d referenced twice", i)
		}
		visited[i] = true
		nd := nodes[i*nodeSize:][:nodeSize]
		at := base + i*nodeSize
		switch nd[0] {
		case nodeLeaf:
			if leafDepth >= 0 && leafDepth != depth {
				return driver.Corruptf(name, at, "leaves at depths %d and %d", leafDepth, depth)
			}
			leafDepth = depth
			for j := 0; j < extentsPerNode; j++ {
				x := nd[1+j*extentSize:][:extentSize]
				blocks, addr := le.Uint32(x[26:]), le.Uint64(x[30:])
				if blocks == 0 || addr == 0 {
					break
				}
				exts = append(exts, ext{le.Uint64(x[0:]), le.Uint64(x[8:]), le.Uint64(x[18:]), addr})
			}
		case nodeInternal:
			for j := 0; j < childsPerNode; j++ {
				x := nd[1+j*internalSize:][:internalSize]
				if le.Uint32(x[8:]) == 0 || le.Uint64(x[12:]) == 0 {
					break
				}
				if err := walk(le.Uint64(x[12:]), depth+1); err != nil {
					return err
				}
			}
		default:
			return driver.Corruptf(name, at, "tree node type %d", nd[0])
		}
		return nil
	}
	if err := walk(l.rootSec(r), 0); err != nil {
		return nil, nil, err
	}
	if int64(len(exts)) != int64(h.extents) || int64(len(exts)) > l.nslots {
		return nil, nil, driver.Corruptf(name, base, "tree holds %d extents, header says %d (at most %d slots)", len(exts), h.extents, l.nslots)
	}
	bySlot := make(map[uint64]int, len(exts))
	byBlock = make([]metaEntry, len(exts))
	for i, x := range exts {
		if x.off%l.secPerBlk != 0 || x.off/l.secPerBlk >= uint64(math.MaxInt64/l.bs) ||
			int64(x.off/l.secPerBlk)*l.bs >= int64(min(h.srcSize, math.MaxInt64)) {
			return nil, nil, driver.Corruptf(name, base, "extent %d caches sector %d, not a block of the %d-byte source", i, x.off, h.srcSize)
		}
		ds := uint64(l.dataStart / sectorSize)
		if x.addr < ds || (x.addr-ds)%l.secPerBlk != 0 || int64((x.addr-ds)/l.secPerBlk) >= l.nslots {
			return nil, nil, driver.Corruptf(name, base, "extent %d stores its data at sector %d, not a data slot", i, x.addr)
		}
		if i > 0 && x.off <= exts[i-1].off {
			return nil, nil, driver.Corruptf(name, base, "extents out of order at %d", i)
		}
		if _, dup := bySlot[x.addr]; dup {
			return nil, nil, driver.Corruptf(name, base, "two extents share data sector %d", x.addr)
		}
		bySlot[x.addr] = i
		slot := int64((x.addr - ds) / l.secPerBlk)
		byBlock[i] = metaEntry{blk: int64(x.off / l.secPerBlk), slot: slot,
			crc: le.Uint32(region[int64(l.cBlkMap)*sectorSize+slot*4:])}
	}
	// The LRU list, from the head through the next links.
	lru = make([]metaEntry, 0, len(exts))
	seen := make([]bool, len(exts))
	for a := h.lruHead; a != 0; {
		i, ok := bySlot[a]
		if !ok || seen[i] {
			return nil, nil, driver.Corruptf(name, offLRUHead, "LRU list broken at data sector %d", a)
		}
		seen[i] = true
		lru = append(lru, byBlock[i])
		a = exts[i].next
	}
	if len(lru) != len(exts) {
		return nil, nil, driver.Corruptf(name, offLRUHead, "LRU list links %d of %d extents", len(lru), len(exts))
	}
	again, _ := encodeRegion(l, r, byBlock, lru)
	if !bytes.Equal(again, region) {
		at := int64(l.regionSec(r)) * sectorSize
		for i := range again {
			if again[i] != region[i] {
				at += int64(i)
				break
			}
		}
		return nil, nil, driver.Corruptf(name, at, "metadata region is not in canonical form (block map or tree node disagrees)")
	}
	return byBlock, lru, nil
}
