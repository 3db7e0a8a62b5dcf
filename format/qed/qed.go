package qed

import (
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/vdisk/vdisk/driver"
)

func init() { driver.Register(Format) }

// Format is the QED format descriptor.
var Format = &driver.Format{
	Name:        "qed",
	Extensions:  []string{"qed"},
	Description: "QEMU Enhanced Disk",
	Caps: driver.CapCreateDynamic | driver.CapDiff | driver.CapDiscard | driver.CapZero |
		driver.CapResize | driver.CapCheck | driver.CapWrite,
	CreateOptions: []driver.Option{
		{Name: "cluster_size", Type: driver.TypeSize, Default: "64K", Min: minClusterSize, Max: maxClusterSize, PowerOf2: true,
			Doc: "cluster size (4K to 64M, a power of two)"},
		{Name: "table_size", Type: driver.TypeSize, Default: "4", Min: minTableSize, Max: maxTableSize, PowerOf2: true,
			Doc: "L1/L2 table size in clusters (1 to 16, a power of two); qemu cannot open images with table_size=1"},
	},
	Probe:  probe,
	Create: create,
	Open:   open,
}

func probe(r io.ReaderAt, size int64) int {
	if size < headerLen {
		return 0
	}
	var b [4]byte
	if _, err := r.ReadAt(b[:], 0); err != nil {
		return 0
	}
	if binary.LittleEndian.Uint32(b[:]) != magic {
		return 0
	}
	return 100
}

// l2Table is a cached L2 table; entries are read and written atomically
// (lookups run without the metadata lock's protection of the slice
// contents).
type l2Table struct{ e []uint64 }

// image is an open QED image.
//
// Locking: mu is held shared by every data access and exclusively by the
// operations that move clusters or change the layout (pack, resize,
// check, repair). meta guards the header, the L1 table, the L2 cache, the
// end of the file and the free lists, and every write of metadata.
// Table entries are loaded and stored atomically.
type image struct {
	f    driver.File
	name string
	ro   bool
	log  *slog.Logger

	mu   sync.RWMutex
	meta sync.Mutex
	// allocMu serializes allocating writes (as qemu's QED does), so the
	// file grows front to back, in one stream.
	allocMu sync.Mutex

	size atomic.Int64

	cs, ts     int64 // cluster size, table size (clusters)
	shift      uint  // log2(cs)
	nelems     int64 // entries per table
	tableBytes int64
	hdrBytes   int64

	// Guarded by meta.
	hdr       header
	l1        []uint64
	l2        map[int64]*l2Table
	l2Bytes   int64
	fileEnd   int64   // end of the last whole cluster: where allocation appends
	holes     []int64 // free data clusters, reusable now
	pending   []int64 // freed since the last flush: reusable after it
	onDiskNC  bool    // the header on disk has the need-check flag
	broken    string  // why writes are refused until a repair
	cacheMax  int64
	packNeeds bool // holes may be packed away
}

// l2CacheBytes bounds the L2 cache (tables are dropped, never written
// back: the cache holds no modified table).
var l2CacheBytes int64 = 32 << 20

func open(ctx context.Context, p *driver.OpenParams) (driver.Image, error) {
	flag := driver.ReadOnly
	if !p.ReadOnly {
		flag = driver.ReadWrite
	}
	f, err := p.Storage.Open(p.Name, flag)
	if err != nil {
		return nil, err
	}
	im, err := load(ctx, f, p.Name, p.ReadOnly, p.Logger)
	if err != nil {
		f.Close()
		return nil, err
	}
	return im, nil
}

func load(ctx context.Context, f driver.File, name string, ro bool, log *slog.Logger) (*image, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	fileSize, err := f.Size()
	if err != nil {
		return nil, driver.WithFile(err, "open", name)
	}
	h, err := readHeader(f, name, fileSize)
	if err != nil {
		return nil, err
	}
	im := newImage(f, name, ro, log, *h)
	im.fileEnd = fileSize &^ (im.cs - 1)
	im.onDiskNC = h.features&featNeedCheck != 0
	// The table lies inside the file (readHeader checked it); it is read
	// in pieces so that only the decoded table takes memory.
	raw := make([]byte, min(im.tableBytes, 1<<20))
	for done := int64(0); done < im.tableBytes; done += int64(len(raw)) {
		if err := driver.ReadFullAt(f, raw, int64(h.l1Offset)+done); err != nil {
			return nil, driver.WithFile(err, "read L1 table", name)
		}
		for i := range int64(len(raw)) / 8 {
			im.l1[done/8+i] = binary.LittleEndian.Uint64(raw[8*i:])
		}
	}
	if ro {
		return im, nil
	}
	if h.autoclear&^knownAutoclear != 0 {
		// Knock out the autoclear features we do not maintain, as qemu does.
		im.hdr.autoclear &= knownAutoclear
		if err := im.writeHeader(); err != nil {
			return nil, err
		}
	}
	if im.onDiskNC {
		// Not closed cleanly: check and repair, as qemu does on open.
		res, err := im.check(ctx, driver.RepairAll)
		if err != nil {
			return nil, err
		}
		if res.Corruptions > 0 {
			log.Warn("QED image needs repair", "file", name, "corruptions", res.Corruptions)
		}
	}
	// A cleanly closed image is not scanned (opening stays cheap, as in
	// qemu): entries are validated when a request uses them, and check
	// finds cross-links.
	return im, nil
}

