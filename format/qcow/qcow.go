package qcow

import (
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"strings"
	"sync"

	"github.com/vdisk/vdisk/driver"
)

func init() { driver.Register(Format) }

var (
	_ driver.Image   = (*image)(nil)
	_ driver.Emptier = (*image)(nil)
)

// Format is the QCOW (version 1) format descriptor.
var Format = &driver.Format{
	Name:        "qcow",
	Extensions:  []string{"qcow"},
	Description: "QEMU copy-on-write image, version 1",
	Caps:        driver.CapCreateDynamic | driver.CapDiff | driver.CapCompress | driver.CapWrite,
	CreateOptions: []driver.Option{
		{Name: "encryption", Type: driver.TypeBool, Default: "off",
			Doc: "encrypt the image with AES (refused: qemu deprecated it and vdisk does not write it)"},
		{Name: "encrypt.format", Type: driver.TypeString,
			Doc: "encryption format; only 'aes' exists for qcow (refused)"},
		{Name: "encrypt.key-secret", Type: driver.TypeString,
			Doc: "ID of the secret holding the AES key (refused: encryption is not supported)"},
	},
	Probe:  probe,
	Create: create,
	Open:   open,
}

func probe(r io.ReaderAt, size int64) int {
	if size < headerSize {
		return 0
	}
	var b [8]byte
	if n, _ := r.ReadAt(b[:], 0); n < len(b) {
		return 0
	}
	if binary.BigEndian.Uint32(b[:]) == magic && binary.BigEndian.Uint32(b[4:]) == version {
		return 100
	}
	return 0
}

// geometry returns the cluster_bits and l2_bits of a new image: qemu's
// choice, 4 KiB clusters with 512-entry L2 tables, or 512-byte clusters
// with 4096-entry tables for an image with a backing file (copy-on-write
// then copies little). Tests replace it to make every geometry qemu reads.
var geometry = func(backing bool) (clusterBits, l2Bits uint8) {
	if backing {
		return 9, 12
	}
	return 12, 9
}

// image is an open QCOW image.
//
// Locking: mu is held shared by every request for its whole duration and
// exclusively by MakeEmpty and Close, which change or end the layout.
// meta guards the L1 table, the L2 cache, the end of the file and the
// writes of table entries; guest data is read and written without it
// (the container never overlaps a write with another request on the same
// cluster, so an entry never changes under a request using it).
type image struct {
	f       driver.File
	name    string
	ro      bool
	log     *slog.Logger
	hdr     header
	lo      layout
	backing string

	mu sync.RWMutex

	meta   sync.Mutex
	l1     []uint64
	cache  l2Cache
	end    int64 // the end of the file, where the next allocation goes
	closed bool

	zc zcache // recently inflated clusters

	cwMu sync.Mutex
	cw   *compWriter
}

func open(ctx context.Context, p *driver.OpenParams) (driver.Image, error) {
	flag := driver.ReadOnly
	if !p.ReadOnly {
		flag = driver.ReadWrite
	}
	// p.Direct is not passed on: L1 and L2 entries are updated with
	// 8-byte writes, which O_DIRECT refuses.
	f, err := p.Storage.Open(p.Name, flag)
	if err != nil {
		return nil, err
	}
	im, err := load(f, p.Name, p.ReadOnly, p.InfoOnly, p.Logger)
	if err != nil {
		f.Close()
		return nil, err
	}
	return im, nil
}

// load reads and validates an image from an open file.
func load(f driver.File, name string, ro, infoOnly bool, log *slog.Logger) (*image, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	fileSize, err := f.Size()
	if err != nil {
		return nil, driver.WithFile(err, "open", name)
	}
	h, lo, backing, err := readHeader(f, name, fileSize)
	if err != nil {
		return nil, err
	}
	im := &image{f: f, name: name, ro: ro, log: log, hdr: *h, lo: *lo, backing: backing, end: fileSize}
	im.cache.init(lo.l2Bytes)
	im.l1 = make([]uint64, lo.l1Len)
	if infoOnly {
		return im, nil
	}
	// The L1 table lies inside the file (readHeader checked), so this
	// allocation is bounded by the file size.
	raw := make([]byte, lo.l1Len*8)
	if err := driver.ReadFullAt(f, raw, lo.l1Off); err != nil {
		return nil, driver.WithFile(err, "read L1 table", name)
	}
	for i := range im.l1 {
		im.l1[i] = binary.BigEndian.Uint64(raw[i*8:])
	}
	return im, nil
}

