// Package qcow is qemu's original copy-on-write format, QCOW version 1
// (qemu's format name "qcow"; VirtualBox's QCOW backend reads it too):
// read and write, backing files, zlib-compressed clusters. AES-encrypted
// images are refused with ErrUnsupported.
//
// # Layout
//
// Everything is big-endian. The 48-byte header holds the magic "QFI\xfb",
// the version (1), the offset and length of the backing file name (no
// NUL; at most 1023 bytes, as qemu accepts), a modification time qemu
// never updates, the virtual size in bytes (qemu uses it rounded down to
// whole 512-byte sectors), cluster_bits (9..16), l2_bits (the L2 table
// holds 2^l2_bits 8-byte entries, 6..13, so tables are 512 bytes to
// 64 KiB), the encryption method (0 none, 1 AES) and the offset of the L1
// table. The L1 table has ceil(size / 2^(cluster_bits+l2_bits)) entries
// holding file offsets of L2 tables (0: none); L2 entries hold file
// offsets of data clusters (0: unallocated, reading through to the backing
// file, or zeros without one). There are no refcounts, no zero clusters
// and no header extensions; qemu-img cannot check the format.
//
// A compressed cluster has bit 63 set; the next cluster_bits bits down
// from bit 62 hold the compressed length in bytes (so it is below the
// cluster size) and the low 63-cluster_bits bits the byte offset of the
// raw deflate stream (RFC 1951, no zlib header), which need not be
// aligned. The stream must inflate to a whole cluster; qemu accepts a
// stream that holds more and ignores the rest, and so do we. Normal data
// clusters must be 512-byte aligned (qemu fails the I/O otherwise).
//
// qemu-img create writes the header, the backing file name right after
// it, the L1 table at the next 8-byte boundary (padded with zeros to a
// whole sector), and picks the geometry itself: 4 KiB clusters with
// 512-entry L2 tables, or, with a backing file, 512-byte clusters with
// 4096-entry L2 tables (so that copy-on-write copies little). It records
// no backing format (backing_fmt is only checked to name a known format),
// so the container probes the backing file. qemu allocates at the end of
// the file: new L2 tables and data clusters at the next cluster boundary,
// compressed streams right at the end. It has no discard, no
// write-zeroes, no resize and no check for this format; a write into a
// compressed cluster decompresses it and writes the whole cluster anew
// at the end of the file (the old stream leaks). qemu does no
// copy-on-write inside a cluster: the rest of a cluster it allocates for
// a partial write reads zeros, not the backing file (harmless with its
// 512-byte clusters over a backing file, lossy with larger ones).
//
// # Our choices
//
//   - Create makes exactly qemu's layout (same geometry, same header, L1
//     padded to a sector), so qemu-img compare and qemu-io accept what we
//     write. Options are qemu's: encryption=on and encrypt.format=aes are
//     refused; backing_fmt is taken by the container and not stored.
//   - Allocation is at the end of the file as in qemu, but ordered for
//     crash safety: data is written before the L2 entry pointing at it,
//     and a new L2 table (with its first entries) before the L1 entry
//     pointing at it. A crash can leak space at the end of the file but
//     never makes an entry point at unwritten space. Flush syncs the file;
//     nothing is cached dirty (entries are written through), so Close
//     only closes.
//   - Runs of clusters a write allocates get contiguous file space, one
//     data write and one write of their L2 entries per table.
//   - In an image without a backing file, clusters that would hold only
//     zeros are not allocated (they read zeros unallocated).
//   - Copy-on-write (contract v2): a write that covers only part of an
//     unallocated cluster of an image with a backing file name writes
//     nothing and returns a *driver.FillError for the request extended to
//     the whole clusters at its ends; compressed clusters are the image's
//     own and are decompressed and rewritten as qemu does.
//   - No Discarder, Zeroer or Resizer: qemu has none for this format and
//     the format has no zero state, so the container writes zero buffers.
//     MakeEmpty (after a commit) clears the L1 table and truncates the
//     file, as qemu's make_empty does.
//   - CompressedWriter (convert -c) compresses clusters on every core with
//     klauspost/compress's raw deflate limited to a 4 KiB window (zlib's
//     windowBits -12, what qemu uses) and stores them in call order,
//     densely packed; clusters that do not shrink are stored normally.
//   - Hostile images: the L1 table must lie inside the file (so its memory
//     is bounded by the file size) and not overlap the header; L2 tables
//     must lie inside the file, clear of the header and L1 table. Data
//     clusters that are unaligned or past the end of the file, and
//     compressed streams of length 0, past the end of the file, or
//     inflating to less than a cluster, are ErrCorrupt when met (a
//     compressed length field cannot exceed a cluster). Inflation reads
//     at most one cluster of stream and produces exactly one cluster, so
//     a decompression bomb costs one cluster. Writes through a corrupt
//     entry (or one pointing into the header or L1 table) are refused.
//     L2 tables are cached in a bounded LRU cache, and one Status call
//     looks at a bounded number of entries (tables that are absent or
//     hold no entries count as one), so a huge disk mapped by a few
//     repeated tables cannot make a call take unbounded time.
//   - Parent returns the backing file name without a format (qcow has
//     none), so the container probes the backing file; a raw backing file
//     must then be named with its format when opening (vdisk never guesses
//     raw for a backing file), and Create warns when asked to record one.
package qcow