func newImage(f driver.File, name string, ro bool, log *slog.Logger, h header) *image {
	cs, ts := int64(h.clusterSize), int64(h.tableSize)
	im := &image{f: f, name: name, ro: ro, log: log, hdr: h, cs: cs, ts: ts,
		nelems: cs * ts / 8, tableBytes: cs * ts, hdrBytes: int64(h.headerSize) * cs,
		l2: map[int64]*l2Table{}, cacheMax: max(l2CacheBytes, 2*cs*ts)}
	for im.cs>>im.shift > 1 {
		im.shift++
	}
	im.l1 = make([]uint64, im.nelems)
	im.size.Store(int64(h.imageSize))
	return im
}

func create(ctx context.Context, p *driver.CreateParams) (driver.Image, error) {
	cs := p.Options.Int("cluster_size")
	if cs == 0 {
		cs = defaultClusterSize
	}
	ts := p.Options.Int("table_size")
	if ts == 0 {
		ts = defaultTableSize
	}
	if !validClusterSize(cs) || !validTableSize(ts) {
		return nil, driver.OptionErrorf("QED cluster size %d or table size %d out of range", cs, ts)
	}
	if p.Size < 0 {
		return nil, driver.OptionErrorf("negative size %d", p.Size)
	}
	// The maximum is a multiple of 512: rounding up a size below it (as
	// qemu-img does) cannot pass it.
	mx := maxImageSize(cs, ts)
	size := p.Size
	if size <= mx {
		size = (size + 511) &^ 511
	}
	if size > mx {
		return nil, driver.OptionErrorf("size %d is too large for QED with %d-byte clusters and %d-cluster tables (at most %d)", p.Size, cs, ts, mx)
	}
	h := header{clusterSize: uint32(cs), tableSize: uint32(ts), headerSize: 1, l1Offset: uint64(cs), imageSize: uint64(size)}
	if ref := p.ParentRef; ref != nil {
		if ref.Name == "" {
			return nil, driver.OptionErrorf("QED records the backing file by name; an empty name cannot be recorded")
		}
		if len(ref.Name) > int(min(cs-headerLen, maxBackingName)) {
			return nil, driver.OptionErrorf("backing file name too long (%d bytes)", len(ref.Name))
		}
		h.features |= featBacking
		h.backOff, h.backSize, h.backing = headerLen, uint32(len(ref.Name)), ref.Name
		if ref.Format == "raw" {
			h.features |= featRawNoProbe
		}
	}
	flag := driver.ReadWrite | driver.Create
	if !p.Overwrite {
		flag |= driver.Excl
	}
	f, err := p.Storage.Open(p.Name, flag)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (driver.Image, error) {
		f.Close()
		return nil, driver.WithFile(err, "create", p.Name)
	}
	// The file starts empty (as qemu makes it) but for the first byte:
	// the header cluster is written whole, the L1 table is zeros.
	if err := driver.ClearForCreate(f); err != nil {
		return fail(err)
	}
	first := make([]byte, cs)
	copy(first, h.encode())
	copy(first[headerLen:], h.backing)
	if _, err := f.WriteAt(first, 0); err != nil {
		return fail(err)
	}
	if err := f.Truncate(cs + cs*ts); err != nil {
		return fail(err)
	}
	log := p.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	im := newImage(f, p.Name, false, log, h)
	im.fileEnd = cs + cs*ts
	return im, nil
}

// Size is the virtual size.
func (im *image) Size() int64 { return im.size.Load() }

// writeHeader writes the fixed header fields (the backing file name after
// them is left as it is). The caller holds meta or owns the image alone.
func (im *image) writeHeader() error {
	if _, err := im.f.WriteAt(im.hdr.encode(), 0); err != nil {
		return driver.WithFile(err, "write header", im.name)
	}
	im.onDiskNC = im.hdr.features&featNeedCheck != 0
	return nil
}

// allocData sets the need-check flag and allocates k clusters for new
// data (the writes that fill them, then the entries that point at them,
// follow). The caller holds allocMu.
func (im *image) allocData(k int64) (int64, error) {
	im.meta.Lock()
	defer im.meta.Unlock()
	if err := im.markNeedCheck(); err != nil {
		return 0, err
	}
	return im.allocLocked(k, false)
}

