package driver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
)

// State is what a byte range of one image holds.
type State uint8

const (
	// Unallocated: the image holds nothing here; reads fall through to the
	// parent, or read as zeros in an image without a parent.
	Unallocated State = iota
	// Data: the image holds data here (which may happen to be zeros).
	Data
	// Zero: the image records that the range reads as zeros.
	Zero
)

func (s State) String() string {
	switch s {
	case Unallocated:
		return "unallocated"
	case Data:
		return "data"
	case Zero:
		return "zero"
	}
	return "invalid"
}

// Extent is a run of one state. A driver's Status fills State, Length,
// Offset and Compressed for the run starting at the offset it was asked
// about. The container's status walk over a whole chain (vdisk.Disk.Status
// and Map, the same type as vdisk.Extent) also fills Start, Depth and File;
// there, Unallocated means that no layer holds the run, so it reads zeros.
type Extent struct {
	State  State
	Length int64
	// Offset is the byte offset in the image file where the data of the run
	// starts (for Data runs stored contiguously), or -1.
	Offset int64
	// Compressed marks data stored compressed.
	Compressed bool

	// Start is the run's virtual offset (chain runs).
	Start int64
	// Depth is the index of the layer holding the run (0 = top); for runs
	// no layer holds, the chain length (chain runs).
	Depth int
	// File is the name of the layer holding the run, "" when none (chain
	// runs).
	File string
}

// Present reports whether the run is held (data or zeros) rather than
// unallocated.
func (e Extent) Present() bool { return e.State != Unallocated }

// IsData reports whether the run is stored data (which may happen to be
// zeros).
func (e Extent) IsData() bool { return e.State == Data }

// ReadsZero reports, for a chain run, whether it reads as zeros: a Zero
// run, or one no layer holds.
func (e Extent) ReadsZero() bool { return e.State != Data }

// ParentRef is the parent (backing) reference an image records.
type ParentRef struct {
	// Name is the parent file name as recorded (relative names resolve
	// against the child's directory). May be empty when only UUID is known.
	Name string
	// Format is the parent's recorded format name; empty when not recorded.
	Format string
	// UUID and ModUUID identify the parent where the format records them.
	UUID    string
	ModUUID string
}

// FillError is what WriteAt (and WriteZeroes) return, having written
// nothing, when the request covers only part of an allocation unit that the
// image does not hold (Unallocated) and whose rest must keep reading what
// the chain below shows: VD's "block free" answer with its pre- and
// post-read sizes. The container then reads [Off, Off+Len) around the
// request from the chain, under the range lock it already holds, and
// re-issues the write extended to that range (which contains the original
// one and covers whole units). Off and Len are byte offsets of the virtual
// disk.
//
// A driver never reads another layer: an image that records no parent may
// fill such a unit with zeros itself (or leave holes) instead of asking,
// and a format whose unit is as fine as the write (VHD sector bitmaps,
// qcow2 subclusters at sector granularity) never asks.
type FillError struct {
	File     string
	Off, Len int64
}

func (e *FillError) Error() string {
	return fmt.Sprintf("%s: write needs [%d, %d) filled from the chain below (copy-on-write)", e.File, e.Off, e.Off+e.Len)
}

// NeedFill builds the FillError asking for [off, end) to be written whole.
func NeedFill(file string, off, end int64) error {
	return &FillError{File: file, Off: off, Len: end - off}
}

// AsFill reports whether err asks for a copy-on-write fill.
func AsFill(err error) (*FillError, bool) {
	if err == nil {
		return nil, false // without the allocation errors.As's target costs
	}
	var fe *FillError
	if errors.As(err, &fe) {
		return fe, true
	}
	return nil, false
}

// Image is one open image (one layer of a chain).
//
// Concurrency: an Image must be safe for concurrent use. The container never
// issues a WriteAt concurrently with another request overlapping the same
// cluster (see Info.ClusterSize) but issues non-overlapping requests in
// parallel; drivers protect their shared metadata themselves.
//
// Offsets and lengths are bytes; requests lie within [0, Size()).
//
// Drivers hold no chain logic (contract v2): ReadAt is only asked for runs
// the image reported as Data by Status (anything else is a caller bug and
// may fail), and a write into part of a unit the image does not hold
// answers with a *FillError instead of reading the parent.
type Image interface {
	// Size is the virtual size in bytes.
	Size() int64
	// Status reports the run starting at off, at most n bytes long (n > 0).
	Status(off, n int64) (Extent, error)
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Flush makes every completed write durable.
	Flush() error
	Close() error
	// Info describes the image for `info`.
	Info() Info
	// Parent returns the recorded parent reference, or nil.
	Parent() *ParentRef
}

