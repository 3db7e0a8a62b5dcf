// Package qcow2 is the QCOW2 image format (qemu's copy-on-write format),
// versions 2 and 3, read and write: backing files, zero clusters,
// compressed clusters (deflate and zstd), extended L2 entries with
// subclusters, refcounts of 1 to 64 bits, lazy refcounts, internal
// snapshots, external data files (also raw ones) and persistent bitmaps
// (kept, not updated), and encryption: LUKS read and write (created with
// encrypt.format=luks), qemu's legacy AES read-only (see encrypt.go).
//
// # Metadata and concurrency
//
// The active L1 table and the refcount table live in memory; L2 tables and
// refcount blocks are cached in bounded LRU caches (open options
// l2_cache_size and refcount_cache_size; by default the L2 cache covers the
// whole disk up to 32 MiB, as in qemu). Modified tables are written back
// at Flush, on Close, or when a cache holds nothing but modified tables.
// One mutex guards the metadata and is held only to look up, allocate and
// update entries: guest data is read and written without it, so requests
// to different clusters (which the container never overlaps) run in
// parallel. Structural operations (snapshots, resize, check, amend) take
// the image exclusively.
//
// # Backing files
//
// The driver records the backing file (name and format) but never opens
// or reads it: the container reads the runs Status reports as unallocated
// from the chain, and ReadAt is asked only for the image's own data. Where
// behaviour depends on a backing file, the header decides (a backing file
// name recorded or not), not the chain the container opened. A write that
// covers only part of a unit (a subcluster with extended L2 entries, else
// a cluster) that is unallocated in an image with a backing file changes
// nothing and returns a driver.FillError for the request extended to the
// whole units at its head and tail; the container reads those bytes from
// the chain and writes the extended range, which succeeds. The same holds
// for the partial units of WriteZeroes. Units the image holds (zero,
// compressed or allocated) are composed by the write itself, and without
// a backing file an unallocated unit reads zeros, so a partial write into
// one writes only its bytes (the rest of a new cluster past the end of the
// file reads zeros already). Discard makes every whole unit inside its
// range unallocated (reading through to the backing file, zeros without
// one). Growing the disk zeroes the image's own data left past the old end
// in its last cluster; the container zeroes what a larger backing file
// would show in the grown range.
//
// # Crash safety
//
// Data is written before the L2 entries that point to it, L2 tables before
// the L1 entries that point to them, refcount increases before any
// reference and refcount decreases after the last reference is gone, each
// step separated by a sync (see Flush); the header moves to a new L1 or
// refcount table only once that table is durable. A cluster freed by a
// write, a discard or a zero write is not reused before the flush that
// made the freeing durable, because until then an old L2 entry on disk may
// still point at it. A crash therefore can leak clusters but neither
// exposes another guest cluster's data nor loses flushed data; this holds
// both for disks that keep only synced writes and for disks that keep any
// prefix of the writes in order. With lazy_refcounts refcounts are written
// only on close, the dirty bit is set (and synced) before the first L2 or
// L1 write they do not cover, and opening a dirty image read-write
// rebuilds the refcounts (as qemu does).
//
// # Allocation
//
// Free clusters are found with a forward scan from a hint (reusing freed
// clusters after a flush, growing the file otherwise); freed clusters are
// punched out of the file once the freeing is durable. The refcount table
// grows by moving it, with new refcount blocks, past the area it covers.
// Data writes that touch metadata (a hostile or corrupt L2 entry) are
// refused and mark the image corrupt, as qemu's overlap checks do.
//
// # Compressed clusters
//
// CompressedWriter (convert -c) compresses whole clusters in parallel on
// all cores and writes them in call order, packed like qemu packs them.
// Deflate output comes from our own encoder (internal/deflate (Window 4096)) because
// qemu inflates with a 4 KiB window, which general deflate encoders do not
// respect; it compresses at least as well as zlib's default level with
// about half its CPU. zstd uses klauspost/compress at its "better" level,
// which is no larger than zstd's default (qemu's). Reads decompress at
// most one cluster whatever the stream holds.
//
// # Checks, snapshots, bitmaps
//
// Check counts every reference (header, tables, snapshots, bitmaps, data
// and compressed sectors) and compares with the refcounts the way qemu-img
// check does; RepairLeaks lowers leaked counts, RepairAll also rebuilds
// the refcount structure (written past everything in use, then switched to
// by the header) when counts are too low, and fixes copied flags and
// entries pointing outside the file. Internal snapshots can be created,
// applied, deleted, and read without applying them (SnapshotOpener).
// Persistent dirty bitmaps are read, listed by Info and kept intact with
// their clusters accounted for. We do not track writes in them, so before
// the first write to an image with enabled ("auto") bitmaps their in-use
// flag is set, which declares them inconsistent (qemu then refuses to use
// them until they are removed or re-created); disabled bitmaps do not
// track writes and stay valid. The bitmaps autoclear bit stays set, so
// qemu still accounts for their clusters.
//
// # File names
//
// A relative external data file name is resolved against the image's
// directory, then, if missing there, against the working directory (where
// qemu resolves it).
package qcow2

