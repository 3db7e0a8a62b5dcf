// Package parallels reads and writes Parallels expandable disk images
// (qemu's "parallels" format, VirtualBox's Parallels backend) and opens the
// DiskDescriptor.xml bundles that Parallels Desktop stores them in.
//
// On-disk facts this driver relies on (qemu docs/interop/parallels.txt,
// qemu block/parallels.c, VirtualBox src/VBox/Storage/Parallels.cpp):
//
//   - A 64-byte little-endian header: magic[16] ("WithoutFreeSpace" for the
//     original format, "WithouFreSpacExt" for the extended one qemu
//     creates), version u32 (= 2), heads u32, cylinders u32, tracks u32 (the
//     cluster size in 512-byte sectors), bat_entries u32, nb_sectors u64
//     (the virtual size in sectors; only its low 32 bits count in
//     "WithoutFreeSpace" images), inuse u32, data_off u32 (the data area's
//     start in sectors; 0 in old images: right after the BAT, sector
//     aligned), flags u32 (bit 0: empty image), ext_off u64 (a format
//     extension cluster holding dirty bitmaps, in sectors).
//   - inuse is 0x746F6E59 ("Ynot") while a writer has the image open; a
//     clean close stores 0 (qemu) or 0x312e3276 (Parallels). An image found
//     with the flag set was not closed cleanly: qemu checks and repairs it
//     before writing, and so do we.
//   - The BAT follows the header: bat_entries u32 entries, one per cluster
//     of the virtual disk. An entry is the cluster's file offset in sectors
//     ("WithoutFreeSpace") or in clusters ("WithouFreSpacExt"); 0 means the
//     cluster is not allocated and reads zeros (qemu records no backing file
//     for Parallels images; this driver treats every image as a base).
//   - Valid cluster offsets are at or after the data area, inside the file,
//     unique, and a whole number of clusters past data_off.
//   - qemu creates images with 1 MiB clusters by default (any multiple of
//     512), 16 heads, cylinders = sectors/16/32, data_off = the header and
//     BAT rounded up to a whole cluster, and a file holding just that. It
//     allocates clusters at the end of the data, growing the file by
//     prealloc-size (default 128 MiB, mode falloc or truncate) at a time,
//     and truncates the file to the end of the data on close.
//   - A bundle is a directory holding DiskDescriptor.xml (root element
//     Parallels_disk_image; StorageData/Storage/Image elements with GUID,
//     Type "Compressed" (an expandable image as above) or "Plain" (a flat
//     raw file) and File; Snapshots/Shot elements with GUID and ParentGUID,
//     the base's ParentGUID being all zeros) and the image files it names.
//
// What this driver does on top: a read-write open repairs an image that
// was not closed cleanly or whose BAT is damaged (entries past the end of
// the file or off the cluster grid are cleared, clusters two entries share
// get a copy each, the leaked tail is cut) and then sets the inuse flag,
// synced before any other change. New clusters come from holes that
// discards punched, else from the end of the data; either reads zeros, so a
// partial write never needs the rest of its cluster filled. Data is written
// before the BAT entry that points at it. Close cuts the file at the end of
// the last used cluster and clears the flag. Bundles open read-only, through
// OpenParams.OpenReferenced, so their file names obey the path policy.
//
// Copy offload (extent.go): clusters hold the guest's bytes verbatim, so
// the image maps its runs to its file (FileExtent, pinned against
// discards and resizes) and takes runs straight from another file
// (CopyFrom: copy_file_range or a reflink into allocated clusters or new
// ones, then the BAT entries). A convert between raw and Parallels on a
// local file system then passes no data through user space.
package parallels
