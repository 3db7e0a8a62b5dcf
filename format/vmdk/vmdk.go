package vmdk

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"path"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/vdisk/vdisk/driver"
)

func init() { driver.Register(Format) }

// Subformats (qemu's names for createType).
var subformats = []string{"monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized"}

// Format is the VMDK format descriptor.
var Format = &driver.Format{
	Name:        "vmdk",
	Extensions:  []string{"vmdk"},
	Description: "VMware Virtual Machine Disk",
	Caps: driver.CapCreateFixed | driver.CapCreateDynamic | driver.CapCreateSplit | driver.CapDiff |
		driver.CapZero | driver.CapCompress | driver.CapUUID | driver.CapCheck | driver.CapWrite,
	CreateOptions: []driver.Option{
		{Name: "subformat", Type: driver.TypeEnum, Default: "monolithicSparse", Values: subformats,
			Doc: "VMDK flavour (createType)"},
		{Name: "adapter_type", Type: driver.TypeEnum, Default: "ide", Values: []string{"ide", "buslogic", "lsilogic", "legacyESX"},
			Doc: "virtual adapter type recorded in the descriptor"},
		{Name: "hwversion", Type: driver.TypeString, Doc: "VMDK hardware version (default 4)"},
		{Name: "toolsversion", Type: driver.TypeString, Doc: "VMware guest tools version (default 2147483647)"},
		{Name: "compat6", Type: driver.TypeBool, Default: "off", Doc: "VMDK version 6 image (hwversion 6)"},
		{Name: "zeroed_grain", Type: driver.TypeBool, Default: "off", Doc: "enable zeroed-grain GTEs"},
	},
	OpenOptions: []driver.Option{
		{Name: "allow_unsafe_extents", Type: driver.TypeBool, Default: "off",
			Doc: "follow extent file names that are absolute or leave the descriptor's directory"},
	},
	Probe:  probe,
	Create: create,
	Open:   open,
}

func probe(r io.ReaderAt, size int64) int {
	var b [4096]byte
	n, _ := r.ReadAt(b[:min(int64(len(b)), max(size, 0))], 0)
	if n < 4 {
		return 0
	}
	switch binary.LittleEndian.Uint32(b[:]) {
	case magicKDMV, magicCOWD:
		return 100
	}
	s := string(b[:n])
	if strings.HasPrefix(s, "# Disk DescriptorFile") {
		return 100
	}
	// Comments and blank lines, then version=N and a createType.
	for _, l := range strings.Split(s, "\n") {
		l = strings.TrimSpace(l)
		if l == "" || l[0] == '#' {
			continue
		}
		if strings.HasPrefix(strings.ToLower(l), "version=") && strings.Contains(strings.ToLower(s), "createtype") {
			return 100
		}
		return 0
	}
	return 0
}

// extent is one extent of the disk.
type extent struct {
	line    extentLine
	start   int64 // virtual byte offset
	size    int64
	path    string // resolved file name
	f       driver.File
	flatOff int64 // bytes
	sp      *sparse
	// refused is the path policy's refusal of the extent's file in an
	// InfoOnly image: the extent is then kept as NOACCESS (its header is
	// never read) and reads fail with this error.
	refused error
}

// image is an open VMDK disk.
type image struct {
	st   driver.Storage
	name string
	ro   bool
	log  *slog.Logger

	files map[string]driver.File // by resolved name, every open file
	main  driver.File
	// refs opens extent files under the path policy (OpenReferenced).
	refs driver.OpenParams

	flushMu    sync.Mutex // one Flush (or metadata write-back) at a time
	mu         sync.Mutex // guards desc, cid, the descriptor's file
	desc       *descriptor
	descEmbed  bool  // the descriptor lives in the sparse file main
	descOff    int64 // bytes, embedded
	descCap    int64 // bytes available for an embedded descriptor
	noDesc     bool  // a bare sparse file: there is no descriptor to write
	cid        uint32
	parentCID  uint32
	createType string
	cidDone    bool
	// hasParent: the descriptor records a parent (parentCID or
	// parentFileNameHint), so unallocated grains read what the chain below
	// shows and a partial write into one asks the container to fill it.
	hasParent atomic.Bool

	exts []*extent
	size int64

	stream *streamWriter // a streamOptimized image being written
}

