package qcow2

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/vdisk/vdisk/driver"
)

// image is one open qcow2 image.
type image struct {
	name    string
	st      driver.Storage
	f       driver.File // the qcow2 file
	df      driver.File // where guest data lives: f, or the external data file
	extData bool        // external data file (host offset == guest offset)
	rawData bool        // data_file_raw
	dfName  string
	ro      bool
	shared  bool // a snapshot view sharing another image's files
	log     *slog.Logger
	crypt   *cryptState // encrypted images (encrypt.go); nil otherwise

	// Geometry, fixed at open.
	cbits    uint
	cs       int64
	ext      bool  // extended L2 entries
	nsc      int64 // subclusters per cluster: 32 with extended L2, else 1
	scBits   uint
	scSize   int64
	l2Bits   uint
	l2n      int64 // entries per L2 table
	esz      int64 // L2 entry size: 8 or 16
	rbBits   uint  // log2 of the entries per refcount block
	rbn      int64
	rorder   uint
	refMax   uint64
	cshift   uint   // compressed descriptors: bit where the sector count starts
	cOffMask uint64 // compressed descriptors: host offset mask
	cSecMask uint64 // compressed descriptors: sector count mask (after shift)

	// opMu is taken shared by I/O and exclusively by structural operations
	// (snapshots, resize, check, close).
	opMu sync.RWMutex
	// mu guards the metadata below. Data I/O happens without it.
	mu       sync.Mutex
	hdr      *header
	size     int64
	l1       []uint64
	l1Dirty  map[int64]bool // dirty L1 clusters (index within the table)
	l2c      *cache
	rbc      *cache
	rt       []uint64
	rtDirty  bool
	freeHint int64 // cluster index where the free-cluster scan starts
	fileEnd  int64 // end of the qcow2 file as far as we know (bytes)
	lazy     bool  // lazy refcounts in use
	hdrDirty bool  // dirty bit is set on disk
	corrupt  bool
	snaps    []snapshot
	bitmaps  []bitmapInfo
	metaSet  map[int64]uint8 // cluster index -> kind, for overlap checks
	fixed    []span          // fixed metadata ranges (cluster indexes), sorted
	disk     diskHdr         // table fields of the header on disk
	pendN    int             // refcount blocks holding pending frees
	cmpCur   int64           // compressed writes: next free byte in the current host cluster (0: none)
	closed   bool

	noSync    bool        // Close: write metadata back without syncing
	dataDirty atomic.Bool // data written since the last sync
	bmDone    atomic.Bool // bitmaps prepared for writing

	dcMu    sync.Mutex // guards the decompressed-cluster cache
	dcOff   uint64     // descriptor of the cached cluster
	dcBuf   []byte
	dcValid bool

	cwMu      sync.Mutex  // guards cw and cwLastErr
	cw        *compWriter // compressed write pipeline (nil until used)
	cwLastErr error       // error of a stopped pipeline, not yet reported
}

// span is a half-open range of cluster indexes.
type span struct{ lo, hi int64 }

const (
	metaL2 = 1
	metaRB = 2
)

func open(ctx context.Context, p *driver.OpenParams) (driver.Image, error) {
	flag := driver.ReadOnly
	if !p.ReadOnly {
		flag = driver.ReadWrite
	}
	f, err := p.Storage.Open(p.Name, flag)
	if err != nil {
		return nil, err
	}
	return openFile(ctx, f, p)
}

// openFile opens the image in the already open file f (closed on error).
func openFile(ctx context.Context, f driver.File, p *driver.OpenParams) (driver.Image, error) {
	log := p.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	im := &image{name: p.Name, st: p.Storage, f: f, df: f, ro: p.ReadOnly, log: log}
	if err := im.load(p); err != nil {
		im.closeFiles()
		return nil, err
	}
	if !im.ro {
		if err := im.openWritable(ctx, p.InfoOnly); err != nil {
			im.closeFiles()
			return nil, err
		}
	}
	return im, nil
}

func (im *image) closeFiles() {
	if im.df != nil && im.df != im.f {
		im.df.Close()
	}
	im.f.Close()
}

