package parallels

import (
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"math"
	"sync"
	"sync/atomic"

	"github.com/vdisk/vdisk/driver"
)

func init() { driver.Register(Format) }

// preallocOptions are qemu's runtime options for growing the file.
var preallocOptions = []driver.Option{
	{Name: "prealloc-mode", Type: driver.TypeEnum, Default: "falloc", Values: []string{"falloc", "truncate"},
		Doc: "how the file grows when clusters are allocated: falloc reserves the space, truncate leaves it sparse"},
	{Name: "prealloc-size", Type: driver.TypeSize, Default: "128M", Min: 0, Max: 1 << 40,
		Doc: "bytes the file grows by beyond what an allocation needs (at least one cluster); cut off again on close"},
}

// Format is the Parallels format descriptor.
var Format = &driver.Format{
	Name:        "parallels",
	Extensions:  []string{"hds", "hdd"},
	Description: "Parallels expandable disk image (and DiskDescriptor.xml bundles, read-only)",
	Caps: driver.CapCreateDynamic | driver.CapDiscard | driver.CapZero | driver.CapResize |
		driver.CapCheck | driver.CapWrite,
	CreateOptions: append([]driver.Option{
		{Name: "cluster_size", Type: driver.TypeSize, Default: "1M", Min: sectorSize, Max: maxTracks * sectorSize,
			Doc: "cluster size (rounded up to a multiple of 512 bytes, as qemu does)"},
	}, preallocOptions...),
	OpenOptions: preallocOptions,
	Probe:       probe,
	Create:      create,
	Open:        open,
}

func probe(r io.ReaderAt, size int64) int {
	var b [headerSize]byte
	n, _ := r.ReadAt(b[:], 0)
	if n >= headerSize {
		m := string(b[:16])
		if (m == magicOld || m == magicExt) && binary.LittleEndian.Uint32(b[16:]) == version {
			return 100
		}
	}
	if isDescriptor(r, size) {
		return 90
	}
	return 0
}

// image is an open Parallels expandable image.
//
// Locking: mu is held shared by every data access (reads, in-place writes,
// allocations) for the whole of its file I/O, and exclusively by the
// operations that free or move clusters (discard, write-zeroes with unmap,
// resize, repair), so no access uses a cluster while it is freed or moved.
// meta guards the header, the allocation state (dataEnd, fileLen, free) and
// the writes of BAT entries. BAT entries are read and written atomically:
// allocations change other clusters' entries while reads go on.
type image struct {
	f    driver.File
	name string
	ro   bool
	log  *slog.Logger

	mu   sync.RWMutex
	meta sync.Mutex

	size atomic.Int64

	// Layout, changed only with mu held exclusively.
	l   layout
	bat []uint32

	// Guarded by meta.
	hdr      header
	dataEnd  int64   // end of the highest used cluster (>= l.dataOff)
	fileLen  int64   // the file's length as this session made it
	free     []int64 // unused clusters below dataEnd; they read zeros
	dirty    bool    // the inuse flag was set when opened, not yet repaired
	preTrunc bool    // prealloc-mode=truncate
	preSize  int64

	bundle string // the descriptor this image was opened through, if any

	// openFix is what the repair on open fixed, reported (as fixed) by the
	// first Check; guarded by mu.
	openFix *driver.CheckResult
}

func open(ctx context.Context, p *driver.OpenParams) (driver.Image, error) {
	if fi, err := p.Storage.Stat(p.Name); err == nil && fi.IsDir {
		return openBundle(ctx, p, p.Name+"/"+descriptorName)
	}
	flag := driver.ReadOnly
	if !p.ReadOnly {
		flag = driver.ReadWrite
	}
	f, err := p.Storage.Open(p.Name, flag)
	if err != nil {
		return nil, err
	}
	size, err := f.Size()
	if err != nil {
		f.Close()
		return nil, driver.WithFile(err, "open", p.Name)
	}
	if isDescriptor(f, size) {
		f.Close()
		return openBundle(ctx, p, p.Name)
	}
	im, err := load(ctx, f, p.Name, p.ReadOnly, p.Options, p.Logger)
	if err != nil {
		f.Close()
		return nil, err
	}
	return im, nil
}