func open(ctx context.Context, p *driver.OpenParams) (driver.Image, error) {
	im := &image{st: p.Storage, name: p.Name, ro: p.ReadOnly, log: p.Logger, files: map[string]driver.File{}, refs: *p}
	if im.log == nil {
		im.log = slog.New(slog.DiscardHandler)
	}
	if p.Options.Bool("allow_unsafe_extents") {
		im.refs.Paths = driver.PathTrusted
	}
	if err := im.load(im.refs.Policy() == driver.PathTrusted); err != nil {
		im.closeFiles()
		return nil, err
	}
	return im, nil
}

func (im *image) openFile(name string) (driver.File, error) {
	if f, ok := im.files[name]; ok {
		return f, nil
	}
	flag := driver.ReadOnly
	if !im.ro {
		flag = driver.ReadWrite
	}
	f, err := im.st.Open(name, flag)
	if err != nil {
		return nil, err
	}
	im.files[name] = f
	return f, nil
}

func (im *image) closeFiles() error {
	var first error
	for _, f := range im.files {
		if err := f.Close(); err != nil && first == nil {
			first = err
		}
	}
	im.files = map[string]driver.File{}
	return first
}

// load opens the descriptor (or monolithic sparse file) and every extent.
func (im *image) load(unsafe bool) error {
	f, err := im.openFile(im.name)
	if err != nil {
		return err
	}
	im.main = f
	fsz, err := f.Size()
	if err != nil {
		return driver.WithFile(err, "open", im.name)
	}
	var magic [4]byte
	if fsz >= 4 {
		if err := driver.ReadFullAt(f, magic[:], 0); err != nil {
			return driver.WithFile(err, "read", im.name)
		}
	}
	switch binary.LittleEndian.Uint32(magic[:]) {
	case magicKDMV, magicCOWD:
		return im.loadMonolithic(f, fsz, unsafe)
	}
	if fsz > maxDescriptor {
		return driver.Corruptf(im.name, 0, "descriptor file of %d bytes is larger than the %d-byte limit", fsz, maxDescriptor)
	}
	text := make([]byte, fsz)
	if err := driver.ReadFullAt(f, text, 0); err != nil {
		return driver.WithFile(err, "read descriptor", im.name)
	}
	d, err := parseDescriptor(text, im.name, 0)
	if err != nil {
		return err
	}
	im.desc = d
	if err := im.readDescKeys(); err != nil {
		return err
	}
	return im.loadExtents(unsafe)
}

// loadMonolithic opens a file that starts with a sparse header: the disk is
// that one extent; an embedded descriptor supplies CID, createType and the
// disk database (qemu does the same, ignoring its extent lines).
func (im *image) loadMonolithic(f driver.File, fsz int64, unsafe bool) error {
	sp, err := openSparse(f, im.name)
	if err != nil {
		return err
	}
	if !sp.cowd && sp.h.capacity == 0 && sp.h.descOffset != 0 {
		// A descriptor inside a sparse file that lists other extents.
		return im.loadEmbeddedWithExtents(sp, fsz, unsafe)
	}
	im.createType = "monolithicSparse"
	if sp.compressed {
		im.createType = "streamOptimized"
	}
	if sp.cowd {
		im.createType = "vmfsSparse"
	}
	im.cid, im.parentCID = 0xffffffff, 0xffffffff
	if !sp.cowd && sp.h.descOffset != 0 && sp.h.descSize != 0 {
		if err := im.readEmbedded(sp, fsz); err != nil {
			return err
		}
	}
	if im.desc == nil {
		// A bare sparse file without a descriptor: nothing to rewrite.
		im.desc, im.noDesc = &descriptor{}, true
	}
	im.exts = []*extent{{line: extentLine{access: "RW", sectors: sp.capacity / sectorSize, kind: "SPARSE", file: path.Base(im.name)},
		size: sp.capacity, path: im.name, f: f, sp: sp}}
	im.size = sp.capacity
	if sp.cowd || (sp.h.version == 3 && !sp.compressed) {
		im.exts[0].line.access = "RDONLY"
	}
	return nil
}

func (im *image) readEmbedded(sp *sparse, fsz int64) error {
	off := int64(sp.h.descOffset) * sectorSize
	n := int64(sp.h.descSize) * sectorSize
	if sp.h.descOffset > maxSectors || sp.h.descSize > maxDescriptor/sectorSize {
		return driver.Corruptf(im.name, 28, "embedded descriptor of %d sectors is larger than the %d-byte limit", sp.h.descSize, maxDescriptor)
	}
	if off+n > fsz {
		return driver.Corruptf(im.name, 28, "embedded descriptor at offset %d runs past the end of the %d-byte file", off, fsz)
	}
	text := make([]byte, n)
	if err := driver.ReadFullAt(im.main, text, off); err != nil {
		return driver.WithFile(err, "read descriptor", im.name)
	}
	d, err := parseDescriptor(text, im.name, off)
	if err != nil {
		return err
	}
	im.desc, im.descEmbed, im.descOff, im.descCap = d, true, off, n
	return im.readDescKeys()
}

