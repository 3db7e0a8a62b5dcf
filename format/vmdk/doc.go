// Package vmdk is the VMware virtual disk (VMDK) driver.
//
// A VMDK disk is a text descriptor (a separate file, or embedded in a
// hosted sparse file) listing extents: FLAT/VMFS (raw bytes at an offset
// of a file), SPARSE (a hosted sparse "KDMV" file: header, grain directory
// and a redundant copy, grain tables of 512 entries, grains), VMFSSPARSE
// (read-only; KDMV or the older "COWD" layout with 4096-entry tables) and
// ZERO (reads zeros). RW, RDONLY and NOACCESS extents are honoured.
//
// Layout choices:
//   - A file that starts with a sparse header is one extent of the size in
//     its header; the embedded descriptor supplies CID, parentCID,
//     createType and the disk database (qemu does the same).
//   - Created images follow qemu's layout and names exactly: the
//     descriptor in sectors 1..20, the redundant directory and its
//     preallocated tables, the directory and its tables, grains (64 KiB)
//     from a grain boundary; split extents NAME-s001.vmdk / NAME-f001.vmdk
//     of 2 GiB; monolithicFlat data in NAME-flat.vmdk.
//   - The driver holds no chain logic (driver contract v2): it never reads
//     a parent. Status reports unallocated grains (GTE 0) as Unallocated,
//     and the container reads them from the chain below; ReadAt, asked
//     anyway, reads them as zeros. Whether the image has a parent is
//     decided from its own descriptor only: a parentCID other than
//     ffffffff or a parentFileNameHint (what Parent reports).
//   - Writes allocate grains at the end of the file, write the grain
//     before its table entries (primary and redundant), and a table
//     before the directory entries that point at it (tables are allocated
//     on demand when a directory entry is empty). A write (or WriteZeroes)
//     covering only part of an unallocated grain of an image with a
//     parent changes nothing and returns driver.NeedFill for the request
//     extended to the whole grains at its head and tail (a grain ends
//     early at the end of its extent); the container re-issues it with
//     the chain's bytes around it. Without a parent, and in zeroed grains
//     (the image's own zeros), the rest of a new grain is zeros. Flat
//     extents are always allocated.
//   - Zeroed grains (GTE 1 with the header flag) are used by WriteZeroes
//     for whole grains where the extent enables them; with unmap, whole
//     grains of an image without a parent become unallocated.
//   - Discard (driver.Discarder) makes every whole grain of the sparse
//     extents in the range unallocated (GTE 0, data and zeroed grains
//     alike); flat extents and parts of grains stay as they are. The
//     grains' file space is not reused until the image is converted (as
//     with qemu's unmapping zero writes; qemu-img check counts no leaks
//     for VMDK). There is no Compacter: the container's compaction
//     discards redundant grains and the file keeps its size.
//   - streamOptimized images are read in both layouts (qemu's, with the
//     directory in front, and VMware's, with the directory at the end and
//     a footer). A new streamOptimized image is StreamOnly: it is filled
//     front to back (WriteCompressed, or WriteAt in grain order); grains
//     are deflated (zlib streams, as qemu and VMware write them) in
//     parallel and written in order behind grain markers; Close appends
//     the non-empty grain tables, the directory, the footer and the
//     end-of-stream marker. Existing streamOptimized images are not
//     modified.
//   - The CID is the image's "UUID" (driver.Identifier, 8 hex digits): a
//     delta disk records its parent's CID as parentCID and the container
//     refuses a parent whose CID differs. The first write of every open
//     session gives the image a new CID, as VMware and qemu do.
//   - Extent file names resolve against the descriptor's directory and
//     are opened through driver.OpenParams.OpenReferenced: under the
//     strict path policy (the library default) absolute names, ".." and
//     anything that is not a regular file beneath the descriptor's
//     directory on the real path are refused, unless the open option
//     allow_unsafe_extents is on or the container trusts the image
//     (OpenOptions.Paths = driver.PathTrusted, the CLI's default as
//     qemu-img follows any path). fullDevice, partitionedDevice and raw
//     device map descriptors are refused.
//   - Untrusted fields are bounded before use: descriptors at 1 MiB and
//     4096 extents, grains at 2 MiB and powers of two, grain tables at 512
//     entries, directories at 32 Mi entries and inside the file, at most
//     8192 grain tables cached.
package vmdk