// markNeedCheck sets the need-check flag on disk before the first metadata
// change of a session. The caller holds meta.
func (im *image) markNeedCheck() error {
	if im.onDiskNC {
		return nil
	}
	im.hdr.features |= featNeedCheck
	return im.writeHeader()
}

// Flush packs freed clusters away, syncs, and clears the need-check flag
// (after the sync that made everything it covers durable), as qemu does
// once its allocating writes drain.
func (im *image) Flush() error {
	if im.ro {
		return nil
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.flushLocked(true)
}

// flushLocked does Flush's work; the caller holds mu exclusively. final
// false (Close) syncs only when freed clusters wait for a sync before they
// can be packed away, and clears the need-check flag without a sync: the
// container flushes before closing unless the user chose an unsafe cache
// mode, where qemu's close does the same (its flush is then a no-op).
func (im *image) flushLocked(final bool) error {
	im.meta.Lock()
	nc := im.onDiskNC
	if (nc && final) || len(im.pending) > 0 {
		if err := im.f.Sync(); err != nil {
			im.meta.Unlock()
			return driver.WithFile(err, "sync", im.name)
		}
		// Clusters freed before the sync cannot be pointed at from disk
		// any more: they may be reused, or packed away.
		im.holes = append(im.holes, im.pending...)
		im.pending = nil
	}
	im.meta.Unlock()
	if err := im.pack(); err != nil {
		return err
	}
	im.meta.Lock()
	defer im.meta.Unlock()
	if nc && im.broken == "" {
		im.hdr.features &^= featNeedCheck
		if err := im.writeHeader(); err != nil {
			return err
		}
		if final {
			if err := im.f.Sync(); err != nil {
				return driver.WithFile(err, "sync", im.name)
			}
		}
	}
	return nil
}

// Close packs freed clusters away and clears the need-check flag if it is
// set (qemu's clean shutdown), and closes the file.
func (im *image) Close() error {
	var first error
	if !im.ro {
		im.mu.Lock()
		first = im.flushLocked(false)
		im.mu.Unlock()
	}
	if err := im.f.Close(); err != nil && first == nil {
		first = err
	}
	return first
}

// Info describes the image; Dirty is the need-check flag.
func (im *image) Info() driver.Info {
	im.meta.Lock()
	defer im.meta.Unlock()
	h := &im.hdr
	s := &Info{
		ClusterSize:       int64(h.clusterSize),
		TableSize:         int64(h.tableSize),
		HeaderSize:        int64(h.headerSize),
		L1TableOffset:     int64(h.l1Offset),
		Features:          h.features,
		CompatFeatures:    h.compat,
		AutoclearFeatures: h.autoclear,
		NeedCheck:         h.features&featNeedCheck != 0,
		BackingFile:       h.backing,
	}
	if h.features&featBacking != 0 && h.features&featRawNoProbe != 0 {
		s.BackingFormat = "raw"
	}
	return driver.Info{Format: "qed", VirtualSize: im.Size(), ClusterSize: im.cs, Dirty: s.NeedCheck, Specific: s}
}

// Info is the format-specific information `info` shows. qemu-img shows
// no format-specific block for QED; the names follow the header fields.
type Info struct {
	ClusterSize       int64  `json:"cluster-size"`
	TableSize         int64  `json:"table-size"`
	HeaderSize        int64  `json:"header-size"`
	L1TableOffset     int64  `json:"l1-table-offset"`
	Features          uint64 `json:"features"`
	CompatFeatures    uint64 `json:"compat-features"`
	AutoclearFeatures uint64 `json:"autoclear-features"`
	NeedCheck         bool   `json:"need-check"`
	BackingFile       string `json:"backing-file,omitempty"`
	BackingFormat     string `json:"backing-format,omitempty"`
}

// Parent returns the recorded backing file; its format only when the
// image records it as raw (the no-probe feature).
func (im *image) Parent() *driver.ParentRef {
	im.meta.Lock()
	defer im.meta.Unlock()
	return im.parentLocked()
}

func (im *image) parentLocked() *driver.ParentRef {
	if im.hdr.features&featBacking == 0 {
		return nil
	}
	ref := &driver.ParentRef{Name: im.hdr.backing}
	if im.hdr.features&featRawNoProbe != 0 {
		ref.Format = "raw"
	}
	return ref
}

// hasBacking reports whether the image records a backing file: its
// unallocated clusters show the backing file's content.
func (im *image) hasBacking() bool {
	im.meta.Lock()
	defer im.meta.Unlock()
	return im.hdr.features&featBacking != 0
}