// Info is what `info` shows about one image.
type Info struct {
	Format      string
	VirtualSize int64
	// ClusterSize is the allocation unit (0 for none, e.g. raw).
	ClusterSize int64
	Dirty       bool
	// Encrypted is set for an encrypted image (qemu-img info's
	// "encrypted"); EncryptFormat names the scheme ("luks", "aes").
	Encrypted     bool
	EncryptFormat string
	// Specific is format-specific information, JSON-marshalable; shown as
	// qemu-img's "format-specific": {"type": Format, "data": Specific}.
	Specific any
}

// Zeroer writes zeros efficiently. With unmap the driver may deallocate
// (still reading zeros afterwards, also in a diff image).
type Zeroer interface {
	WriteZeroes(off, n int64, unmap bool) error
}

// Discarder deallocates a range: every whole allocation unit inside it
// becomes Unallocated (reading through to the parent in a diff image, zeros
// in a base); parts of units may be left as they are. Callers needing zeros
// use WriteZeroes. The container's compaction relies on this.
type Discarder interface {
	Discard(off, n int64) error
}

// Resizer changes the virtual size. Growing reads zeros in the new range.
type Resizer interface {
	Resize(ctx context.Context, size int64, prealloc string) error
}

// RepairMode selects what Check fixes.
type RepairMode int

const (
	RepairNone RepairMode = iota
	RepairLeaks
	RepairAll
)

// CheckResult reports consistency, with qemu-img check's fields.
type CheckResult struct {
	Corruptions        int      `json:"corruptions,omitempty"`
	Leaks              int      `json:"leaks,omitempty"`
	CheckErrors        int      `json:"check-errors,omitempty"`
	CorruptionsFixed   int      `json:"corruptions-fixed,omitempty"`
	LeaksFixed         int      `json:"leaks-fixed,omitempty"`
	AllocatedClusters  int64    `json:"allocated-clusters,omitempty"`
	TotalClusters      int64    `json:"total-clusters,omitempty"`
	FragmentedClusters int64    `json:"fragmented-clusters,omitempty"`
	CompressedClusters int64    `json:"compressed-clusters,omitempty"`
	ImageEndOffset     int64    `json:"image-end-offset,omitempty"`
	Messages           []string `json:"-"`
}

// Checker checks (and optionally repairs) the image's metadata.
type Checker interface {
	Check(ctx context.Context, mode RepairMode) (*CheckResult, error)
}

// Progress reports done out of total units of work.
type Progress func(done, total int64)

// Compacter packs the image file: it moves allocated units into the holes
// that discarded units left and shrinks the file. The container first finds
// the units that are all zeros or equal to the chain below and discards
// them (VD's PARENTSTATE compaction); Compact only reorganises the file.
type Compacter interface {
	Compact(ctx context.Context, progress Progress) error
}

// Snapshot is an internal snapshot.
type Snapshot struct {
	ID          string `json:"id"`
	Name        string `json:"name"`
	VMStateSize int64  `json:"vm-state-size"`
	DateSec     int64  `json:"date-sec"`
	DateNsec    int64  `json:"date-nsec"`
	VMClockNsec int64  `json:"vm-clock-nsec"`
	VMClockSec  int64  `json:"vm-clock-sec"`
	ICount      int64  `json:"icount,omitempty"`
}

// Snapshotter manages internal snapshots.
type Snapshotter interface {
	Snapshots() ([]Snapshot, error)
	CreateSnapshot(name string) error
	ApplySnapshot(name string) error
	DeleteSnapshot(name string) error
}

// Amender is implemented by images whose creation options can be changed
// in place (qemu-img amend). opts are the -o pairs as given; the driver
// validates them and refuses, before changing anything, options it cannot
// amend.
type Amender interface {
	Amend(ctx context.Context, opts []KV) error
}

// SnapshotOpener is implemented by images that can show an internal
// snapshot read-only without applying it (convert -l, measure -l). key is
// the snapshot's ID or, when no ID matches, its name. The returned image
// shares the image's files: close it before the image.
type SnapshotOpener interface {
	OpenSnapshot(key string) (Image, error)
}