// load reads and validates the header and the tables every access needs.
func (im *image) load(p *driver.OpenParams) error {
	opts := p.Options
	fsize, err := im.f.Size()
	if err != nil {
		return err
	}
	first := make([]byte, min(fsize, 4096))
	if err := driver.ReadFullAt(im.f, first, 0); err != nil {
		return driver.Corruptf(im.name, 0, "cannot read the header: %v", err)
	}
	if len(first) >= 24 && be32(first) == qcowMagic {
		if cb := be32(first[20:]); cb >= minClusterBits && cb <= maxClusterBits && int64(1)<<cb > int64(len(first)) {
			first = make([]byte, min(fsize, int64(1)<<cb))
			if err := driver.ReadFullAt(im.f, first, 0); err != nil {
				return driver.Corruptf(im.name, 0, "cannot read the header: %v", err)
			}
		}
	}
	h, err := parseHeader(im.name, first, fsize)
	if err != nil {
		return err
	}
	im.hdr = h
	im.fileEnd = fsize
	im.setGeometry()
	im.disk = diskHdr{size: int64(h.size), l1Off: h.l1Offset, l1N: h.l1Size, rtOff: h.refTableOffset, rtClust: h.refTableClust}
	if err := im.validate(fsize); err != nil {
		return err
	}
	if err := im.loadCrypto(p, fsize); err != nil {
		return err
	}
	// L1 table.
	im.l1 = make([]uint64, h.l1Size)
	if h.l1Size > 0 {
		raw := make([]byte, int64(h.l1Size)*8)
		if err := driver.ReadFullAt(im.f, raw, int64(h.l1Offset)); err != nil {
			return driver.Corruptf(im.name, int64(h.l1Offset), "cannot read the L1 table: %v", err)
		}
		for i := range im.l1 {
			im.l1[i] = be64(raw[i*8:])
		}
	}
	im.l1Dirty = map[int64]bool{}
	// Refcount table.
	n := int64(h.refTableClust) * im.cs / 8
	raw := make([]byte, n*8)
	if err := driver.ReadFullAt(im.f, raw, int64(h.refTableOffset)); err != nil {
		return driver.Corruptf(im.name, int64(h.refTableOffset), "cannot read the refcount table: %v", err)
	}
	im.rt = make([]uint64, n)
	for i := range im.rt {
		im.rt[i] = be64(raw[i*8:])
	}
	// Snapshots and bitmaps.
	if err := im.loadSnapshots(); err != nil {
		return err
	}
	if err := im.loadBitmaps(); err != nil {
		return err
	}
	// Caches.
	l2Bytes := opts.Int("l2_cache_size")
	if l2Bytes <= 0 {
		// Enough to cover the whole disk, up to 32 MiB (qemu's default).
		need := (im.size + im.cs*im.l2n - 1) / (im.cs * im.l2n) * im.cs
		l2Bytes = min(max(need, 1<<20), 32<<20)
	}
	rbBytes := opts.Int("refcount_cache_size")
	if rbBytes <= 0 {
		rbBytes = max(l2Bytes/4, 256<<10)
	}
	im.l2c = newCache(int(max(l2Bytes/im.cs, 4)))
	im.rbc = newCache(int(max(rbBytes/im.cs, 4)))
	im.lazy = h.compat&compatLazyRefcounts != 0 && h.version >= 3
	im.hdrDirty = h.incompat&incompatDirty != 0
	im.corrupt = h.incompat&incompatCorrupt != 0
	im.freeHint = 1
	im.rebuildMeta()
	// External data file.
	if h.incompat&incompatDataFile != 0 {
		im.extData = true
		im.rawData = h.autoclear&autoclearDataFileRaw != 0
		name := opts.String("data_file")
		// A name the user gives (-o data_file=) is not the image's word:
		// it is followed as given. The header's name goes through the
		// path policy like every name an image records.
		q := *p
		if name != "" {
			q.Paths = driver.PathTrusted
		} else {
			name = h.dataFile
		}
		if name == "" {
			return driver.Errorf(driver.ErrInvalidOption, im.name, -1, "the image uses an external data file but does not name it; give it with -o data_file=NAME")
		}
		im.dfName = name
		flag := driver.ReadOnly
		if !im.ro {
			flag = driver.ReadWrite
		}
		df, path, err := q.OpenReferenced("data file", name, flag)
		if err != nil && errors.Is(err, driver.ErrNotFound) && q.Policy() == driver.PathTrusted && !filepath.IsAbs(name) {
			// qemu resolves a relative data file name against its working
			// directory; accept that too when the name is trusted.
			if df2, err2 := im.st.Open(name, flag); err2 == nil {
				df, err = df2, nil
			}
		}
		if err != nil {
			var pe *driver.PathError
			if errors.As(err, &pe) {
				return err
			}
			if path == "" {
				path = name
			}
			return driver.Errorf(err, im.name, -1, "cannot open the external data file %s", path)
		}
		im.df = df
	}
	return nil
}