func create(ctx context.Context, p *driver.CreateParams) (driver.Image, error) {
	if p.Options.Bool("encryption") || p.Options.String("encrypt.format") != "" || p.Options.String("encrypt.key-secret") != "" {
		if f := p.Options.String("encrypt.format"); f != "" && !strings.EqualFold(f, "aes") {
			return nil, driver.OptionErrorf("qcow: unsupported encryption format %q (qcow knows only 'aes')", f)
		}
		return nil, driver.Unsupportedf(p.Name, "creating AES-encrypted qcow images is not supported (the scheme is broken and qemu deprecated it; use LUKS or an unencrypted image)")
	}
	size := (p.Size + 511) &^ 511
	if size <= 0 {
		return nil, driver.OptionErrorf("qcow: image size is too small, cannot be zero length")
	}
	cb, l2b := geometry(p.ParentRef != nil)
	h := header{size: uint64(size), clusterBits: cb, l2Bits: l2b}
	var backing string
	if p.ParentRef != nil {
		backing = p.ParentRef.Name
		if backing == "" {
			return nil, driver.Unsupportedf(p.Name, "a qcow image records its backing file by name only, and the parent has none")
		}
		if len(backing) > maxBackingName {
			return nil, driver.OptionErrorf("qcow: backing file name of %d bytes is too long (at most %d)", len(backing), maxBackingName)
		}
		if strings.IndexByte(backing, 0) >= 0 {
			return nil, driver.OptionErrorf("qcow: backing file name contains a NUL byte")
		}
		h.backingOff, h.backingLen = headerSize, uint32(len(backing))
		if p.ParentRef.Format == "raw" {
			// qcow has no field for it: on reopening the backing file is
			// probed, and vdisk never guesses raw for a backing file.
			im := p.Logger
			if im == nil {
				im = slog.New(slog.DiscardHandler)
			}
			im.Warn("qcow cannot record the backing format; reopening this image needs the raw backing file named explicitly (parent format raw)",
				"image", p.Name, "backing", backing)
		}
	}
	hs := (int64(headerSize) + int64(len(backing)) + 7) &^ 7
	h.l1Off = uint64(hs)
	l1n := h.l1Entries()
	if l1n > maxL1Entries {
		return nil, driver.OptionErrorf("qcow: size %d is too large (at most %d L1 entries)", size, maxL1Entries)
	}
	l1Bytes := int64(l1n) * 8
	fileEnd := hs + (l1Bytes+511)&^511

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
	// No O_TRUNC (on ext4 closing a file truncated to zero forces its
	// writeback): an existing file's bytes are punched out, so none shows
	// through the new L1 table, and the file is cut to size below.
	if old, err := f.Size(); err != nil {
		return fail(err)
	} else if old > 0 {
		if err := f.PunchHole(0, old); err != nil {
			return fail(err)
		}
	}
	hb := append(h.encode(), backing...)
	if _, err := f.WriteAt(hb, 0); err != nil {
		return fail(err)
	}
	// The L1 table reads zeros from the sparse extension.
	if err := f.Truncate(fileEnd); err != nil {
		return fail(err)
	}
	im := &image{f: f, name: p.Name, log: p.Logger, hdr: h, backing: backing, end: fileEnd}
	if im.log == nil {
		im.log = slog.New(slog.DiscardHandler)
	}
	im.lo = layout{
		cb: uint(h.clusterBits), cs: 1 << h.clusterBits, l2Bits: uint(h.l2Bits), l2Bytes: 8 << h.l2Bits,
		l1Off: hs, l1Len: int64(l1n), size: size, offMask: 1<<(63-uint(h.clusterBits)) - 1,
		metaEnd: hs + l1Bytes,
	}
	im.cache.init(im.lo.l2Bytes)
	im.l1 = make([]uint64, l1n)
	return im, nil
}

// Size is the virtual size.
func (im *image) Size() int64 { return im.lo.size }

// hasBacking reports whether the image records a backing file: its
// unallocated clusters then show the chain below.
func (im *image) hasBacking() bool { return im.backing != "" }

// Parent returns the recorded backing file. qcow records no backing
// format, so the container probes it.
func (im *image) Parent() *driver.ParentRef {
	if im.backing == "" {
		return nil
	}
	return &driver.ParentRef{Name: im.backing}
}

// Flush waits for pending compressed writes and syncs the file; entries
// are written through, so nothing else is pending.
func (im *image) Flush() error {
	if im.ro {
		return nil
	}
	if err := im.drainCompressed(); err != nil {
		return err
	}
	if err := im.f.Sync(); err != nil {
		return driver.WithFile(err, "flush", im.name)
	}
	return nil
}

// Close stores pending compressed writes and closes the file.
func (im *image) Close() error {
	var first error
	if !im.ro {
		first = im.stopCompressed()
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	im.meta.Lock()
	im.closed = true
	im.meta.Unlock()
	if err := im.f.Close(); err != nil && first == nil {
		first = err
	}
	return first
}

// MakeEmpty unallocates every cluster (qemu's make_empty after a commit):
// the L1 table is cleared and synced, then the file is cut back to its
// metadata. A crash in between leaves unreferenced space only.
func (im *image) MakeEmpty() error {
	if im.ro {
		return driver.Errorf(driver.ErrReadOnly, im.name, -1, "image opened read-only")
	}
	if err := im.drainCompressed(); err != nil {
		return err
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	im.meta.Lock()
	defer im.meta.Unlock()
	clear(im.l1)
	if _, err := im.f.WriteAt(make([]byte, im.lo.l1Len*8), im.lo.l1Off); err != nil {
		return driver.WithFile(err, "write L1 table", im.name)
	}
	im.cache.reset()
	im.zc.reset()
	if err := im.f.Sync(); err != nil {
		return driver.WithFile(err, "sync", im.name)
	}
	if err := im.f.Truncate(im.lo.metaEnd); err != nil {
		return driver.WithFile(err, "truncate", im.name)
	}
	im.end = im.lo.metaEnd
	return nil
}

// Info describes the image.
func (im *image) Info() driver.Info {
	return driver.Info{
		Format:      "qcow",
		VirtualSize: im.Size(),
		ClusterSize: im.lo.cs,
		Specific: &Info{
			ClusterBits: int(im.lo.cb),
			L2Bits:      int(im.lo.l2Bits),
			L1Size:      im.lo.l1Len,
			MTime:       int64(im.hdr.mtime),
		},
	}
}

// Info is the format-specific information `info` shows (qemu shows none
// for qcow; these are the header's geometry fields).
type Info struct {
	ClusterBits int   `json:"cluster-bits"`
	L2Bits      int   `json:"l2-bits"`
	L1Size      int64 `json:"l1-size"`
	MTime       int64 `json:"mtime"`
}

// writable fails for read-only images.
func (im *image) writable(off int64) error {
	if im.ro {
		return driver.Errorf(driver.ErrReadOnly, im.name, off, "image opened read-only")
	}
	return nil
}