func (im *image) loadEmbeddedWithExtents(sp *sparse, fsz int64, unsafe bool) error {
	if err := im.readEmbedded(sp, fsz); err != nil {
		return err
	}
	if len(im.desc.extents) == 0 {
		return driver.Corruptf(im.name, im.descOff, "descriptor lists no extents")
	}
	return im.loadExtents(unsafe)
}

// readDescKeys reads CID, parentCID and createType.
func (im *image) readDescKeys() error {
	d := im.desc
	im.cid, im.parentCID = 0xffffffff, 0xffffffff
	if v, ok := d.get("CID"); ok {
		c, ok := hex32(v)
		if !ok {
			return driver.Corruptf(im.name, -1, "invalid CID %q", clip(v))
		}
		im.cid = c
	}
	if v, ok := d.get("parentCID"); ok {
		c, ok := hex32(v)
		if !ok {
			return driver.Corruptf(im.name, -1, "invalid parentCID %q", clip(v))
		}
		im.parentCID = c
	}
	if v, ok := d.get("createType"); ok {
		im.createType = v
	}
	im.refreshParent()
	return nil
}

// refreshParent records whether the descriptor names a parent (the same
// test as Parent). Called with mu held, or before the image is shared.
func (im *image) refreshParent() {
	_, hint := im.desc.get("parentFileNameHint")
	im.hasParent.Store(im.parentCID != 0xffffffff || hint)
}

// openExtent opens the extent file name recorded in the descriptor, once
// per resolved name, through the path policy (driver.OpenReferenced): the
// only way a name read from the descriptor becomes an open file.
func (im *image) openExtent(i int, name string, unsafe bool) (driver.File, string, error) {
	full, err := driver.ResolveReferenced(im.name, "extent file", name, unsafe)
	if err == nil {
		if path.Clean(full) == path.Clean(im.name) {
			return nil, "", driver.Corruptf(im.name, -1, "extent %d is the descriptor file itself", i)
		}
		if f, ok := im.files[full]; ok {
			return f, full, nil
		}
	}
	flag := driver.ReadOnly
	if !im.ro {
		flag = driver.ReadWrite
	}
	f, full, err := im.refs.OpenReferenced("extent file", name, flag)
	if err != nil {
		var pe *driver.PathError
		if errors.As(err, &pe) {
			return nil, "", err
		}
		return nil, "", driver.WithFile(err, "open extent", full)
	}
	if old, ok := im.files[full]; ok {
		// A refused name (InfoOnly) met again.
		f.Close()
		return old, full, nil
	}
	im.files[full] = f
	return f, full, nil
}

// loadExtents opens the extents the descriptor lists.
func (im *image) loadExtents(unsafe bool) error {
	ct := strings.ToLower(im.createType)
	switch ct {
	case "fulldevice", "partitioneddevice", "vmfsraw", "vmfsrawdevicemap", "vmfspassthroughrawdevicemap":
		return driver.Unsupportedf(im.name, "createType %q gives access to a raw host device; vdisk does not open raw devices", im.createType)
	case "":
		return driver.Corruptf(im.name, -1, "descriptor has no createType")
	}
	d := im.desc
	if len(d.extents) == 0 {
		return driver.Corruptf(im.name, -1, "descriptor lists no extents")
	}
	var pos int64
	sparseFiles := map[string]bool{}
	for i, el := range d.extents {
		if el.sectors > maxSectors || pos+el.sectors*sectorSize > maxSectors*sectorSize {
			return driver.Corruptf(im.name, -1, "extent %d makes the disk larger than the %d-sector limit", i, int64(maxSectors))
		}
		e := &extent{line: el, start: pos, size: el.sectors * sectorSize}
		if el.sectors == 0 {
			continue // qemu skips empty extents too
		}
		switch el.kind {
		case "ZERO":
		case "FLAT", "VMFS", "SPARSE", "VMFSSPARSE":
			if el.access == "NOACCESS" {
				break
			}
			f, p, err := im.openExtent(i, el.file, unsafe)
			if err != nil {
				return err
			}
			e.path, e.f = p, f
			if el.kind == "FLAT" || el.kind == "VMFS" {
				e.flatOff = el.offset * sectorSize
				break
			}
			if sparseFiles[p] {
				return driver.Corruptf(im.name, -1, "sparse extent file %s is listed twice", p)
			}
			sparseFiles[p] = true
			if _, err := e.f.Size(); err != nil {
				// A refused extent of an InfoOnly image: keep the
				// extent without reading its header, so info can still
				// show the image and the name it refused.
				var pe *driver.PathError
				if errors.As(err, &pe) {
					e.refused, e.line.access = err, "NOACCESS"
					break
				}
			}
			if e.sp, err = openSparse(e.f, p); err != nil {
				return err
			}
			if e.sp.capacity < e.size {
				return driver.Corruptf(p, 12, "sparse extent holds %d bytes, the descriptor gives it %d", e.sp.capacity, e.size)
			}
			// VMFS sparse is read only here; version 3 hosted sparse
			// extents carry changed-block tracking that writes would
			// make stale (qemu opens them read-only too).
			if e.sp.cowd || el.kind == "VMFSSPARSE" || (e.sp.h.version == 3 && !e.sp.compressed) {
				e.line.access = "RDONLY"
			}
		default:
			return driver.Unsupportedf(im.name, "extent type %s", el.kind)
		}
		im.exts = append(im.exts, e)
		pos += e.size
	}
	im.size = pos
	return nil
}

