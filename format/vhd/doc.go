// Package vhd is the VHD format (Virtual PC, Hyper-V, Azure; qemu's "vpc"),
// registered as "vpc" with the alias "vhd": fixed, dynamic and differencing
// images, as the Virtual Hard Disk Image Format Specification describes
// them. All integers are big-endian.
//
// # Layout
//
// Every image ends with the 512-byte footer: "conectix", features, version,
// the offset of the dynamic header, a time stamp (seconds since 2000),
// creator application/version/OS, original and current size, CHS geometry,
// disk type (2 fixed, 3 dynamic, 4 differencing), a one's-complement
// checksum, the image's UUID and the saved-state flag.
//
//   - Fixed: the disk's bytes, then the footer.
//   - Dynamic and differencing: a copy of the footer at offset 0, the
//     1024-byte dynamic header at 512 ("cxsparse", BAT offset, max table
//     entries, block size, checksum, parent UUID, parent time stamp, parent
//     name in UTF-16BE, eight parent locators), the block allocation table
//     at 1536 (one 32-bit sector number per block, 0xFFFFFFFF when
//     unallocated, padded to a sector), for a differencing image the
//     parent locator data, then the blocks, then the footer. A block is a
//     sector bitmap (one bit per sector, most significant bit first,
//     padded to 512 bytes) followed by the block's data.
//
// # Choices
//
// Creator. Images vdisk makes say "vdsk" (version 1.0, host OS "Wi2k").
//
// Size. The virtual size follows qemu: the CHS geometry's size, except for
// images made by Hyper-V ("win "), Disk2vhd ("d2v "), XenServer ("tap\0"),
// XenConverter ("CTXS") and qemu's force_size ("qem2"), and for every
// image whose geometry is the 65535/16/255 marker, which use the footer's
// current size. The open option force_size_calc=chs|current_size overrides
// the guess as in qemu. qemu does not list "vdsk", so vdisk always writes a
// current size equal to the geometry's size (the size asked for is rounded
// up to the next geometry, as qemu-img create does) or, with
// -o force_size=on (and past 127 GiB), the exact size with the marker
// geometry. Differencing images, which qemu cannot open as such, always
// use the current size (as VirtualBox and Hyper-V do) and record their
// parent's size exactly. Azure wants fixed images whose virtual size is a
// whole number of MiB: creating a fixed image of any other size logs a
// warning saying so and how to get one (force_size=on with a MiB-aligned
// size). Sizes are limited to 2040 GiB as in qemu.
//
// Blocks. The default block size is 2 MiB; -o block_size=N (a power of
// two from 512 bytes to 256 MiB, a vdisk extension) picks another. A new
// block of a dynamic image gets every bitmap bit set, as qemu does: qemu
// ignores bitmaps, and the block's unwritten data reads zeros for both. A
// new block of a differencing image gets the bits of the sectors written;
// a partially written sector whose bit is clear is first filled from the
// parent. Reads honour the bits everywhere: a clear bit reads zeros in a
// dynamic image and the parent in a differencing one. Bits set by writes
// to existing blocks are cached and written back on Flush (after the data
// they cover); BAT entries are written one by one as blocks are
// allocated. A new block goes where the footer was; the footer is first
// written again behind the block, so the file always ends with a valid
// footer.
//
// Discard and zeroes. Discarding a whole block clears its BAT entry and
// punches its space out of the file: in a dynamic image it then reads
// zeros, in a differencing image the parent's content again. Partial
// blocks are left alone by Discard. WriteZeroes unmaps whole blocks of a
// dynamic image (and of a differencing image where the parent reads zeros
// anyway); other whole blocks of a differencing image become blocks with
// every bit set and zero (sparse) data, which read zeros over the parent;
// partial ranges are written with zeros. Space freed inside the file is
// reused only by Compact; freed blocks at its end are cut off on the next
// Flush.
//
// Differencing images record the parent's UUID, its modification time, its
// file name in the header, and two locators: W2ku (the parent's absolute
// path) and W2ru (its path relative to the child, Windows style:
// ".\base.vhd"), each in 1024 reserved bytes whose size the "data space"
// field gives in bytes, as VirtualBox and Hyper-V write it (the
// specification says sectors; both readings are accepted). Parent()
// returns the W2ru path (slash-separated, resolved by the container
// against the child's directory), else a POSIX absolute W2ku path, else a
// MacX file URL's path, else the header's parent name, plus the parent
// UUID, which the container checks against the parent. VHD records no
// parent format. A raw parent is refused at creation: nothing would find
// it again.
//
// Robustness. Every header field is checked against the file size and the
// format's limits before it is used. Checksum errors, a missing or
// mismatched footer copy and BAT entries pointing outside the file, into
// metadata or into another block do not stop Open (qemu refuses bad
// checksums): they are logged, blocks with bad entries fail to read with
// ErrCorrupt, and Check reports them all; Check -r all rewrites footers
// and header, drops entries outside the file or in metadata and gives
// overlapping entries a copy of what they read, and -r leaks cuts unused
// space off the end of the file. Compact drops blocks that read zeros
// (dynamic) or the parent's content (differencing) and moves the last
// blocks into the holes. Resize works on fixed and dynamic images (and
// differencing ones); the BAT grows in place when the space after it is
// free, otherwise a larger copy is written at the end of the file and the
// header pointed at it.
//
// Not supported: O_DIRECT (the metadata is not written in aligned units),
// the 511-byte footers of Virtual PC before 2004, Mac and MacX locators on
// creation, changing the geometry, modification UUIDs and rewriting the
// parent reference.
package vhd
