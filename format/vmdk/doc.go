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
//   - Writes allocate grains at the end of the file, fill partial grains
//     from the parent view (or zeros), write the grain before its table
//     entries (primary and redundant), and a table before the directory
//     entries that point at it (tables are allocated on demand when a
//     directory entry is empty).
//   - Zeroed grains (GTE 1 with the header flag) are used by WriteZeroes
//     for whole grains where the extent enables them.
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
//   - Extent file names resolve against the descriptor's directory;
//     absolute names and ".." are refused unless the open option
//     allow_unsafe_extents is on or the container allows unsafe paths
//     (OpenOptions.AllowUnsafeBacking, which the CLI sets as qemu-img
//     follows any path). fullDevice, partitionedDevice and raw
//     device map descriptors are refused.
//   - Untrusted fields are bounded before use: descriptors at 1 MiB and
//     4096 extents, grains at 2 MiB and powers of two, grain tables at 512
//     entries, directories at 32 Mi entries and inside the file, at most
//     8192 grain tables cached.
package vmdk
