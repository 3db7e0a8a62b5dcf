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
//     parent locator data (a changed parent reference may put it between
//     blocks), then the blocks, then the footer. A block is a
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
// two from 512 bytes to 256 MiB, a vdisk extension) picks another; it is
// the ClusterSize Info reports. A new block of a dynamic image gets every
// bitmap bit set, as qemu does: qemu ignores bitmaps, and the block's
// unwritten data reads zeros for both. A new block of a differencing image
// gets the bits of the sectors written. Bits set by writes to existing
// blocks are cached and written back on Flush (after the data they
// cover); BAT entries are written one by one as blocks are allocated. A
// new block goes where the footer was, moved on so that its data (after
// its one-sector bitmap) starts on a 4 KiB boundary: up to 3.5 KiB of
// zeros go in front of it (0.17% of a 2 MiB block). Data on the file
// system's block grid can be cloned (a convert to raw on XFS or btrfs
// shares the blocks) and a page-sized read touches one page; qemu and
// VirtualBox put the blocks back to back, 512 bytes off the grid, and
// read vdisk's images as any other (the table holds sector numbers).
// Compact keeps the alignment. The footer is first written again behind
// the new block, so the file always ends with a valid footer.
//
// Chains (driver contract v2). The driver holds no chain logic and never
// reads its parent; whether an image has one is its own footer's disk
// type. Status reports the sectors whose bit is set as Data and every
// other range as Unallocated: in a dynamic image those read zeros, in a
// differencing image the container reads them from the chain below
// (ReadAt, only asked for Data, returns zeros there). Since the bitmaps
// record single sectors, the copy-on-write unit of a differencing image
// is the 512-byte sector: a write of whole sectors never needs the
// parent's content. A write (or WriteZeroes) that covers only part of its
// first or last sector, where that sector's bit is clear in a
// differencing image, writes nothing and returns driver.NeedFill for the
// request rounded out to that sector (a bound whose sector is held, or
// that is sector-aligned, stays where it was); the container reads those
// bytes from the chain and writes the extended request again, which
// succeeds. A dynamic image fills the rest of such a sector with zeros
// itself.
//
// Discard and zeroes. Discarding makes every whole block inside the
// range Unallocated: its BAT entry is cleared and its space punched out of
// the file; a dynamic image then reads zeros there, a differencing image
// the parent's content again. Partial blocks are left alone by Discard.
// WriteZeroes leaves the unallocated blocks of a dynamic image alone
// (they read zeros) and unmaps (with unmap) or zeroes in place its whole
// allocated blocks. A differencing image does not know what its parent
// holds, so its zeros always shadow the parent: whole blocks become
// blocks with every bit set and zero (sparse) data, other ranges get their
// sectors' bits set over zero data. Partial ranges of allocated blocks
// are written with zeros. Space freed inside the file is reused only by
// Compact (and by new parent locators); freed blocks at its end are cut
// off on the next Flush.
//
// Compact only packs the file: blocks nearest its end move into the holes
// that freed blocks left, the BAT is rewritten, the footer moves behind
// the last block and the file is truncated. Finding the blocks that are
// all zeros or equal to the parent is the container's work, which
// discards them before calling Compact.
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
// Rewriting the parent (driver.Reparenter: rebase -u, commit, merge,
// stream). SetParent with a reference records new W2ku and W2ru locators
// (the absolute path, and the path relative to the image when there is
// one; other locators are dropped), the parent's UUID (none when the
// reference has none: the container then skips the identity check), its
// modification time (kept when the parent cannot be looked at) and its
// file name. The new locator data goes into space no metadata or block
// uses (the previous locators' space, once freed) or at the end of the
// file, where a new block would go (the footer moves behind it); it is
// synced before the header points at it, and the old locators' space is
// punched once the header is synced, so a crash leaves the old or the new
// reference (and at worst leaked space). A dynamic image given a parent
// becomes a differencing image (the header first, then both footers); a
// fixed one cannot. SetParent(nil) makes a differencing image dynamic:
// the data under clear bitmap bits is zeroed (the image does not show it;
// qemu, which ignores bitmaps, would), both footers say dynamic (with the
// 65535/16/255 marker geometry if the CHS geometry would not give the
// same size), then the header's parent fields and locators are cleared
// and the footer moves down over locators at the end of the file. The
// sectors the image does not hold then read zeros: copying the parent's
// data in first is the container's work. MakeEmpty (driver.Emptier, after
// a commit) clears the whole block table at once, syncs it, punches the
// blocks' space and cuts the file behind the metadata; a differencing
// image then shows its parent everywhere, a dynamic one reads zeros.
//
// Robustness. Every header field is checked against the file size and the
// format's limits before it is used. Checksum errors, a missing or
// mismatched footer copy and BAT entries pointing outside the file, into
// metadata or into another block do not stop Open (qemu refuses bad
// checksums): they are logged, blocks with bad entries fail to read with
// ErrCorrupt, and Check reports them all; Check -r all rewrites footers
// and header, drops entries outside the file or in metadata and gives
// overlapping entries a copy of what they read, and -r leaks cuts unused
// space off the end of the file. Resize works on fixed and dynamic images
// (and differencing ones); the BAT grows in place when the space after it
// is free, otherwise a larger copy is written at the end of the file and
// the header pointed at it. Growing zeroes what this image still holds
// past the old size (data left by an earlier shrink); in a differencing
// image, shadowing the parent in the new range is the container's work.
//
// Not supported: O_DIRECT (the metadata is not written in aligned units),
// the 511-byte footers of Virtual PC before 2004, Mac and MacX locators on
// creation, changing the geometry and modification UUIDs.
package vhd