func (im *image) setGeometry() {
	h := im.hdr
	im.cbits = uint(h.clusterBits)
	im.cs = int64(1) << im.cbits
	im.ext = h.incompat&incompatExtL2 != 0
	im.esz = 8
	im.nsc = 1
	if im.ext {
		im.esz = 16
		im.nsc = subclustersPerClust
	}
	im.scSize = im.cs / im.nsc
	im.scBits = im.cbits
	if im.ext {
		im.scBits = im.cbits - 5
	}
	im.l2n = im.cs / im.esz
	im.l2Bits = uint(log2(im.l2n))
	im.setRefcountOrder(uint(h.refcountOrder))
	im.cshift = 62 - (im.cbits - 8)
	im.cOffMask = 1<<im.cshift - 1
	im.cSecMask = 1<<(im.cbits-8) - 1
	im.size = int64(h.size)
}

// setRefcountOrder sets the refcount width (2^order bits) and what
// follows from it with the cluster size.
func (im *image) setRefcountOrder(order uint) {
	im.rorder = order
	bits := int64(1) << order
	im.rbn = im.cs * 8 / bits
	im.rbBits = uint(log2(im.rbn))
	if bits == 64 {
		im.refMax = ^uint64(0)
	} else {
		im.refMax = 1<<bits - 1
	}
}

func log2(n int64) int {
	b := 0
	for n > 1 {
		n >>= 1
		b++
	}
	return b
}

// validate checks the header's tables against the file size and the limits.
func (im *image) validate(fsize int64) error {
	h := im.hdr
	cs := im.cs
	if h.size > 1<<62 {
		return driver.Corruptf(im.name, 24, "virtual size %d too large", h.size)
	}
	perL1 := cs * im.l2n // bytes covered by one L1 entry
	need := (int64(h.size) + perL1 - 1) / perL1
	if need > maxL1Bytes/l1EntrySize {
		return driver.Unsupportedf(im.name, "virtual size %d needs an L1 table of %d entries, more than the limit of %d", h.size, need, maxL1Bytes/l1EntrySize)
	}
	if int64(h.l1Size) > maxL1Bytes/l1EntrySize {
		return driver.Corruptf(im.name, 36, "L1 table of %d entries exceeds the limit of %d", h.l1Size, maxL1Bytes/l1EntrySize)
	}
	if int64(h.l1Size) < need {
		return driver.Corruptf(im.name, 36, "L1 table of %d entries is too small for the %d-byte disk (needs %d)", h.l1Size, h.size, need)
	}
	if h.l1Size > 0 {
		if err := im.checkTable("L1 table", 40, h.l1Offset, int64(h.l1Size)*8, fsize); err != nil {
			return err
		}
	}
	if h.refTableClust == 0 {
		return driver.Corruptf(im.name, 56, "the image has no refcount table")
	}
	if int64(h.refTableClust) > maxRefTableBytes/cs {
		return driver.Corruptf(im.name, 56, "refcount table of %d clusters exceeds the limit of %d bytes", h.refTableClust, maxRefTableBytes)
	}
	if err := im.checkTable("refcount table", 48, h.refTableOffset, int64(h.refTableClust)*cs, fsize); err != nil {
		return err
	}
	if h.nbSnapshots > maxSnapshots {
		return driver.Corruptf(im.name, 60, "%d snapshots exceed the limit of %d", h.nbSnapshots, maxSnapshots)
	}
	if h.nbSnapshots > 0 {
		if err := im.checkTable("snapshot table", 64, h.snapshotsOffset, int64(h.nbSnapshots)*40, fsize); err != nil {
			return err
		}
	}
	if b := h.bitmaps; b != nil {
		if b.nbBitmaps == 0 || b.nbBitmaps > maxBitmaps {
			return driver.Corruptf(im.name, -1, "bitmaps extension with %d bitmaps (1 to %d allowed)", b.nbBitmaps, maxBitmaps)
		}
		if b.dirSize > maxBitmapDirSize || b.dirSize < uint64(b.nbBitmaps)*24 {
			return driver.Corruptf(im.name, -1, "bitmap directory size %d invalid for %d bitmaps", b.dirSize, b.nbBitmaps)
		}
		if err := im.checkTable("bitmap directory", -1, b.dirOffset, int64(b.dirSize), fsize); err != nil {
			return err
		}
	} else if h.autoclear&autoclearBitmaps != 0 {
		// qemu treats the bit without the extension as an error of the
		// image; it is harmless here, and cleared on the first header write.
		h.autoclear &^= autoclearBitmaps
	}
	return nil
}