// Identifier exposes the image's UUIDs. Empty strings mean "not recorded".
type Identifier interface {
	UUID() string
	ModificationUUID() string
	ParentUUID() string
	ParentModificationUUID() string
	SetUUID(u string) error
	SetModificationUUID(u string) error
	SetParentUUID(u string) error
	SetParentModificationUUID(u string) error
}

// CHS is a cylinder/head/sector geometry.
type CHS struct {
	Cylinders uint32 `json:"cylinders"`
	Heads     uint32 `json:"heads"`
	Sectors   uint32 `json:"sectors"`
}

// Geometry exposes physical and logical CHS geometry; ok is false when the
// image records none.
type Geometry interface {
	PCHS() (g CHS, ok bool)
	LCHS() (g CHS, ok bool)
	SetPCHS(g CHS) error
	SetLCHS(g CHS) error
}

// Commenter exposes a free-text image comment.
type Commenter interface {
	Comment() string
	SetComment(s string) error
}

// Reparenter rewrites the recorded parent reference (rebase -u, commit,
// merge); nil makes the image standalone.
type Reparenter interface {
	SetParent(ref *ParentRef) error
}

// Emptier makes every cluster of the image unallocated (reads fall through
// to the parent again), as qemu's make-empty does after a commit.
type Emptier interface {
	MakeEmpty() error
}

// CompressedWriter is implemented by images that store whole clusters
// compressed (qcow2; `convert -c`). WriteCompressed stores p at off
// compressed; off is a multiple of CompressedUnit() and p one unit long (or
// shorter when it ends at the end of the disk). The call may return before
// the data is stored; Flush reports errors of earlier calls. Callers issue
// the calls in increasing offset order so the file is written sequentially.
type CompressedWriter interface {
	CompressedUnit() int64
	WriteCompressed(p []byte, off int64) error
}

// CompressedLender is implemented by CompressedWriters that can work on
// the caller's buffer instead of a copy of it (a compressed convert then
// reads each cluster once, into the buffer the compressor reads).
//
// WriteCompressedLent is WriteCompressed, except that the image may keep
// using p after the call returns: it calls release exactly once, from any
// goroutine, when it no longer reads p, and the caller must not change p
// before that. When the call returns an error, release is not called and
// p is the caller's again.
type CompressedLender interface {
	CompressedWriter
	WriteCompressedLent(p []byte, off int64, release func()) error
}

// StreamOnly is implemented by images that can only be filled once, front
// to back (VMDK streamOptimized). When StreamOnly reports true, Convert
// writes such a target through its CompressedWriter in increasing offset
// order, as with `convert -c`, whether or not compression was asked for.
type StreamOnly interface {
	StreamOnly() bool
}

// OpenParams is what a driver's Open receives.
type OpenParams struct {
	Storage Storage
	Name    string
	// ReadOnly opens without write access; InfoOnly may skip loading data
	// structures not needed by Info/Parent.
	ReadOnly bool
	InfoOnly bool
	// Direct asks for O_DIRECT where supported.
	Direct bool
	// Options are the format's declared options, validated.
	Options Values
	Logger  *slog.Logger
	// Paths is the policy for file names recorded in the image (extent
	// files, an external data file): drivers open them only through
	// OpenReferenced, which applies it. The zero value is PathStrict.
	Paths PathPolicy
	// References, when not nil, collects the names OpenReferenced met
	// (followed or refused).
	References *ReferenceLog
	// Secrets unlocks encrypted images (the key-secret option names the
	// id); nil when the caller gave none.
	Secrets Secrets
}

// CreateParams is what a driver's Create receives. The driver creates the
// file Name in Storage (failing if it exists unless Overwrite), and returns
// the image open read-write.
type CreateParams struct {
	Storage   Storage
	Name      string
	Size      int64
	Options   Values
	Logger    *slog.Logger
	Overwrite bool
	// ParentRef is recorded as the parent reference for a diff image (nil
	// for a base image); ParentInfo describes the opened parent.
	ParentRef  *ParentRef
	ParentInfo *ParentInfo
	// Secrets provides the keys an encrypted image is created with.
	Secrets Secrets
}

// ParentInfo describes the opened parent of a diff image being created.
type ParentInfo struct {
	Format  string
	Size    int64
	UUID    string // empty when the parent's format records none
	ModUUID string
	// Path is the parent's name as resolved (for absolute locators).
	Path string
}
