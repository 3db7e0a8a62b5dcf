package vdi

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/bufpool"
)

func init() { driver.Register(Format) }

// Format is the VDI format descriptor.
var Format = &driver.Format{
	Name:        "vdi",
	Extensions:  []string{"vdi"},
	Description: "VirtualBox Disk Image",
	Caps: driver.CapCreateFixed | driver.CapCreateDynamic | driver.CapDiff | driver.CapDiscard |
		driver.CapZero | driver.CapResize | driver.CapUUID | driver.CapCheck | driver.CapCompact |
		driver.CapWrite,
	CreateOptions: []driver.Option{
		{Name: "static", Type: driver.TypeBool, Default: "off",
			Doc: "create a fixed (preallocated) image"},
		{Name: "block_size", Type: driver.TypeSize, Default: "1M", Min: minBlockSize, Max: maxBlockSize, PowerOf2: true,
			Doc: "allocation block size (VirtualBox's AllocationBlockSize); qemu reads only 1M"},
		{Name: "comment", Type: driver.TypeString,
			Doc: "image comment (at most 255 bytes)"},
	},
	Probe:  probe,
	Create: create,
	Open:   open,
}

// dataAlign aligns the data area of created images, as VirtualBox does
// (1 MiB). Tests lower it to make tiny images.
var dataAlign int64 = 1 << 20

// mapAlign aligns the block map of created images: a sector, so that the
// map follows the header as in qemu's images and an allocation writes the
// header's count and the map entry in one small write (see mapio.go).
// Tests raise it to make VirtualBox's layout (the map at 1 MiB).
var mapAlign int64 = sectorSize

func probe(r io.ReaderAt, size int64) int {
	if size < preHeaderSize {
		return 0
	}
	var b [8]byte
	if _, err := r.ReadAt(b[:], sigOffset); err != nil {
		return 0
	}
	if binary.LittleEndian.Uint32(b[:]) != signature {
		return 0
	}
	if v := binary.LittleEndian.Uint32(b[4:]) >> 16; v > 1 {
		return 50 // our signature, a version we cannot read
	}
	return 100
}

// image is an open VDI image.
//
// Locking: mu is held shared by every data access (reads, in-place writes,
// allocations) for the whole of its file I/O, and exclusively by the
// operations that free or move data blocks or change the layout (discard,
// write-zeroes, compact, resize, repair), so no access ever uses a block
// while it moves. meta guards the header, the allocation cursor and the
// writes of block map entries. Map entries are read and written atomically:
// allocations change entries of other blocks while reads go on. alloc
// serializes allocations (data block, then entry), so the data block
// indices in use stay 0..count-1 at every moment, as readers trusting the
// header's count (VirtualBox, qemu) need; mu, then alloc, then meta.
type image struct {
	f    driver.File
	name string
	ro   bool
	log  *slog.Logger

	mu    sync.RWMutex
	alloc sync.Mutex
	meta  sync.Mutex

	size atomic.Int64 // virtual size

	// Layout, changed only with mu held exclusively.
	bs, extra, tbs int64 // block size, extra data per block, bytes per block in the file
	offBlocks      int64
	offData        int64
	bmap           []uint32

	// Guarded by meta.
	hdr      header
	hdrDirty bool     // the header in memory differs from the file's
	cursor   uint32   // next data block index at the end of the data area
	hiRef    uint32   // 1 + the highest referenced data block index
	count    uint32   // referenced (allocated) blocks
	spare    []uint32 // indices reserved but never referenced, to reuse
	broken   string   // why the image must be repaired before it is written
	span     []byte   // the file from the pre-header's end to the map's end (mapio.go); nil: to build
	noSpan   bool     // the gap before the map is too large to keep: two writes

	modDone atomic.Bool // the modification UUID was refreshed this session

	bufs bufpool.Pool // buffers of tbs bytes
}

func open(ctx context.Context, p *driver.OpenParams) (driver.Image, error) {
	flag := driver.ReadOnly
	if !p.ReadOnly {
		flag = driver.ReadWrite
	}
	// p.Direct is not passed on: map entries and the header are updated
	// with sub-sector writes, which O_DIRECT refuses.
	f, err := p.Storage.Open(p.Name, flag)
	if err != nil {
		return nil, err
	}
	im, err := load(f, p.Name, p.ReadOnly, p.Logger)
	if err != nil {
		f.Close()
		return nil, err
	}
	return im, nil
}