// checkTable validates a cluster-aligned table of n bytes at off.
func (im *image) checkTable(what string, field int64, off uint64, n int64, fsize int64) error {
	if off%uint64(im.cs) != 0 {
		return driver.Corruptf(im.name, field, "%s offset %#x is not aligned to a cluster", what, off)
	}
	if off == 0 {
		return driver.Corruptf(im.name, field, "%s at offset 0 overlaps the header", what)
	}
	if off > uint64(fsize) || uint64(n) > uint64(fsize)-off {
		return driver.Corruptf(im.name, field, "%s (%d bytes at %#x) extends past the end of the %d-byte file", what, n, off, fsize)
	}
	return nil
}

// rebuildMeta recomputes the metadata locations used by overlap checks.
// Callers hold mu (or own the image exclusively).
func (im *image) rebuildMeta() {
	h := im.hdr
	cl := func(off uint64, n int64) span {
		lo := int64(off) >> im.cbits
		return span{lo, (int64(off) + n + im.cs - 1) >> im.cbits}
	}
	fixed := []span{{0, 1}}
	if h.l1Size > 0 {
		fixed = append(fixed, cl(h.l1Offset, int64(h.l1Size)*8))
	}
	fixed = append(fixed, cl(h.refTableOffset, int64(h.refTableClust)*im.cs))
	if h.nbSnapshots > 0 {
		fixed = append(fixed, cl(h.snapshotsOffset, im.snapTableSize()))
	}
	if h.hasCrypto {
		fixed = append(fixed, cl(h.cryptoOff, int64(h.cryptoLen)))
	}
	for _, s := range im.snaps {
		if s.l1Size > 0 {
			fixed = append(fixed, cl(s.l1Offset, int64(s.l1Size)*8))
		}
	}
	if b := h.bitmaps; b != nil {
		fixed = append(fixed, cl(b.dirOffset, int64(b.dirSize)))
		for _, bm := range im.bitmaps {
			if bm.tableSize > 0 {
				fixed = append(fixed, cl(bm.tableOffset, int64(bm.tableSize)*8))
			}
		}
	}
	sort.Slice(fixed, func(i, j int) bool { return fixed[i].lo < fixed[j].lo })
	im.fixed = fixed
	im.metaSet = make(map[int64]uint8)
	for _, e := range im.l1 {
		if o := e & offMask; o != 0 {
			im.metaSet[int64(o)>>im.cbits] = metaL2
		}
	}
	for _, e := range im.rt {
		if o := e & refTableOffMask; o != 0 {
			im.metaSet[int64(o)>>im.cbits] = metaRB
		}
	}
}