import (
	"encoding/binary"
	"io"

	"github.com/vdisk/vdisk/driver"
)

func init() { driver.Register(Format) }

// Format is the qcow2 format descriptor.
var Format = &driver.Format{
	Name:        "qcow2",
	Extensions:  []string{"qcow2", "qcow", "qc2"},
	Description: "QEMU copy-on-write image, version 2 and 3",
	Caps: driver.CapCreateFixed | driver.CapCreateDynamic | driver.CapDiff | driver.CapDiscard |
		driver.CapZero | driver.CapResize | driver.CapCompress | driver.CapSnapshots | driver.CapCheck |
		driver.CapWrite,
	CreateOptions: append([]driver.Option{
		{Name: "compat", Type: driver.TypeEnum, Default: "1.1", Values: []string{"0.10", "1.1", "v2", "v3"},
			Doc: "compatibility level: 0.10 (version 2) or 1.1 (version 3)"},
		{Name: "cluster_size", Type: driver.TypeSize, Default: "64K", Min: 512, Max: 2 << 20, PowerOf2: true,
			Doc: "qcow2 cluster size"},
		{Name: "extended_l2", Type: driver.TypeBool, Default: "off",
			Doc: "extended L2 tables (32 subclusters per cluster; clusters of 16K or more)"},
		{Name: "refcount_bits", Type: driver.TypeInt, Default: "16", Min: 1, Max: 64, PowerOf2: true,
			Doc: "width of a reference count entry in bits"},
		{Name: "lazy_refcounts", Type: driver.TypeBool, Default: "off",
			Doc: "postpone refcount updates (compat=1.1 only)"},
		{Name: "preallocation", Type: driver.TypeEnum, Default: "off", Values: []string{"off", "metadata", "falloc", "full"},
			Doc: "preallocation mode: off, metadata, falloc, full"},
		{Name: "data_file", Type: driver.TypeString,
			Doc: "file name of an external data file"},
		{Name: "data_file_raw", Type: driver.TypeBool, Default: "off",
			Doc: "the external data file is a consistent raw image"},
		{Name: "compression_type", Type: driver.TypeEnum, Default: "zlib", Values: []string{"zlib", "zstd"},
			Doc: "compression method of compressed clusters"},
	}, encryptCreateOptions...),
	OpenOptions: []driver.Option{
		{Name: "encrypt.key-secret", Type: driver.TypeString,
			Doc: "id of the secret with the passphrase of an encrypted image (--object secret,id=ID,...)"},
		{Name: "l2_cache_size", Type: driver.TypeSize, Min: 0, Max: 1 << 40,
			Doc: "maximum size of the L2 table cache (default: covers the disk, up to 32M)"},
		{Name: "refcount_cache_size", Type: driver.TypeSize, Min: 0, Max: 1 << 40,
			Doc: "maximum size of the refcount block cache"},
		{Name: "data_file", Type: driver.TypeString,
			Doc: "external data file to use instead of the one the image names"},
	},
	Probe:  probe,
	Create: create,
	Open:   open,
}

func probe(r io.ReaderAt, size int64) int {
	var b [8]byte
	if size < 8 {
		return 0
	}
	if n, _ := r.ReadAt(b[:], 0); n < 8 {
		return 0
	}
	if binary.BigEndian.Uint32(b[:]) != qcowMagic {
		return 0
	}
	if v := binary.BigEndian.Uint32(b[4:]); v == 2 || v == 3 {
		return 100
	}
	return 50
}
