// Package vdi is the VirtualBox Disk Image format (VirtualBox's native
// format, with its differencing images).
//
// # Layout
//
// A VDI file starts with a 72-byte pre-header (64 bytes of text for eyes
// only, the signature 0xBEDA107F and the version) followed by the header.
// Version 1.1 headers are 384 bytes (as qemu writes them) or 400 bytes
// (with the logical CHS geometry, as VirtualBox writes them): image type
// (dynamic, fixed, undo, differencing), flags, a 256-byte comment, the
// offsets of the block map and of the data area, the legacy geometry,
// disk size, block size, extra data per block, block count, allocated
// block count, and four UUIDs (image, last modification, parent, parent's
// modification). Version 0 headers (348 bytes, no offsets, no parent
// modification UUID) are read too. UUIDs are stored with their first three
// fields little-endian, as VirtualBox's RTUUID is.
//
// The block map has one little-endian uint32 per block: 0xFFFFFFFF is a
// free block (unallocated: reads through to the parent, or zeros in a base
// image), 0xFFFFFFFE a zero block (reads zeros, also over a parent), and
// anything else the index of a data block; data block i lives at
// offData + i*(extra+blockSize) (+extra). Data blocks are appended in
// allocation order, so the allocated blocks use exactly the indices
// 0..allocated-1.
//
// # Our choices
//
//   - Create makes version 1.1 headers of 400 bytes with the block map
//     right after the header (at 512, as qemu puts it) and the data area
//     aligned to 1 MiB as VirtualBox does (the map has room to grow), 1 MiB
//     blocks by default (block_size takes any power of
//     two from 512 bytes to 64 MiB, as VirtualBox's AllocationBlockSize;
//     qemu reads only 1 MiB), static=on for fixed images, and a comment.
//     Sizes are rounded up to whole sectors; odd sizes found in headers are
//     rounded up too (as qemu does; VirtualBox rounds down).
//   - A differencing image records only its parent's UUID and modification
//     UUID (VDI has no parent file name); Parent returns them and the
//     container finds the parent by UUID among the image's siblings, or
//     takes it from OpenOptions.Parents.
//   - The driver holds no chain logic: it never reads another layer, and
//     whether free blocks show a parent is decided by the header alone
//     (type differencing). ReadAt serves data blocks; zero and free blocks
//     read as zeros there (the container reads free blocks from the layers
//     below).
//   - The block map stays in memory. A write into a free or zero block
//     writes a new data block (the rest of the block zeros) and then its
//     map entry. The header's allocated count is what qemu-img check
//     compares with the map, so every change of map entries is written
//     with the header in one write (header, the bytes up to the map, and
//     the map up to the last changed entry): a process killed between any
//     two writes leaves a count that matches (mapio.go). With the map
//     right after the header that write is small; VirtualBox's layout
//     (map at 1 MiB) costs a 1 MiB write per allocation, and a gap over 2
//     MiB falls back to the entry, then the header. Allocations run one
//     at a time, so the data block indices in use stay 0..count-1, where
//     VirtualBox and qemu allocate next. The count is the number of
//     allocated entries (qemu's rule); a kill while a discard's holes wait
//     for pack leaves them below the last block in use, which Check
//     reports as leaks and the next allocations or a pack fill. The
//     modification UUID changes on the first change of every
//     open-for-write session; it reaches the file with the next header
//     write. Full-block writes of zeros allocate nothing.
//   - Copy-on-write: a write (or WriteZeroes) covering only part of a free
//     block of a differencing image writes nothing and returns a
//     *driver.FillError for the whole partially covered free blocks at its
//     ends and everything between; the container reads that range from
//     the chain and writes it again, whole. Free blocks of a base image
//     read zeros and zero blocks are the image's own: those are filled
//     with zeros without asking.
//   - WriteZeroes with unmap turns whole blocks into zero blocks and gives
//     their data blocks back by moving the last data blocks into the holes
//     and truncating the file, as VirtualBox's discard does; partial
//     blocks are zero-filled. Discard turns every whole block of the range
//     into a free block (zeros in a base image, the parent's content in a
//     differencing image) the same way and leaves partial blocks alone;
//     fixed images do not discard. Compact only packs the file (moves the
//     data blocks after holes into them and truncates); the container
//     finds the blocks that are all zeros or equal to the layers below
//     and discards them first. Moves copy into unreferenced holes, sync,
//     repoint entries, sync, then truncate: a crash at any point leaves an
//     image that opens and reads the same (at worst with leaked data
//     blocks, which check -r or the next Compact removes).
//   - Resize grows the map in place when it has room, else moves the data
//     blocks in the way to the end of the file and renumbers; shrinking is
//     refused when the cut-off range holds data. Fixed images are not
//     resized (as in VirtualBox).
//   - Check reports entries past the end of the file, indices not below
//     the block count, cross-linked data blocks and a wrong allocated count
//     as corruptions, unreferenced data blocks (holes included) as leaks. An image opened
//     for writing with entries past the end or cross-links refuses writes
//     until it is repaired.
//   - O_DIRECT is not used: map entries and the header are updated with
//     sub-sector writes.
package vdi