// load reads, validates and sets up an image from an open file.
func load(f driver.File, name string, ro bool, log *slog.Logger) (*image, error) {
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
	if err := h.validate(name, fileSize); err != nil {
		return nil, err
	}
	im := &image{f: f, name: name, ro: ro, log: log, hdr: *h}
	im.setLayout()
	raw := make([]byte, int64(h.blocks)*4)
	if err := driver.ReadFullAt(f, raw, im.offBlocks); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, driver.Corruptf(name, im.offBlocks, "the block map is cut short by the end of the file")
		}
		return nil, driver.WithFile(err, "read block map", name)
	}
	im.bmap = make([]uint32, h.blocks)
	for i := range im.bmap {
		im.bmap[i] = binary.LittleEndian.Uint32(raw[i*4:])
	}
	sc := im.scan(fileSize, !ro)
	im.count = sc.count
	im.hiRef = uint32(sc.maxIdx + 1)
	im.cursor = max(im.hiRef, h.allocated)
	if !ro {
		// Holes left by an interrupted pack are filled first: each fill
		// brings the indices in use closer to 0..count-1.
		im.spare = im.holes(sc)
		switch {
		case len(sc.pastEOF) > 0:
			im.broken = "its block map points past the end of the file"
		case len(sc.dups) > 0:
			im.broken = "its block map has cross-linked blocks"
		}
		if im.broken != "" {
			log.Warn("VDI image is inconsistent; writes are refused until it is repaired (check -r all)", "file", name, "problem", im.broken)
		} else if h.allocated != sc.count {
			log.Warn("VDI header's allocated block count does not match the block map", "file", name,
				"header", h.allocated, "map", sc.count)
		}
	}
	return im, nil
}

// setLayout derives the layout fields from the header.
func (im *image) setLayout() {
	h := &im.hdr
	im.bs = int64(h.blockSize)
	im.extra = int64(h.blockExtra)
	im.tbs = im.bs + im.extra
	im.bufs.Size = int(im.tbs)
	im.offBlocks = int64(h.offBlocks)
	im.offData = int64(h.offData)
	// qemu rounds odd disk sizes up to a whole sector (the block map has
	// room for it); VirtualBox rounds down. We follow qemu so that no byte
	// of the recorded size is lost.
	im.size.Store(int64((h.diskSize + sectorSize - 1) &^ (sectorSize - 1)))
}

func create(ctx context.Context, p *driver.CreateParams) (driver.Image, error) {
	bs := p.Options.Int("block_size")
	if bs == 0 {
		bs = defaultBlockSize
	}
	static := p.Options.Bool("static")
	if p.Size < 0 {
		return nil, driver.OptionErrorf("negative size %d", p.Size)
	}
	size := (p.Size + sectorSize - 1) &^ (sectorSize - 1)
	nb := (size + bs - 1) / bs
	if nb > maxBlocks {
		return nil, driver.OptionErrorf("size %d is too large for VDI with %d-byte blocks (at most %d blocks)", p.Size, bs, maxBlocks)
	}
	h := header{version: version11, size: hdrV1PlusSize, typ: typeNormal}
	copy(h.text[:], fileInfoText)
	if err := h.setComment(p.Options.String("comment")); err != nil {
		return nil, err
	}
	if static {
		h.typ = typeFixed
	}
	if p.ParentRef != nil {
		if static {
			return nil, driver.OptionErrorf("a VDI differencing image cannot be static (fixed)")
		}
		if p.ParentRef.UUID == "" {
			return nil, driver.Unsupportedf(p.Name, "the parent records no UUID; a VDI differencing image identifies its parent by UUID only (use a VDI or other UUID-carrying parent)")
		}
		pu, err := parseUUID(p.ParentRef.UUID)
		if err != nil {
			return nil, err
		}
		pm, err := parseUUID(p.ParentRef.ModUUID)
		if err != nil {
			return nil, err
		}
		h.typ = typeDiff
		h.parentUUID, h.parentModUUID = pu, pm
	}
	align := func(n, a int64) int64 { return (n + a - 1) / a * a }
	offBlocks := align(preHeaderSize+hdrV1PlusSize, mapAlign)
	offData := align(offBlocks+nb*4, dataAlign)
	if offData > 0xFFFFFFFF {
		return nil, driver.OptionErrorf("size %d is too large for VDI: the block map does not fit below 4 GiB", p.Size)
	}
	h.offBlocks, h.offData = uint32(offBlocks), uint32(offData)
	h.legacy = geometry{sectorSize: sectorSize}
	h.lchs = geometry{sectorSize: sectorSize}
	h.diskSize = uint64(size)
	h.blockSize = uint32(bs)
	h.blocks = uint32(nb)
	h.uuid = newUUID()
	h.modUUID = newUUID()
	if static {
		h.allocated = h.blocks
	}

	// No O_TRUNC: on ext4 closing a file truncated to zero forces its
	// writeback; an existing file's blocks are punched out instead, and the
	// file is cut to size below.
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
	if old, err := f.Size(); err != nil {
		return fail(err)
	} else if old > 0 {
		if err := f.PunchHole(0, old); err != nil {
			return fail(err)
		}
	}
	hb := append(h.encodePre(), h.encodeBody()...)
	if _, err := f.WriteAt(hb, 0); err != nil {
		return fail(err)
	}
	bm := make([]uint32, nb)
	raw := make([]byte, nb*4)
	for i := range bm {
		v := uint32(entFree)
		if static {
			v = uint32(i)
		}
		bm[i] = v
		binary.LittleEndian.PutUint32(raw[i*4:], v)
	}
	if len(raw) > 0 {
		if _, err := f.WriteAt(raw, offBlocks); err != nil {
			return fail(err)
		}
	}
	end := offData
	if static {
		end += nb * bs
		if a, ok := f.(driver.Allocator); ok && nb > 0 {
			// Reserve the space, as VirtualBox does for fixed images; fall
			// back to a sparse file where the storage cannot.
			if err := a.Allocate(offData, nb*bs); err != nil && !errors.Is(err, driver.ErrUnsupported) {
				return fail(err)
			}
		}
	}
	if err := f.Truncate(end); err != nil {
		return fail(err)
	}
	im := &image{f: f, name: p.Name, log: p.Logger, hdr: h, bmap: bm}
	if im.log == nil {
		im.log = slog.New(slog.DiscardHandler)
	}
	im.setLayout()
	im.count, im.hiRef, im.cursor = h.allocated, h.allocated, h.allocated
	return im, nil
}

