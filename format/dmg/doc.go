// Package dmg implements Apple's UDIF disk images (.dmg), qemu's "dmg"
// format: read-only images of every kind qemu reads, and new images written
// once, front to back, by `convert -O dmg` (qemu cannot write DMG at all).
//
// On-disk facts this package relies on (all integers big-endian):
//
//   - The "koly" trailer is the last 512 bytes of the file: magic "koly",
//     version 4, header size 512, flags (1 = flattened), the running data
//     fork offset, the data fork's offset and length (0x18, 0x20), the
//     resource fork's offset and length (0x28, 0x30), segment number and
//     count, a 16-byte segment ID, the data fork checksum (type 2 = CRC-32,
//     size 32 bits, 128 bytes of value) at 0x50, the XML property list's
//     offset and length (0xD8, 0xE0), 120 reserved bytes, the master
//     checksum at 0x160, the image variant (1 device, 2 partition) at 0x1E8
//     and the virtual size in 512-byte sectors at 0x1EC. qemu also finds a
//     trailer that is not exactly at the end (odd file sizes) by searching
//     the last 515 bytes for the magic; so do we.
//   - The block map lives in the XML plist as resource-fork > blkx, an
//     array of dicts whose Data key holds a base64 "mish" table (one per
//     partition); images without XML keep the same tables in a classic Mac
//     resource fork (header: data offset, map offset, data length; the data
//     is a run of 4-byte length-prefixed resources). As qemu does, the
//     resource fork is used when its length is not zero.
//   - A mish table: magic "mish", version 1, first sector (0x08), sector
//     count (0x10), data offset (0x18, added to the data fork offset for
//     every chunk), buffers needed, block descriptor, 24 reserved bytes, a
//     checksum like the trailer's (CRC-32 of the partition's uncompressed
//     bytes), the chunk count (0xC8) and then 40-byte chunks from 0xCC:
//     type, comment, first sector (relative to the table's), sector count,
//     compressed offset (relative to the data offset) and length.
//   - Chunk types: 0x00000000 zero-fill, 0x00000001 raw, 0x00000002
//     ignore (free space, reads zeros), 0x7ffffffe comment, 0x80000004 ADC
//     (Apple Data Compression), 0x80000005 zlib, 0x80000006 bzip2,
//     0x80000007 LZFSE, 0xffffffff terminator. Zero-fill chunks are Zero
//     runs, ignore chunks and sectors no chunk covers are Unallocated
//     holes; every other chunk is Data (with its file offset when raw).
//   - Like qemu, the chunks of every blkx table are merged and ordered by
//     sector; a compressed or raw chunk may cover at most 131072 sectors
//     (64 MiB) and store at most 64 MiB, so one decompressed chunk is
//     bounded. Overlapping chunks are corrupt.
//   - Checksums (CRC-32, zlib's polynomial): the trailer's data fork
//     checksum covers the data fork bytes as stored; each mish checksum
//     covers its partition's uncompressed sectors; the master checksum is
//     the CRC-32 of the mish checksums' 4-byte big-endian values, in
//     table order.
//
// LZFSE chunks (ULFO images) open (their sectors are Data) and fail to
// read with ErrUnsupported ("LZFSE chunks are not supported"); everything
// else reads. No pure-Go LZFSE decoder can be had here: the Go module
// proxy this build uses refuses every candidate module (pure-Go
// decoders and cgo bindings alike), and Debian ships no lzfse package to
// test one against.
//
// Writing: Create returns an image that StreamOnly reports true for; the
// container's convert hands it whole units (1 MiB, 2048 sectors, the
// chunk size of Apple's and libdmg's writers) in increasing order, skipping
// all-zero ones. Units are compressed on every core (zlib for UDZO at
// zlib-level, default 1 as hdiutil's, the stream framed here with an
// Adler-32 summed eight bytes at a time; bzip2 for UDBZ; a chunk that does
// not shrink is stored raw) or stored raw
// (UDRO, whose all-zero 4 KiB pieces become zero-fill chunks) and written
// in order from offset 0; gaps become zero-fill chunks. UDRW, Apple's
// read/write kind, is linear: every sector is stored at its own offset in
// raw chunks (gaps are holes of the file), so the data fork is the disk. Close
// writes one blkx table for the whole disk, the XML plist and the trailer
// with its CRC-32 checksums. Once written an image is read-only: opening
// one for writing is ErrReadOnly.
package dmg