// load reads, validates and sets up an image from an open file; a
// writable image that was not closed cleanly, or whose BAT is damaged, is
// repaired first, as qemu does.
func load(ctx context.Context, f driver.File, name string, ro bool, opts driver.Values, log *slog.Logger) (*image, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	fileSize, err := f.Size()
	if err != nil {
		return nil, driver.WithFile(err, "open", name)
	}
	if fileSize < headerSize {
		return nil, driver.Corruptf(name, 0, "file of %d bytes is too small for a Parallels header", fileSize)
	}
	hb := make([]byte, headerSize)
	if err := driver.ReadFullAt(f, hb, 0); err != nil {
		return nil, driver.WithFile(err, "read header", name)
	}
	h := decodeHeader(hb)
	l, err := h.validate(name, fileSize)
	if err != nil {
		return nil, err
	}
	raw := make([]byte, 4*int64(h.batEntries))
	if err := driver.ReadFullAt(f, raw, headerSize); err != nil {
		return nil, driver.WithFile(err, "read BAT", name)
	}
	im := &image{f: f, name: name, ro: ro, log: log, hdr: h, l: l, fileLen: fileSize}
	im.size.Store(l.size)
	im.preTrunc = opts.String("prealloc-mode") == "truncate"
	im.preSize = opts.Int("prealloc-size")
	if !opts.Has("prealloc-size") {
		im.preSize = 128 << 20
	}
	im.dirty = h.inuse == inuseMagic
	bat := make([]uint32, h.batEntries)
	for i := range bat {
		bat[i] = binary.LittleEndian.Uint32(raw[4*i:])
	}
	sc := im.scan(bat, fileSize)
	im.bat = sc.bat
	im.dataEnd = sc.dataEnd
	if ro {
		return im, nil
	}
	if im.dirty || sc.problems() > 0 {
		log.Warn("Parallels image was not closed cleanly or is damaged; repairing it", "file", name,
			"dirty", im.dirty, "problems", sc.problems())
		res, err := im.repair(ctx, driver.RepairAll, bat, fileSize)
		if err != nil {
			return nil, err
		}
		im.openFix = res
	} else if err := im.dropTail(); err != nil {
		return nil, err
	}
	// Format extension clusters (dirty bitmaps) would go stale under our
	// writes: drop the extension, as qemu does on a read-write open.
	im.meta.Lock()
	defer im.meta.Unlock()
	if im.hdr.extOff != 0 {
		im.hdr.extOff = 0
	}
	im.hdr.inuse = inuseMagic
	if err := im.writeHeaderLocked(); err != nil {
		return nil, err
	}
	// The flag must be durable before any change it protects.
	if err := f.Sync(); err != nil {
		return nil, driver.WithFile(err, "sync", name)
	}
	return im, nil
}

// dropTail cuts the file at the end of the data so that everything past
// dataEnd reads zeros (allocation relies on it) and collects the unused
// clusters below it, punching them so that they read zeros too.
func (im *image) dropTail() error {
	im.meta.Lock()
	defer im.meta.Unlock()
	if im.fileLen > im.dataEnd {
		if err := im.f.Truncate(im.dataEnd); err != nil {
			return driver.WithFile(err, "truncate", im.name)
		}
		im.fileLen = im.dataEnd
	}
	return im.collectFreeLocked()
}

// collectFreeLocked rebuilds the free list from the BAT: unused clusters
// between the data offset and dataEnd, punched so they read zeros. The list
// holds at most as many clusters as the BAT has entries (more could never
// be used before the file grows anyway).
func (im *image) collectFreeLocked() error {
	im.free = im.free[:0]
	base := im.l.firstSlot()
	n := (im.dataEnd - base) / im.l.cs
	if n <= 0 {
		return nil
	}
	used := make(map[int64]bool, len(im.bat))
	for i := range im.bat {
		if e := im.entry(int64(i)); e != 0 {
			used[(im.off(e)-base)/im.l.cs] = true
		}
	}
	for k := int64(0); k < n && len(im.free) < len(im.bat); k++ {
		if used[k] {
			continue
		}
		off := base + k*im.l.cs
		if !im.ro {
			if err := im.f.PunchHole(off, im.l.cs); err != nil {
				return driver.WithFile(err, "punch hole", im.name)
			}
		}
		im.free = append(im.free, off)
	}
	return nil
}