// isMeta reports whether cluster c holds metadata we know of.
func (im *image) isMeta(c int64) bool {
	if _, ok := im.metaSet[c]; ok {
		return true
	}
	i := sort.Search(len(im.fixed), func(i int) bool { return im.fixed[i].hi > c })
	for ; i < len(im.fixed) && im.fixed[i].lo <= c; i++ {
		if c < im.fixed[i].hi {
			return true
		}
	}
	return false
}

// openWritable prepares an image opened read-write: repairs the refcounts
// of an image left dirty, and clears autoclear bits we do not maintain.
func (im *image) openWritable(ctx context.Context, infoOnly bool) error {
	h := im.hdr
	if im.corrupt {
		// Writes are refused until `check -r all` clears the bit.
		im.log.Warn("the image is marked corrupt; it can only be repaired (check -r all)")
		return nil
	}
	changed := false
	if im.hdrDirty {
		im.log.Info("the image was not closed cleanly (dirty bit set); rebuilding its refcounts")
		if _, err := im.check(ctx, driver.RepairAll, true); err != nil {
			return driver.Errorf(err, im.name, -1, "cannot repair the refcounts of the dirty image")
		}
		if im.corrupt {
			return nil
		}
	}
	if unk := h.autoclear &^ autoclearKnown; unk != 0 {
		h.autoclear &^= unk
		changed = true
	}
	if changed {
		if err := im.writeHeaderSync(false, false); err != nil {
			return err
		}
	}
	return nil
}

// diskHdr is what the header on disk says about the tables whose updates
// must be ordered (see flush.go).
type diskHdr struct {
	size    int64
	l1Off   uint64
	l1N     uint32
	rtOff   uint64
	rtClust uint32
}

// writeHeader rewrites the header cluster from im.hdr. rtMem and l1Mem
// select whether the refcount table and the L1 table/size fields are the
// in-memory ones (which must be durable by then) or the ones on disk.
func (im *image) writeHeader(rtMem, l1Mem bool) error {
	h := *im.hdr
	if rtMem {
		im.disk.rtOff, im.disk.rtClust = h.refTableOffset, h.refTableClust
	}
	if l1Mem {
		im.disk.size, im.disk.l1Off, im.disk.l1N = im.size, h.l1Offset, uint32(len(im.l1))
	}
	h.refTableOffset, h.refTableClust = im.disk.rtOff, im.disk.rtClust
	h.size, h.l1Offset, h.l1Size = uint64(im.disk.size), im.disk.l1Off, im.disk.l1N
	b, err := h.encode(im.cs)
	if err != nil {
		return err
	}
	// Clear what the old header area may have held past the new end
	// (stale extensions or backing name); nothing else lives there.
	pad := int64(len(b))
	end := min(im.cs, max(pad, 4096))
	if end > pad {
		b = append(b, make([]byte, end-pad)...)
	}
	if _, err := im.f.WriteAt(b, 0); err != nil {
		return err
	}
	im.grow(int64(len(b)))
	return nil
}

// writeHeaderSync writes the header (see writeHeader) and syncs the file.
func (im *image) writeHeaderSync(rtMem, l1Mem bool) error {
	if err := im.writeHeader(rtMem, l1Mem); err != nil {
		return err
	}
	return im.syncFile(im.f)
}

// headerStale reports whether table fields of the header on disk differ
// from memory.
func (im *image) headerStale() (rt, l1 bool) {
	h := im.hdr
	rt = im.disk.rtOff != h.refTableOffset || im.disk.rtClust != h.refTableClust
	l1 = im.disk.size != im.size || im.disk.l1Off != h.l1Offset || im.disk.l1N != uint32(len(im.l1))
	return
}

// Size is the virtual size.
func (im *image) Size() int64 {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.size
}

// Parent returns the backing file reference.
func (im *image) Parent() *driver.ParentRef {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.hdr.backingFile == "" {
		return nil
	}
	r := &driver.ParentRef{Name: im.hdr.backingFile}
	if im.hdr.hasBackingFmt {
		r.Format = im.hdr.backingFmt
	}
	return r
}