// Size is the virtual size.
func (im *image) Size() int64 { return im.size.Load() }

// entry returns block b's map entry.
func (im *image) entry(b int64) uint32 { return atomic.LoadUint32(&im.bmap[b]) }

func allocated(e uint32) bool { return e < entZero }

// slotOff is the file offset of data block index idx (its extra data first).
func (im *image) slotOff(idx uint32) int64 { return im.offData + int64(idx)*im.tbs }

// dataOff is the file offset of the data of block index idx.
func (im *image) dataOff(idx uint32) int64 { return im.slotOff(idx) + im.extra }

// blockLen is the number of bytes of block b inside the virtual disk.
func (im *image) blockLen(b int64) int64 { return min(im.bs, im.Size()-b*im.bs) }

// isDiff reports whether the image is a differencing image: its free
// blocks show the parent's content (which the driver never reads), where a
// base image's free blocks read zeros. It is the header's type alone,
// never the state of an opened chain.
func (im *image) isDiff() bool {
	im.meta.Lock()
	defer im.meta.Unlock()
	return im.hdr.typ == typeDiff
}

func stateOf(e uint32) driver.State {
	switch e {
	case entFree:
		return driver.Unallocated
	case entZero:
		return driver.Zero
	}
	return driver.Data
}

// Status reports the run at off: data blocks (with their file offset when
// contiguous), zero blocks, or free blocks (unallocated).
func (im *image) Status(off, n int64) (driver.Extent, error) {
	im.mu.RLock()
	defer im.mu.RUnlock()
	if err := driver.CheckRange(im.name, off, n, im.Size()); err != nil {
		return driver.Extent{}, err
	}
	if n == 0 {
		return driver.Extent{State: driver.Unallocated, Offset: -1}, nil
	}
	b := off / im.bs
	e := im.entry(b)
	st := stateOf(e)
	fo := int64(-1)
	if st == driver.Data {
		fo = im.dataOff(e) + off%im.bs
	}
	end := min(off+n, (b+1)*im.bs)
	for end < off+n {
		nb := end / im.bs
		ne := im.entry(nb)
		if stateOf(ne) != st || (st == driver.Data && im.dataOff(ne) != fo+(end-off)) {
			break
		}
		end = min(off+n, (nb+1)*im.bs)
	}
	return driver.Extent{State: st, Length: end - off, Offset: fo}, nil
}

// ReadAt reads p at off: data blocks from the file (contiguous blocks in
// one read). The container asks only for runs Status reported as Data;
// zero blocks, and free blocks (whose content, in a differencing image,
// the layers below supply), read as zeros.
func (im *image) ReadAt(p []byte, off int64) (int, error) {
	im.mu.RLock()
	defer im.mu.RUnlock()
	if err := driver.CheckRange(im.name, off, int64(len(p)), im.Size()); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		b, in := pos/im.bs, pos%im.bs
		e := im.entry(b)
		n := int(min(int64(len(p)-done), im.bs-in))
		switch stateOf(e) {
		case driver.Data:
			fo := im.dataOff(e) + in
			for done+n < len(p) {
				ne := im.entry((pos + int64(n)) / im.bs)
				if !allocated(ne) || im.dataOff(ne) != fo+int64(n) {
					break
				}
				n += int(min(int64(len(p)-done-n), im.bs))
			}
			if err := im.readData(p[done:done+n], fo); err != nil {
				return done, err
			}
		default:
			clear(p[done : done+n])
		}
		done += n
	}
	return done, nil
}

