// Package qed is the QEMU Enhanced Disk format (qemu's "qed"), read and
// write, with backing files.
//
// # Layout (qemu's docs/interop/qed_spec.txt)
//
// All fields are little-endian. The header sits at offset 0:
//
//	 0 magic "QED\0"            4 cluster_size (bytes)
//	 8 table_size (clusters)    12 header_size (clusters)
//	16 features                 24 compat_features
//	32 autoclear_features       40 l1_table_offset
//	48 image_size (bytes)       56 backing_filename_offset (bytes)
//	60 backing_filename_size (bytes)
//
// The cluster size is a power of two from 4 KiB to 64 MiB, the table size
// a power of two from 1 to 16 clusters; the header occupies header_size
// clusters (the backing file name lives inside them). The image size is
// a multiple of 512 and at most cluster_size * entries^2, where a table
// holds entries = cluster_size*table_size/8 offsets. Features: 1 backing
// file, 2 need check (the image may be inconsistent: set before the first
// allocating write, cleared on a clean close), 4 backing format is raw (no
// probing). Unknown features refuse the image; unknown compat features
// are ignored; unknown autoclear features are cleared by a writer.
//
// The L1 table (table_size clusters) points to L2 tables of the same
// size; L2 entries point to data clusters. An entry 0 is unallocated
// (reads through to the backing file, zeros without one); an L2 entry 1
// is a zero cluster (reads zeros, also over a backing file). Every other
// offset must be cluster-aligned, past the header and inside the file
// (whose size qemu rounds down to whole clusters).
//
// # Our choices
//
//   - The L1 table stays in memory; L2 tables are loaded on demand into a
//     bounded cache. Every entry change is written through at once (the
//     cache never holds modified tables).
//   - Allocation appends whole clusters at the end of the file (as qemu
//     does): data first, then the L2 entries pointing at it; a new L2
//     table is written whole (with its first entries) before the L1 entry
//     pointing at it. Runs of new clusters in one L2 table are allocated
//     and written together; allocating writes are serialized (as in qemu)
//     so the file grows front to back, while writes to allocated clusters
//     and reads run in parallel.
//   - The need-check flag is written to the header before the first
//     metadata change of a session and cleared by Flush (after syncing
//     everything it covers) and Close, as qemu's timer and close do.
//     Opening a need-check image read-write checks and repairs it (as qemu
//     does); read-only opens read it as it is.
//   - Copy-on-write (contract v2): a write covering part of an unallocated
//     cluster of an image that records a backing file writes nothing and
//     returns a driver.FillError for the request extended to the whole
//     clusters at its head and tail. Without a backing file, unallocated
//     and zero clusters are filled with zeros by the driver.
//   - WriteZeroes turns whole clusters into zero clusters (entry 1) where
//     the image has a backing file or the cluster is allocated (as qemu's
//     write-zeroes does); in a base image unallocated clusters are left as
//     they are. Without unmap, allocated clusters are zeroed in place.
//     Discard makes whole clusters unallocated. Freed data clusters become
//     holes, reused by later allocations after the next Flush (so no L2
//     entry on disk can still point at a reused cluster), and packed away
//     on Flush and Close: the last data clusters of the file move into the
//     holes (copy, sync, repoint, sync) and the file is truncated, so
//     qemu-img check finds no leaks. An L2 table at the end of the file is
//     not moved; holes below it stay until reused.
//   - Resize grows only (as qemu); the tail of an allocated last cluster
//     past the old end is zeroed.
//   - Check reports L1/L2 entries that are misaligned, inside the header or
//     past the end of the file, and clusters referenced twice (tables or
//     data) as corruptions, unreferenced clusters as leaks (qemu's
//     qed-check). Repair clears the bad and duplicate entries (qemu clears
//     only the bad ones) and removes leaks by packing. Opening a cleanly
//     closed image scans nothing (as in qemu); a request that meets a bad
//     entry fails with ErrCorrupt, and cross-links are found by check.
//   - Copy offload (extent.go): data clusters hold the guest's bytes
//     verbatim, so the image maps its runs to its file (FileExtent, pinned
//     against packing) and takes runs straight from another file
//     (CopyFrom: copy_file_range or a reflink into allocated clusters, or
//     into new ones allocated as writes allocate them, the part of a new
//     cluster the copy does not cover zeroed, then the L2 entries). A
//     convert between raw and QED on a local file system then passes no
//     data through user space. A copy into part of an unallocated cluster
//     over a backing file is refused (ErrUnsupported: it needs a fill),
//     and the convert reads and writes instead.
//   - Backing format: QED can record only "raw" (the no-probe feature);
//     Parent reports Format "raw" then, and "" otherwise (the container
//     probes the backing file).
//
// # qemu's quirks (qemu 7.2)
//
//   - qemu creates images with table_size=1 but cannot open them (its
//     table offset check needs end > start); we read and write them.
//   - qemu computes the maximum image size in 64 bits, which wraps to 0
//     for clusters of 8 MiB and more (4 MiB with tables of 4+ clusters),
//     so it cannot create those; we saturate the maximum instead.
//   - A partial write into a zero cluster of an image with a backing file
//     makes qemu fill the rest of the cluster from the backing file; we
//     fill it with zeros (the cluster read zeros before).
package qed