func create(ctx context.Context, p *driver.CreateParams) (driver.Image, error) {
	if p.ParentRef != nil {
		return nil, driver.Unsupportedf(p.Name, "Parallels images record no backing file")
	}
	if p.Size < 0 {
		return nil, driver.OptionErrorf("negative size %d", p.Size)
	}
	cs := p.Options.Int("cluster_size")
	if cs == 0 {
		cs = defaultCSize
	}
	cs = (cs + sectorSize - 1) &^ (sectorSize - 1)
	if cs/sectorSize > maxTracks {
		return nil, driver.OptionErrorf("cluster size %d is too large (at most %d)", cs, int64(maxTracks)*sectorSize)
	}
	if p.Size > math.MaxInt64-cs {
		return nil, driver.OptionErrorf("size %d is too large", p.Size)
	}
	size := (p.Size + sectorSize - 1) &^ (sectorSize - 1)
	nb := (size + cs - 1) / cs
	if nb > math.MaxUint32 {
		return nil, driver.OptionErrorf("size %d is too large for a Parallels image with %d-byte clusters", p.Size, cs)
	}
	dataOff := (batEnd(nb) + cs - 1) / cs * cs
	if dataOff/sectorSize > math.MaxUint32 {
		return nil, driver.OptionErrorf("size %d is too large: the BAT does not fit below the data offset limit", p.Size)
	}
	h := header{
		magic:      magicExt,
		version:    version,
		heads:      createHeads,
		cylinders:  uint32(min(size/sectorSize/createHeads/secInCyl, math.MaxUint32)),
		tracks:     uint32(cs / sectorSize),
		batEntries: uint32(nb),
		nbSectors:  uint64(size / sectorSize),
		dataOff:    uint32(dataOff / sectorSize),
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
		return nil, err
	}
	if err := driver.ClearForCreate(f); err != nil {
		return fail(driver.WithFile(err, "truncate", p.Name))
	}
	if _, err := f.WriteAt(h.encode(), 0); err != nil {
		return fail(driver.WithFile(err, "write header", p.Name))
	}
	// The BAT and its padding read zeros: a file extended by truncation
	// does.
	if err := f.Truncate(dataOff); err != nil {
		return fail(driver.WithFile(err, "truncate", p.Name))
	}
	im, err := load(ctx, f, p.Name, false, p.Options, p.Logger)
	if err != nil {
		return fail(err)
	}
	return im, nil
}

// Size is the virtual size.
func (im *image) Size() int64 { return im.size.Load() }

// entry returns cluster c's BAT entry (0 beyond the BAT).
func (im *image) entry(c int64) uint32 {
	if c >= int64(len(im.bat)) {
		return 0
	}
	return atomic.LoadUint32(&im.bat[c])
}

// off is the file offset of the cluster an entry names.
func (im *image) off(e uint32) int64 { return int64(e) * im.l.mult }

// clusterLen is the number of bytes of cluster c inside the virtual disk.
func (im *image) clusterLen(c int64) int64 { return min(im.l.cs, im.Size()-c*im.l.cs) }

// Status reports the run at off: data clusters (with their file offset when
// contiguous in the file) or unallocated clusters, which read zeros.
func (im *image) Status(off, n int64) (driver.Extent, error) {
	im.mu.RLock()
	defer im.mu.RUnlock()
	if err := driver.CheckRange(im.name, off, n, im.Size()); err != nil {
		return driver.Extent{}, err
	}
	if n == 0 {
		return driver.Extent{State: driver.Unallocated, Offset: -1}, nil
	}
	cs := im.l.cs
	c := off / cs
	e := im.entry(c)
	st, fo := driver.Unallocated, int64(-1)
	if e != 0 {
		st, fo = driver.Data, im.off(e)+off%cs
	}
	end := min(off+n, (c+1)*cs)
	for end < off+n {
		nc := end / cs
		ne := im.entry(nc)
		if (ne != 0) != (e != 0) || (e != 0 && im.off(ne) != fo+(end-off)) {
			break
		}
		end = min(off+n, (nc+1)*cs)
	}
	return driver.Extent{State: st, Length: end - off, Offset: fo}, nil
}