// readData reads file data at fo. A block whose tail is missing from the
// file (a truncated last block) reads zeros there; a block starting past
// the end of the file is corrupt.
func (im *image) readData(p []byte, fo int64) error {
	n, err := im.f.ReadAt(p, fo)
	if n == len(p) {
		return nil
	}
	if err != nil && err != io.EOF {
		return driver.WithFile(err, "read", im.name)
	}
	if n == 0 {
		return driver.Corruptf(im.name, fo, "data block starts past the end of the file")
	}
	clear(p[n:])
	return nil
}

// Flush writes the header if it changed and syncs the file.
func (im *image) Flush() error {
	if im.ro {
		return nil
	}
	im.meta.Lock()
	err := im.writeHeaderLocked(false)
	im.meta.Unlock()
	if err != nil {
		return err
	}
	return im.f.Sync()
}

// writeHeaderLocked writes the header if it is dirty (or force). The
// allocated count recorded is the number of allocated entries, which
// qemu-img check compares with the map; allocations keep the indices in
// use at 0..count-1, so a writer trusting it (VirtualBox and qemu allocate
// at that index) never cross-links blocks, except while the holes a
// discard leaves wait to be packed (pack runs at once).
func (im *image) writeHeaderLocked(force bool) error {
	if !im.hdrDirty && !force {
		return nil
	}
	im.hdr.allocated = im.count
	if _, err := im.f.WriteAt(im.hdr.encodeBody(), preHeaderSize); err != nil {
		return driver.WithFile(err, "write header", im.name)
	}
	im.hdrDirty = false
	return nil
}

// Close writes the header if it changed and closes the file; durability
// is Flush's job (the container flushes first unless asked not to).
func (im *image) Close() error {
	var first error
	if !im.ro {
		im.meta.Lock()
		first = im.writeHeaderLocked(false)
		im.meta.Unlock()
	}
	if err := im.f.Close(); err != nil && first == nil {
		first = err
	}
	return first
}

// Info describes the image.
func (im *image) Info() driver.Info {
	im.meta.Lock()
	defer im.meta.Unlock()
	h := &im.hdr
	s := &Info{
		Version:                versionString(h.version),
		Type:                   h.typeName(),
		UUID:                   uuidString(h.uuid),
		ModificationUUID:       uuidString(h.modUUID),
		ParentUUID:             uuidString(h.parentUUID),
		ParentModificationUUID: uuidString(h.parentModUUID),
		BlockSize:              int64(h.blockSize),
		BlockExtra:             int64(h.blockExtra),
		Blocks:                 int64(h.blocks),
		AllocatedBlocks:        int64(im.count),
		Comment:                h.commentString(),
	}
	if h.legacy.set() {
		g := h.legacy.chs()
		s.PCHS = &g
	}
	if h.hasLCHS() && h.lchs.set() {
		g := h.lchs.chs()
		s.LCHS = &g
	}
	return driver.Info{Format: "vdi", VirtualSize: im.Size(), ClusterSize: int64(h.blockSize), Specific: s}
}

// Info is the format-specific information `info` shows.
type Info struct {
	Version                string      `json:"version"`
	Type                   string      `json:"type"`
	UUID                   string      `json:"uuid"`
	ModificationUUID       string      `json:"modification-uuid"`
	ParentUUID             string      `json:"parent-uuid,omitempty"`
	ParentModificationUUID string      `json:"parent-modification-uuid,omitempty"`
	BlockSize              int64       `json:"block-size"`
	BlockExtra             int64       `json:"block-extra,omitempty"`
	Blocks                 int64       `json:"blocks"`
	AllocatedBlocks        int64       `json:"allocated-blocks"`
	Comment                string      `json:"comment,omitempty"`
	PCHS                   *driver.CHS `json:"pchs,omitempty"`
	LCHS                   *driver.CHS `json:"lchs,omitempty"`
}

func versionString(v uint32) string {
	return strconv.Itoa(int(v>>16)) + "." + strconv.Itoa(int(v&0xffff))
}

// Parent returns the recorded parent of a differencing image: VDI records
// only its UUID and modification UUID, no file name.
func (im *image) Parent() *driver.ParentRef {
	im.meta.Lock()
	defer im.meta.Unlock()
	if im.hdr.typ != typeDiff {
		return nil
	}
	return &driver.ParentRef{UUID: uuidString(im.hdr.parentUUID), ModUUID: uuidString(im.hdr.parentModUUID)}
}