// find returns the index of the extent holding virtual offset off.
func (im *image) find(off int64) int {
	return sort.Search(len(im.exts), func(i int) bool { return im.exts[i].start+im.exts[i].size > off })
}

func (im *image) Size() int64 { return im.size }

// erun is a run inside one extent.
type erun struct {
	st      driver.State
	n       int64
	fileOff int64 // byte offset in e.f for uncompressed data, else -1
	e       *extent
	gte     uint32 // compressed grain entry
}

func (im *image) runAt(off, n int64) (erun, error) {
	i := im.find(off)
	if i >= len(im.exts) {
		return erun{}, driver.Errorf(driver.ErrOutOfRange, im.name, off, "offset past the end of the disk")
	}
	e := im.exts[i]
	rel := off - e.start
	n = min(n, e.size-rel)
	if e.refused != nil {
		return erun{}, e.refused
	}
	if e.line.access == "NOACCESS" {
		return erun{}, driver.Errorf(driver.ErrUnsupported, im.name, off, "extent %d is NOACCESS", i)
	}
	switch e.line.kind {
	case "ZERO":
		return erun{st: driver.Zero, n: n, fileOff: -1, e: e}, nil
	case "FLAT", "VMFS":
		return erun{st: driver.Data, n: n, fileOff: e.flatOff + rel, e: e}, nil
	}
	st, ln, foff, err := e.sp.run(rel, n)
	if err != nil {
		return erun{}, err
	}
	r := erun{st: st, n: ln, fileOff: foff, e: e}
	if st == driver.Data && foff < 0 {
		r.gte, err = e.sp.gte(rel / e.sp.grain)
	}
	return r, err
}

func (im *image) Status(off, n int64) (driver.Extent, error) {
	if err := driver.CheckRange(im.name, off, n, im.size); err != nil {
		return driver.Extent{}, err
	}
	r, err := im.runAt(off, n)
	if err != nil {
		return driver.Extent{}, err
	}
	x := driver.Extent{State: r.st, Length: r.n, Offset: -1}
	if r.st == driver.Data && r.fileOff >= 0 && r.e.f == im.main {
		x.Offset = r.fileOff
	}
	return x, nil
}

func (im *image) ReadAt(p []byte, off int64) (int, error) {
	if err := driver.CheckRange(im.name, off, int64(len(p)), im.size); err != nil {
		return 0, err
	}
	done := 0
	var gbuf []byte
	for done < len(p) {
		r, err := im.runAt(off+int64(done), int64(len(p)-done))
		if err != nil {
			return done, err
		}
		q := p[done : done+int(r.n)]
		switch {
		case r.st == driver.Zero, r.st == driver.Unallocated:
			// The container reads unallocated runs from the chain
			// below; asked anyway, they read as zeros.
			clear(q)
		case r.fileOff >= 0:
			if r.e.sp != nil {
				err = r.e.sp.readData(q, r.fileOff)
			} else {
				err = readFlat(r.e, q, r.fileOff)
			}
			if err != nil {
				return done, err
			}
		default:
			sp := r.e.sp
			if int64(len(gbuf)) < sp.grain {
				gbuf = make([]byte, sp.grain)
			}
			if err := sp.readCompressed(r.gte, gbuf[:sp.grain]); err != nil {
				return done, err
			}
			in := (off + int64(done) - r.e.start) % sp.grain
			copy(q, gbuf[in:])
		}
		done += int(r.n)
	}
	return done, nil
}

