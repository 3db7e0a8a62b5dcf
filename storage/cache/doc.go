// Package cache puts a block cache in front of a slow file (an S3 object,
// an NBD export, an iSCSI LUN): reads are served from the cache when it
// holds the block and fill it on a miss (copy-on-read); concurrent misses
// of one block fetch it once; a read of many blocks fetches them in
// parallel, the missing blocks it covers whole straight into the caller's
// buffer in runs of up to 1 MiB (one source read each, then written to the
// cache from there); Prefetch pulls the whole source in. The cache is bounded
// (cache-size) and evicts the least recently used blocks, reusing their
// space. It lives in memory or in a VCI file, VirtualBox's cache image
// format, that survives restarts.
//
// # Writes
//
// Writes go through to the source and update the cached copies of the
// blocks they touch (a failed source write drops them). Before the first
// write after a clean state the cache header is durably marked unclean
// (VirtualBox's fUncleanShutdown); Sync flushes the source and only then
// commits the metadata as clean. A cache found unclean is discarded, so a
// crash while writing can never leave cached blocks that disagree with the
// source. A cache over a read-only base simply never sees writes (the
// source refuses them).
//
// # The VCI format: facts from VirtualBox (src/VBox/Storage/VCICache.cpp)
//
// All fields little endian, structures packed; addresses and lengths in
// 512-byte sectors ("VCI blocks").
//
//   - VciHdr, 1024 bytes at offset 0: u32 signature 0x00494356 ("VCI\0"),
//     u32 version 1, u64 cBlocksCache (the cache's maximum size including
//     metadata), u8 fUncleanShutdown (1 = not closed cleanly), u32 cache
//     type (1 dynamic, 2 fixed), u64 offTreeRoot, u64 offBlkMap, u32
//     cBlkMap (sectors of the block map), 16-byte image UUID, 16-byte
//     modification UUID, 951 reserved bytes.
//   - VciBlkMap, 512 bytes at offBlkMap: u32 magic 0x4b4c4256 ("VBLK"),
//     u32 version 1, u64 cBlocks (sectors managed), u64 free, u64 allocated
//     to metadata, u64 allocated to data (the three sum to cBlocks), 472
//     reserved bytes; then the allocation bitmap, one bit per sector, least
//     significant bit first, set = allocated, padded to whole sectors.
//     cBlkMap = 1 + bitmap sectors.
//   - VciTreeNode, 4096 bytes: u8 type (1 internal, 2 leaf) then entries.
//     A leaf holds up to 107 VciCacheExtent of 38 bytes: u64 previous and
//     u64 next extent in the LRU list, u8 flags (0), u8 reserved, u64 first
//     cached sector of the source, u32 sectors, u64 sector in the cache
//     file holding the data. An internal node holds up to 204 entries of 20
//     bytes: u64 first sector, u32 sectors covered, u64 child node address.
//     An entry is in use when its length and address are non-zero; entries
//     are sorted by source sector (VirtualBox binary-searches them).
//   - VirtualBox's create puts the header at sector 0, the block map right
//     after it and the (empty leaf) root node after the block map.
//
// # What VirtualBox left open and what this package decided
//
// VirtualBox never implemented writing blocks (vciWrite is an empty loop),
// freeing, LRU maintenance or internal-node splits, and its I/O calls pass
// sector numbers as byte offsets and sector counts as byte counts in
// places; this package follows the structure comments (sectors) instead.
// It also counts metadata and data allocations in the block map the right
// way round (VirtualBox's allocator swaps them). Decided here:
//
//   - Blocks are cached in whole cache blocks (cache-block-size, 64 KiB to
//     1 MiB, default 256 KiB): one extent per block, its data in a slot
//     aligned to the block size after the metadata. The last block of the
//     source is stored whole, zero-filled past the source's end.
//   - cache-size must be a multiple of 2 MiB (rounded down), so that the
//     bitmap fills whole sectors: VirtualBox rounds its size up on create
//     but checks it rounded down on open, and only such sizes pass both.
//     cBlocksCache is the bound; the file never grows past it.
//   - Metadata is written to one of two fixed regions after the header,
//     alternately; the header names the active one by offBlkMap and
//     offTreeRoot and is rewritten last, after a flush, so a crash leaves
//     the old or the new metadata. A region holds the block map, then a
//     table of one u32 CRC-32C per data slot (0 for unused slots; sized
//     for cache-size / block size slots, padded to a sector), then the
//     tree: the root is the first node, the levels follow root first,
//     leaves last, all full but the last of each level. The table is ours
//     (the block map marks it as metadata, VirtualBox never reads past the
//     root). A cached block is checked against its checksum on its first
//     use after open and fetched again if it differs. Slots freed by
//     eviction are reused only after the metadata that no longer names
//     them is durable.
//   - The LRU links of the extents hold the data sector of the neighbour
//     extent (0 at either end); the most recently used one is named in the
//     extension below.
//   - The reserved bytes of VciHdr carry an extension (offsets in the
//     header): 73 "vdiskVCI", 81 u32 extension version 1, 85 u32 block
//     size in bytes, 89 u64 generation, 97 u64 source size, 105 SHA-256 of
//     the source identity ("vdisk-cache\0" + name + "\0" + driver.Versioned
//     version), 137 u32 CRC-32C of the active metadata region, 141 u64 LRU
//     head, 149 u32 extent count, 153 u32 tree nodes used, 1020 u32 CRC-32C
//     of header bytes 0..1019. The rest stays zero.
//
// The file keeps VirtualBox's header and block map checks (signature,
// version, block map magic, version, sum and size). Opening a cache
// validates everything else too: both checksums, the layout the header
// must match for its size and block size, every tree address, extent and
// LRU link, and finally that the metadata re-encodes to the same bytes;
// each block's data is checked against its checksum when first read.
// Anything else, and any cache filled from another source (name, size or
// version differ) or left unclean, is discarded with a warning and
// rebuilt, never trusted.
package cache