// ReadAt reads p at off: allocated clusters from the file (clusters
// contiguous in the file with one read), unallocated ones as zeros.
func (im *image) ReadAt(p []byte, off int64) (int, error) {
	im.mu.RLock()
	defer im.mu.RUnlock()
	if err := driver.CheckRange(im.name, off, int64(len(p)), im.Size()); err != nil {
		return 0, err
	}
	cs := im.l.cs
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		c, in := pos/cs, pos%cs
		e := im.entry(c)
		n := int(min(int64(len(p)-done), cs-in))
		if e == 0 {
			for done+n < len(p) && im.entry((pos+int64(n))/cs) == 0 {
				n += int(min(int64(len(p)-done-n), cs))
			}
			clear(p[done : done+n])
			done += n
			continue
		}
		fo := im.off(e) + in
		for done+n < len(p) {
			ne := im.entry((pos + int64(n)) / cs)
			if ne == 0 || im.off(ne) != fo+int64(n) {
				break
			}
			n += int(min(int64(len(p)-done-n), cs))
		}
		if err := im.readData(p[done:done+n], fo); err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// readData reads file data at fo; the part of a cluster past the end of
// the file (a cluster cut short) reads zeros.
func (im *image) readData(p []byte, fo int64) error {
	n, err := im.f.ReadAt(p, fo)
	if n == len(p) {
		return nil
	}
	if err != nil && err != io.EOF {
		return driver.WithFile(err, "read", im.name)
	}
	clear(p[n:])
	return nil
}

// writeHeaderLocked writes the 64-byte header; the caller holds meta.
func (im *image) writeHeaderLocked() error {
	if _, err := im.f.WriteAt(im.hdr.encode(), 0); err != nil {
		return driver.WithFile(err, "write header", im.name)
	}
	return nil
}

// Flush makes every completed write durable. BAT entries are written as
// clusters are allocated, so only a sync is needed.
func (im *image) Flush() error {
	if im.ro {
		return nil
	}
	if err := im.f.Sync(); err != nil {
		return driver.WithFile(err, "sync", im.name)
	}
	return nil
}

// Close cuts the file at the end of the data (dropping preallocated space,
// as qemu does) and clears the inuse flag; durability is Flush's job.
func (im *image) Close() error {
	var first error
	if !im.ro {
		im.mu.Lock()
		im.meta.Lock()
		end := im.usedEndLocked()
		if im.fileLen != end {
			if err := im.f.Truncate(end); err != nil {
				first = driver.WithFile(err, "truncate", im.name)
			} else {
				im.fileLen = end
			}
		}
		if first == nil {
			im.hdr.inuse = 0
			first = im.writeHeaderLocked()
		}
		im.meta.Unlock()
		im.mu.Unlock()
	}
	if err := im.f.Close(); err != nil && first == nil {
		first = err
	}
	return first
}

// usedEndLocked is the end of the highest cluster the BAT references (or
// the data offset): the file ends there after a clean close.
func (im *image) usedEndLocked() int64 {
	end := im.l.dataOff
	for i := range im.bat {
		if e := im.entry(int64(i)); e != 0 {
			end = max(end, im.off(e)+im.l.cs)
		}
	}
	return end
}

// Info describes the image.
func (im *image) Info() driver.Info {
	im.meta.Lock()
	defer im.meta.Unlock()
	alloc := int64(0)
	for i := range im.bat {
		if im.entry(int64(i)) != 0 {
			alloc++
		}
	}
	s := &Info{
		Magic:             im.hdr.magic,
		BATEntries:        int64(im.hdr.batEntries),
		AllocatedClusters: alloc,
		DataOffset:        im.l.dataOff,
		Heads:             im.hdr.heads,
		Cylinders:         im.hdr.cylinders,
		ExtOffset:         int64(im.hdr.extOff) * sectorSize,
		Descriptor:        im.bundle,
	}
	return driver.Info{Format: "parallels", VirtualSize: im.Size(), ClusterSize: im.l.cs, Dirty: im.dirty, Specific: s}
}

// Info is the format-specific information `info` shows (qemu shows none
// for Parallels images; the names follow its style).
type Info struct {
	Magic             string `json:"magic"`
	BATEntries        int64  `json:"bat-entries"`
	AllocatedClusters int64  `json:"allocated-clusters"`
	DataOffset        int64  `json:"data-offset"`
	Heads             uint32 `json:"heads"`
	Cylinders         uint32 `json:"cylinders"`
	ExtOffset         int64  `json:"ext-offset,omitempty"`
	Descriptor        string `json:"descriptor,omitempty"`
}

// Parent returns nil: Parallels images record no backing file.
func (im *image) Parent() *driver.ParentRef { return nil }