// backed reports whether the header records a backing file: whether
// unallocated clusters show a backing chain (whose content the driver never
// reads) rather than zeros. Callers hold opMu or mu (the name changes only
// with both held exclusively).
func (im *image) backed() bool { return im.hdr.backingFile != "" }

// Close flushes (for a writable image), marks the image clean and closes
// its files.
func (im *image) Close() error {
	im.stopCompressor()
	cwErr := im.cwErr()
	im.opMu.Lock()
	defer im.opMu.Unlock()
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.closed {
		return nil
	}
	im.closed = true
	if im.shared {
		return nil
	}
	first := cwErr
	if !im.ro && !im.corrupt {
		// Close writes out what is left in the metadata caches, in the
		// usual order but without syncing: durability is Flush's job (the
		// container flushes before closing; closing without a flush is
		// qemu's cache=unsafe). The exception is an image dirty with lazy
		// refcounts: its refcounts are made durable before the dirty bit
		// is cleared, or the bit would lie after a crash.
		im.noSync = !(im.lazy && (im.hdrDirty || len(im.rbc.dirtyTables()) > 0 || im.rtDirty))
		if err := im.flushLocked(true); err != nil && first == nil {
			first = err
		}
		im.noSync = false
	}
	if im.df != im.f {
		if err := im.df.Close(); err != nil && first == nil {
			first = err
		}
	}
	if err := im.f.Close(); err != nil && first == nil {
		first = err
	}
	return first
}

// errClosed is returned by operations on a closed image.
var errClosed = errors.New("image is closed")

// beginWrite checks that the image may be modified and does what must
// precede the first modification.
func (im *image) beginWrite(off int64) error {
	if err := im.writable(off); err != nil {
		return err
	}
	if im.bmDone.Load() {
		return nil
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.bmDone.Load() {
		return nil
	}
	if err := im.markBitmapsInUse(); err != nil {
		return err
	}
	im.bmDone.Store(true)
	return nil
}

// beginOp starts a structural operation that changes the image (snapshot
// create, apply and delete, amend, resize, reparenting): beginWrite's
// checks (read-only, corrupt, closed; bitmaps marked in use), then
// lockOps. Callers release the image with unlockOps.
func (im *image) beginOp() error {
	if err := im.beginWrite(-1); err != nil {
		return err
	}
	im.lockOps()
	return nil
}

// lockOps gives the image to one operation: queued compressed writes are
// stored, then opMu is taken exclusively (no I/O runs) and mu.
func (im *image) lockOps() {
	im.drainCompressor()
	im.opMu.Lock()
	im.mu.Lock()
}

// unlockOps releases what lockOps took.
func (im *image) unlockOps() {
	im.mu.Unlock()
	im.opMu.Unlock()
}

func (im *image) writable(off int64) error {
	if im.ro {
		return driver.Errorf(driver.ErrReadOnly, im.name, off, "image opened read-only")
	}
	if im.corrupt {
		return driver.Errorf(driver.ErrCorrupt, im.name, off, "the image is marked corrupt; repair it with check -r all before writing")
	}
	if im.closed {
		return driver.Errorf(errClosed, im.name, off, "image is closed")
	}
	return nil
}

// markCorrupt sets the corrupt bit after detecting an inconsistency that
// writing would make worse (qemu does the same), and returns the error.
func (im *image) markCorrupt(off int64, format string, args ...any) error {
	err := driver.Corruptf(im.name, off, format, args...)
	if im.ro || im.corrupt {
		return err
	}
	im.corrupt = true
	im.log.Error("marking the image corrupt", "reason", err.Error())
	im.hdr.incompat |= incompatCorrupt
	_ = im.writeHeaderSync(false, false)
	return err
}

// readAtFile reads p from file f at off; bytes past the end of the file
// read as zeros.
func readAtFile(f io.ReaderAt, p []byte, off int64) error {
	n, err := f.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		clear(p[n:])
		return nil
	}
	return err
}

func put64(b []byte, v uint64) { binary.BigEndian.PutUint64(b, v) }