func readFlat(e *extent, p []byte, off int64) error {
	n, err := e.f.ReadAt(p, off)
	if n < len(p) {
		if err != nil && err != io.EOF {
			return driver.WithFile(err, "read", e.path)
		}
		clear(p[n:]) // a flat extent file shorter than the extent reads zeros
	}
	return nil
}

// beginWrite refreshes the CID on the first write of the session.
func (im *image) beginWrite(off int64) error {
	if im.ro {
		return driver.Errorf(driver.ErrReadOnly, im.name, off, "image opened read-only")
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.cidDone || im.stream != nil {
		return nil
	}
	c := rand.Uint32()
	for c == 0xffffffff || c == 0xfffffffe || c == im.cid {
		c = rand.Uint32()
	}
	old := im.cid
	im.cid = c
	im.desc.set("CID", fmt.Sprintf("%08x", c), false)
	if err := im.writeDescriptor(); err != nil {
		im.cid = old
		return err
	}
	im.cidDone = true
	return nil
}

// writeDescriptor writes the descriptor back. Called with mu held.
func (im *image) writeDescriptor() error {
	if im.noDesc {
		return nil
	}
	b := im.desc.bytes()
	if im.descEmbed {
		if int64(len(b)) > im.descCap {
			return driver.Errorf(driver.ErrUnsupported, im.name, im.descOff, "descriptor of %d bytes does not fit the %d bytes reserved for it", len(b), im.descCap)
		}
		pad := make([]byte, im.descCap)
		copy(pad, b)
		_, err := im.main.WriteAt(pad, im.descOff)
		return driver.WithFile(err, "write descriptor", im.name)
	}
	if _, err := im.main.WriteAt(b, 0); err != nil {
		return driver.WithFile(err, "write descriptor", im.name)
	}
	return driver.WithFile(im.main.Truncate(int64(len(b))), "write descriptor", im.name)
}

func (im *image) WriteAt(p []byte, off int64) (int, error) {
	if err := driver.CheckRange(im.name, off, int64(len(p)), im.size); err != nil {
		return 0, err
	}
	if im.stream != nil {
		if err := im.stream.writeAt(p, off); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	if err := im.checkWritable(off, int64(len(p)), false); err != nil {
		return 0, err
	}
	if err := im.needFill(off, int64(len(p))); err != nil {
		return 0, err
	}
	if err := im.beginWrite(off); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		o := off + int64(done)
		e := im.exts[im.find(o)]
		rel := o - e.start
		n := min(int64(len(p)-done), e.size-rel)
		if err := im.writeExtent(e, p[done:done+int(n)], rel); err != nil {
			return done, err
		}
		done += int(n)
	}
	return done, nil
}

// checkWritable refuses a write (or zeroing) touching an extent that
// cannot take it, before anything changes.
func (im *image) checkWritable(off, n int64, zero bool) error {
	if im.ro {
		return driver.Errorf(driver.ErrReadOnly, im.name, off, "image opened read-only")
	}
	for i := im.find(off); i < len(im.exts) && im.exts[i].start < off+n; i++ {
		e := im.exts[i]
		if zero && e.line.kind == "ZERO" {
			continue
		}
		if err := im.extentWritable(e, max(off, e.start)-e.start); err != nil {
			return err
		}
	}
	return nil
}

// needFill returns a *driver.FillError when [off, off+n) covers only part
// of an unallocated grain at its head or tail (the only places a request
// can cover a grain partly) in an image that records a parent: the rest of
// such a grain must keep what the chain below shows, which only the
// container can read. The error asks for the request extended to those
// whole grains (a grain ends early at the end of its extent). Without a
// parent, allocating grains are filled with zeros, and zeroed grains are
// the image's own zeros; flat extents are always allocated.
func (im *image) needFill(off, n int64) error {
	if n <= 0 || !im.hasParent.Load() {
		return nil
	}
	start, end := off, off+n
	for _, o := range []int64{off, off + n - 1} {
		e := im.exts[im.find(o)]
		if e.sp == nil {
			continue
		}
		g := (o - e.start) / e.sp.grain
		gs := e.start + g*e.sp.grain
		ge := min(gs+e.sp.grain, e.start+e.size)
		if gs >= off && ge <= off+n {
			continue // covered whole
		}
		v, err := e.sp.gte(g)
		if err != nil {
			return err
		}
		if e.sp.grainState(v) != driver.Unallocated {
			continue
		}
		start, end = min(start, gs), max(end, ge)
	}
	if start < off || end > off+n {
		return driver.NeedFill(im.name, start, end)
	}
	return nil
}

func (im *image) extentWritable(e *extent, rel int64) error {
	switch {
	case e.line.access != "RW":
		return driver.Errorf(driver.ErrReadOnly, im.name, e.start+rel, "extent %s is %s (VMFS sparse and version 3 sparse extents are read only)", e.line.file, e.line.access)
	case e.line.kind == "ZERO":
		return driver.Errorf(driver.ErrUnsupported, im.name, e.start+rel, "cannot write into a ZERO extent")
	case e.sp != nil && e.sp.compressed:
		return driver.Errorf(driver.ErrUnsupported, e.path, e.start+rel, "stream-optimized (compressed) extents cannot be modified; convert the image to another subformat")
	}
	return nil
}

func (im *image) writeExtent(e *extent, p []byte, rel int64) error {
	if err := im.extentWritable(e, rel); err != nil {
		return err
	}
	if e.sp == nil {
		_, err := e.f.WriteAt(p, e.flatOff+rel)
		return driver.WithFile(err, "write", e.path)
	}
	sp := e.sp
	done := int64(0)
	for done < int64(len(p)) {
		r := rel + done
		g, in := r/sp.grain, r%sp.grain
		n := min(int64(len(p))-done, sp.grain-in)
		if err := im.writeGrain(e, g, in, p[done:done+n]); err != nil {
			return err
		}
		done += n
	}
	return nil
}

// writeGrain writes q at offset in inside grain g of sparse extent e.
func (im *image) writeGrain(e *extent, g, in int64, q []byte) error {
	sp := e.sp
	v, err := sp.gte(g)
	if err != nil {
		return err
	}
	if sp.grainState(v) == driver.Data {
		off := int64(v) * sectorSize
		if off < sectorSize {
			return driver.Corruptf(e.path, off, "grain %d points into the header", g)
		}
		sp.mu.Lock()
		end := sp.fileSizeNow()
		sp.mu.Unlock()
		if off >= end {
			return driver.Corruptf(e.path, off, "grain %d points past the end of the file", g)
		}
		_, err := e.f.WriteAt(q, off+in)
		return driver.WithFile(err, "write", e.path)
	}
	// Allocate the whole grain. A partial write lands here only where
	// the rest reads zeros: an image without a parent, or a zeroed grain
	// (needFill asked the container to fill the others).
	gl := sp.grain
	if v == 0 && im.hasParent.Load() && (in > 0 || in+int64(len(q)) < min(gl, e.size-g*gl)) {
		return driver.Errorf(driver.ErrUnsupported, e.path, e.start+g*gl+in,
			"internal error: partial write into unallocated grain %d of a delta disk was not filled", g)
	}
	buf := q
	if int64(len(q)) != gl {
		buf = make([]byte, gl)
		copy(buf[in:], q)
	}
	off, err := sp.reserve()
	if err != nil {
		return err
	}
	if _, err := e.f.WriteAt(buf, off); err != nil {
		return driver.WithFile(err, "write", e.path)
	}
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return sp.setGTE(g, uint32(off/sectorSize))
}

// WriteZeroes zeroes [off, off+n). Whole grains become zeroed-grain
// entries where the extent enables them, or unallocated in a base image
// with unmap; the rest is written as zeros. Part of an unallocated grain
// in an image with a parent needs the parent's content around it: then
// nothing is changed and a *driver.FillError is returned (see needFill).
func (im *image) WriteZeroes(off, n int64, unmap bool) error {
	if err := driver.CheckRange(im.name, off, n, im.size); err != nil {
		return err
	}
	if im.stream != nil {
		return im.stream.writeZeroes(off, n)
	}
	if err := im.checkWritable(off, n, true); err != nil {
		return err
	}
	if err := im.needFill(off, n); err != nil {
		return err
	}
	if err := im.beginWrite(off); err != nil {
		return err
	}
	for n > 0 {
		e := im.exts[im.find(off)]
		rel := off - e.start
		k := min(n, e.size-rel)
		if err := im.zeroExtent(e, rel, k, unmap); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

func (im *image) zeroExtent(e *extent, rel, n int64, unmap bool) error {
	if e.line.kind == "ZERO" {
		return nil
	}
	if err := im.extentWritable(e, rel); err != nil {
		return err
	}
	if e.sp == nil {
		if unmap {
			return driver.WithFile(e.f.PunchHole(e.flatOff+rel, n), "punch hole", e.path)
		}
		return driver.WithFile(driver.WriteZeros(e.f, e.flatOff+rel, n), "write", e.path)
	}
	sp := e.sp
	parent := im.hasParent.Load()
	for n > 0 {
		g, in := rel/sp.grain, rel%sp.grain
		k := min(n, sp.grain-in)
		whole := in == 0 && (k == sp.grain || rel+k == e.size)
		v, err := sp.gte(g)
		if err != nil {
			return err
		}
		st := sp.grainState(v)
		switch {
		case st == driver.Zero:
		case st == driver.Unallocated && !parent:
		case whole && sp.zeroGrain && (unmap || st == driver.Unallocated):
			sp.mu.Lock()
			err = sp.setGTE(g, gteZeroed)
			sp.mu.Unlock()
		case whole && unmap && !parent:
			sp.mu.Lock()
			err = sp.setGTE(g, 0)
			sp.mu.Unlock()
		default:
			err = im.writeGrain(e, g, in, make([]byte, k))
		}
		if err != nil {
			return err
		}
		rel += k
		n -= k
	}
	return nil
}

// Discard makes every whole grain of the sparse extents inside [off, off+n)
// unallocated (grain table entry 0): it reads through to the parent in a
// delta disk and as zeros in a base. Parts of grains stay as they are; flat
// extents have no allocation units and stay as they are. The grains' file
// space is not reused (as with qemu's unmapping zero writes, which leave
// it to a convert to reclaim); qemu-img check does not count it as leaked.
func (im *image) Discard(off, n int64) error {
	if err := driver.CheckRange(im.name, off, n, im.size); err != nil || n == 0 {
		return err
	}
	if im.stream != nil {
		return driver.Errorf(driver.ErrUnsupported, im.name, off, "a streamOptimized image being written cannot discard")
	}
	if err := im.checkWritable(off, n, true); err != nil {
		return err
	}
	if err := im.beginWrite(off); err != nil {
		return err
	}
	for n > 0 {
		e := im.exts[im.find(off)]
		rel := off - e.start
		k := min(n, e.size-rel)
		if sp := e.sp; sp != nil {
			first := (rel + sp.grain - 1) / sp.grain
			last := (rel + k) / sp.grain // exclusive
			if rel+k == e.size {
				last = (e.size + sp.grain - 1) / sp.grain // a short last grain is whole
			}
			if first < last {
				if err := sp.unmap(first, last); err != nil {
					return err
				}
			}
		}
		off += k
		n -= k
	}
	return nil
}

func (im *image) Flush() error {
	if im.stream != nil {
		if err := im.stream.wait(); err != nil {
			return err
		}
	}
	if im.ro {
		return nil
	}
	im.flushMu.Lock()
	defer im.flushMu.Unlock()
	// The tables as they are now point only at grains written already:
	// take them, make those grains durable, then write the tables.
	ups := im.takeMeta()
	if err := im.syncFiles(); err != nil {
		im.putBack(ups)
		return err
	}
	if len(ups) == 0 {
		return nil
	}
	if err := im.writeMeta(ups); err != nil {
		return err
	}
	return im.syncFiles()
}

func (im *image) syncFiles() error {
	for n, f := range im.files {
		if err := f.Sync(); err != nil {
			return driver.WithFile(err, "sync", n)
		}
	}
	return nil
}

// takeMeta collects the metadata changed in memory of every sparse extent.
func (im *image) takeMeta() map[*sparse]*metaUpdate {
	ups := map[*sparse]*metaUpdate{}
	for _, e := range im.exts {
		if sp := e.sp; sp != nil && ups[sp] == nil {
			sp.mu.Lock()
			if u := sp.takeMeta(); u != nil {
				ups[sp] = u
			}
			sp.mu.Unlock()
		}
	}
	return ups
}

func (im *image) putBack(ups map[*sparse]*metaUpdate) {
	for sp, u := range ups {
		sp.mu.Lock()
		sp.putBack(u)
		sp.mu.Unlock()
	}
}

// writeMeta writes the collected metadata; what fails to be written stays
// dirty for the next flush.
func (im *image) writeMeta(ups map[*sparse]*metaUpdate) error {
	var first error
	for sp, u := range ups {
		if err := sp.writeMeta(u); err != nil {
			sp.mu.Lock()
			sp.putBack(u)
			sp.mu.Unlock()
			if first == nil {
				first = err
			}
		}
	}
	return first
}

// writeBack writes the metadata held in memory without syncing (Close,
// Check).
func (im *image) writeBack() error {
	if im.ro || im.stream != nil {
		return nil
	}
	im.flushMu.Lock()
	defer im.flushMu.Unlock()
	return im.writeMeta(im.takeMeta())
}

func (im *image) Close() error {
	var err error
	if im.stream != nil {
		err = im.stream.finish()
		im.stream = nil
	} else {
		err = im.writeBack()
	}
	if cerr := im.closeFiles(); err == nil {
		err = cerr
	}
	return err
}

func (im *image) Parent() *driver.ParentRef {
	im.mu.Lock()
	defer im.mu.Unlock()
	hint, ok := im.desc.get("parentFileNameHint")
	if im.parentCID == 0xffffffff && !ok {
		return nil
	}
	ref := &driver.ParentRef{Name: hint, Format: "vmdk"}
	if im.parentCID != 0xffffffff {
		// The parent's CID changes whenever the parent is written (a commit
		// into it, a crash half-way through one), so it identifies a
		// version, not the parent: a mismatch is a warning, as for other
		// formats' modification UUIDs (qemu does not check it at all).
		// Only a reference without a file name has to find its parent by
		// it.
		ref.ModUUID = fmt.Sprintf("%08x", im.parentCID)
		if !ok {
			ref.UUID = ref.ModUUID
		}
	}
	return ref
}

// clusterSize is the grain size of the first sparse extent (0 when flat).
func (im *image) clusterSize() int64 {
	for _, e := range im.exts {
		if e.sp != nil {
			return e.sp.grain
		}
	}
	return 0
}

// ExtentInfo describes one extent as qemu-img info does.
type ExtentInfo struct {
	Filename    string `json:"filename"`
	Format      string `json:"format"`
	VirtualSize int64  `json:"virtual-size"`
	ClusterSize int64  `json:"cluster-size,omitempty"`
	Compressed  bool   `json:"compressed,omitempty"`
	Access      string `json:"access,omitempty"`
	Offset      int64  `json:"offset,omitempty"`
}

// Info is VMDK's format-specific information (qemu's field names first).
type Info struct {
	CID         uint32       `json:"cid"`
	ParentCID   uint32       `json:"parent-cid"`
	CreateType  string       `json:"create-type"`
	Extents     []ExtentInfo `json:"extents"`
	AdapterType string       `json:"adapter-type,omitempty"`
	HWVersion   string       `json:"hwversion,omitempty"`
	Geometry    *driver.CHS  `json:"geometry,omitempty"`
	ParentHint  string       `json:"parent-filename-hint,omitempty"`
}

func (im *image) Info() driver.Info {
	im.mu.Lock()
	defer im.mu.Unlock()
	s := &Info{CID: im.cid, ParentCID: im.parentCID, CreateType: im.createType}
	for _, e := range im.exts {
		x := ExtentInfo{Filename: e.path, VirtualSize: e.size, Offset: e.flatOff}
		if e.line.access != "RW" {
			x.Access = e.line.access
		}
		if e.sp != nil {
			x.ClusterSize = e.sp.grain
			x.Compressed = e.sp.compressed
		}
		if im.descEmbed || e.f != im.main || len(im.desc.extents) > 0 {
			x.Format = e.line.kind
		}
		if len(im.exts) == 1 && e.f == im.main {
			x.Format = "" // qemu leaves the type of a monolithic sparse extent empty
		}
		s.Extents = append(s.Extents, x)
	}
	s.AdapterType, _ = im.desc.get("ddb.adapterType")
	s.HWVersion, _ = im.desc.get("ddb.virtualHWVersion")
	if g, ok := im.chs("ddb.geometry."); ok {
		s.Geometry = &g
	}
	s.ParentHint, _ = im.desc.get("parentFileNameHint")
	return driver.Info{Format: "vmdk", VirtualSize: im.size, ClusterSize: im.clusterSize(), Specific: s}
}

// chs reads a geometry from the disk database (prefix "ddb.geometry." or
// "ddb.geometry.bios"). Called with mu held.
func (im *image) chs(prefix string) (driver.CHS, bool) {
	var g driver.CHS
	for _, f := range []struct {
		k string
		p *uint32
	}{{"cylinders", &g.Cylinders}, {"heads", &g.Heads}, {"sectors", &g.Sectors}} {
		v, ok := im.desc.get(prefix + f.k)
		if !ok {
			return g, false
		}
		n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 32)
		if err != nil {
			return g, false
		}
		*f.p = uint32(n)
	}
	return g, true
}
