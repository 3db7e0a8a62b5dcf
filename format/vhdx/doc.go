// Package vhdx is the VHDX format ([MS-VHDX], Hyper-V's virtual hard disk
// v2), registered as "vhdx": fixed, dynamic and differencing images, read
// and write, with the metadata log. All integers are little-endian; GUIDs
// are MS-GUIDs (first three fields little-endian); checksums are CRC-32C
// over the structure with its checksum field taken as zero.
//
// # Layout
//
// The first MiB is the header section: the file type identifier
// ("vhdxfile", creator in UTF-16) at 0, two 4 KiB headers at 64 KiB and
// 128 KiB ("head", checksum, sequence number, file write GUID, data write
// GUID, log GUID, log version 0, version 1, log length and offset; the
// valid one with the higher sequence number is current), and two copies
// of the 64 KiB region table at 192 KiB and 256 KiB ("regi", checksum,
// entry count <= 2047, entries of GUID, offset, length, required bit).
// The BAT and metadata regions are required; an unknown region marked
// required refuses the image. Regions and the log are 1 MiB aligned and
// must not overlap each other or the header section.
//
// The metadata region starts with a 64 KiB table ("metadata", entry
// count, entries of item GUID, offset >= 64 KiB, length, flags) whose
// items are: file parameters (block size, a power of two from 1 to
// 256 MiB; leave-blocks-allocated; has-parent), the virtual disk size, the
// page 83 data (a GUID), the logical (512 or 4096) and physical sector
// sizes, and for differencing images the parent locator (type GUID, then
// UTF-16 key/value pairs: parent_linkage, parent_linkage2, relative_path,
// volume_path, absolute_win32_path). An unknown item marked required
// refuses the image.
//
// The BAT holds a 64-bit entry per payload block (state in bits 0-2, file
// offset in MiB in bits 20-63), with one sector bitmap entry after every
// chunk ratio = 2^23 * logical sector size / block size payload entries;
// it has payload + (payload-1)/ratio entries, or (for a differencing image)
// ceil(payload/ratio) * (ratio+1). Payload states: NOT_PRESENT (0),
// UNDEFINED (1) and UNMAPPED (3) are Unallocated runs (zeros in a base
// image, the parent in a differencing one), ZERO (2) is a Zero run (qemu's
// fixed images keep a file offset in ZERO entries), FULLY_PRESENT (6) is
// Data, and PARTIALLY_PRESENT (7, differencing only) is Data for the
// sectors whose bit is set in the chunk's 1 MiB sector bitmap block (bit
// 0 of byte 0 is the chunk's first sector) and Unallocated elsewhere.
// Sector bitmap entries are NOT_PRESENT (0) or PRESENT (6).
//
// # The log
//
// A circular buffer of 4 KiB sectors. An entry ("loge", checksum over the
// whole entry, length, tail, sequence number, descriptor count, log GUID,
// flushed and last file offsets) is followed by its descriptors ("desc":
// a 4 KiB sector whose first 8 and last 4 bytes sit in the descriptor and
// the other 4084 in a "data" sector carrying the sequence number split in
// two halves; "zero": a run of zeros), in 4 KiB sectors. On open, when the
// current header's log GUID is not zero, every valid entry (signature,
// length, GUID, checksum, descriptors and data sectors matching its
// sequence number) is found; the active sequence is the chain of entries
// that follow one another with consecutive sequence numbers ending at the
// highest one, replayed from the entry its tail names (or from its start,
// as qemu replays). A head whose flushed offset is past the end of the
// file refuses the image (it was truncated); descriptors that write into
// the first 192 KiB, into the log or past the file (as the entry lets it
// grow) refuse it too. Opened read-write, the sequence is written into
// the file, the file grown to the last file offset, synced, and a header
// with a zero log GUID written; opened read-only, it is applied in memory
// (an overlay every read goes through) and the file is untouched
// (Info().Dirty reports it). qemu refuses such images read-only.
//
// Writing. The first change of an open session writes a header with new
// file write, data write and log GUIDs and syncs it. New blocks go into
// free space (1 MiB aligned): first the free list, else the end of the
// file; the space reads zeros (space never written, or punched before it
// is reused). BAT entries, sector bitmap pages, metadata items and region
// tables change in memory and are committed on Flush and Close through
// the log: sync the data, write one entry at the start of the log (tail =
// itself: everything logged before was applied and synced), sync, write
// the pages in place, sync. A crash anywhere leaves the old metadata or an
// entry that replays to the new; close writes a header with a zero log
// GUID. Close without a Flush (an unsafe cache mode: qemu-img convert's
// default, Disk.CloseUnsynced) writes the same entry and pages without
// syncing. Blocks freed by discard, whole-block zeroes, shrinks and
// compaction are punched only after their new entries are committed, and
// then join the free list; on open the free list is rebuilt from the
// BAT (the gaps between the header section, log, regions and blocks),
// and such space is punched before use as it may hold stale data. Reusing
// freed space is crash safe: committed metadata no longer points there.
//
// The log is searched and replayed from the file a 4 MiB window at a time
// (data descriptors are read again when applied), so its size is bounded
// only by the format (4 GiB); at most 4M descriptors are kept, and the
// checksumming work is bounded by twice the log's size.
//
// Reorganising. Resize grows the BAT; when the region cannot hold it, the
// whole BAT is written into free space and one log entry switches both
// region tables to it (and writes the new size), after which the old
// region is free. Shrinking drops what lies past the new end (the resize
// command asks for --shrink first, as qemu-img does): blocks and sector
// bitmaps past it are freed with the new size in one log entry, and the
// file is cut. Compact copies the highest blocks (and sector bitmaps)
// into free space below them, commits their new entries through the log,
// frees the old places, repeats while anything moves, and cuts the file:
// a crash leaves either layout, reading the same. Cutting the file first
// closes the log (a zero log GUID), since an entry recording the longer
// file would make a replay take the cut file for a truncated one.
//
// # Choices
//
// Create lays the file out as qemu does: log (log_size, default 1 MiB) at
// 1 MiB, then the BAT (rounded to 1 MiB), then a 1 MiB metadata region,
// then the blocks. block_size 0 picks qemu's size by disk size;
// block_state_zero=on (qemu's default) starts a dynamic image's blocks
// ZERO and a fixed image's blocks ZERO with their space (off: NOT_PRESENT
// and FULLY_PRESENT); fixed images set leave-blocks-allocated and keep
// their blocks on discard and zeroes. logical_sector_size and
// physical_sector_size are vdisk extensions (qemu opens only 512-byte
// logical sectors). An existing file is cut to the header section, not
// to zero: ext4 writes a file cut to zero back in full when it is closed
// (auto_da_alloc), which would cost a convert into it a sync.
//
// Convert: data goes into blocks in place as it comes (1 MiB-aligned
// blocks allocated at the end of the file, never zeroed first: fresh
// space reads zeros), and the BAT and bitmap changes wait in memory until
// the flush or close, which writes them through one log entry per
// log-full of pages. Copy offload (FileExtent, CopyFrom): data runs of
// present blocks map byte for byte to the file, so a convert from a VHDX
// copies them file to file inside the kernel (skipping the file's holes
// inside blocks), and a convert into one copies the source's plain runs
// straight into its blocks (copy_file_range, or a reflink); a refused
// copy falls back to reading and writing. A log replayed in memory maps
// nothing (reads go through it).
//
// Identifier: UUID is the page 83 data, the modification UUID the data
// write GUID, the parent modification UUID the parent_linkage; each can
// be set (the GUID in the header by the alternating header update, the
// others as metadata items through the log). SetParent (rebase) rewrites
// the locator: parent_linkage, relative_path, absolute_win32_path; nil
// makes the image standalone (partially present blocks become fully
// present with their absent sectors zeroed, sector bitmaps are freed).
//
// Differencing images (which qemu cannot open) record parent_linkage (the
// parent's data write GUID when it is a VHDX: Identifier's modification
// UUID; the container warns on a mismatch), relative_path in Hyper-V's
// ".\name" form and absolute_win32_path (the parent's absolute path as
// this system spells it). Parent() returns relative_path, else a POSIX
// absolute path, else the base name of a Windows path; no format is
// recorded, so the container probes the parent. A write of whole logical
// sectors into a block the image does not hold allocates it partially
// present (clearing its bits, then setting the written ones once the
// bytes are in place, so a failed write leaves the parent showing); a write
// covering only part of a logical sector the image does not hold returns
// driver.NeedFill for the request rounded out to that sector. A whole
// block written becomes fully present; zeroes make whole blocks ZERO.
// Discard makes whole blocks UNMAPPED (NOT_PRESENT in differencing images).
//
// Check reports unusable BAT entries (unknown state, outside the file,
// into metadata or another block), which fail only the reads of their
// blocks; -r all makes them NOT_PRESENT. Compact refuses an image with
// unusable entries until it is repaired.
package vhdx
