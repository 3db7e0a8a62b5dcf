package qcow2

import (
	"context"
	"path/filepath"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/prealloc"
)

// createOpts are the validated create options.
type createOpts struct {
	version   uint32
	cs        int64
	extL2     bool
	rorder    uint32
	lazy      bool
	prealloc  string
	dataFile  string
	dataRaw   bool
	ctype     uint8
	backing   string
	backFmt   string
	hasBackFm bool
	encrypt   bool // encrypt.format=luks
}

func parseCreateOpts(p *driver.CreateParams) (*createOpts, error) {
	o := p.Options
	c := &createOpts{version: 3, cs: 64 << 10, rorder: 4, prealloc: "off"}
	switch o.String("compat") {
	case "0.10", "v2":
		c.version = 2
	}
	if o.Has("cluster_size") {
		c.cs = o.Int("cluster_size")
	}
	if c.cs < 512 || c.cs > 2<<20 || c.cs&(c.cs-1) != 0 {
		return nil, driver.OptionErrorf("cluster size must be a power of two between 512 and 2M")
	}
	c.extL2 = o.Bool("extended_l2")
	if o.Has("refcount_bits") {
		rb := o.Int("refcount_bits")
		if rb < 1 || rb > 64 || rb&(rb-1) != 0 {
			return nil, driver.OptionErrorf("refcount_bits must be a power of two between 1 and 64")
		}
		c.rorder = uint32(log2(rb))
	}
	c.lazy = o.Bool("lazy_refcounts")
	if s := o.String("preallocation"); s != "" {
		c.prealloc = s
	}
	c.dataFile = o.String("data_file")
	c.dataRaw = o.Bool("data_file_raw")
	if o.String("compression_type") == "zstd" {
		c.ctype = compressionZstd
	}
	if p.ParentRef != nil {
		c.backing = p.ParentRef.Name
		c.backFmt = p.ParentRef.Format
		c.hasBackFm = c.backFmt != ""
		if len(c.backing) > maxBackingNameLen {
			return nil, driver.OptionErrorf("backing file name too long (%d bytes, at most %d)", len(c.backing), maxBackingNameLen)
		}
		if c.backing == "" {
			return nil, driver.OptionErrorf("qcow2 records the backing file by name; an empty name cannot be recorded")
		}
	}
	if c.version == 2 {
		switch {
		case c.rorder != 4:
			return nil, driver.OptionErrorf("different refcount widths than 16 bits require compat=1.1")
		case c.extL2:
			return nil, driver.OptionErrorf("extended L2 entries require compat=1.1")
		case c.lazy:
			return nil, driver.OptionErrorf("lazy refcounts require compat=1.1")
		case c.dataFile != "":
			return nil, driver.OptionErrorf("external data files require compat=1.1")
		case c.ctype != compressionZlib:
			return nil, driver.OptionErrorf("compression_type=zstd requires compat=1.1")
		}
	}
	if c.extL2 && c.cs < 16<<10 {
		return nil, driver.OptionErrorf("extended L2 entries need a cluster size of at least 16K")
	}
	if c.dataRaw && c.dataFile == "" {
		return nil, driver.OptionErrorf("data_file_raw requires data_file")
	}
	if c.dataRaw && c.backing != "" {
		return nil, driver.OptionErrorf("a raw external data file (data_file_raw) cannot be used with a backing file")
	}
	if c.backing != "" && c.prealloc != "off" && !c.extL2 {
		return nil, driver.OptionErrorf("backing file and preallocation can only be used together with extended_l2=on")
	}
	if len(c.dataFile) > maxDataFileNameLen {
		return nil, driver.OptionErrorf("data file name too long")
	}
	if err := checkEncryptCreate(o, c); err != nil {
		return nil, err
	}
	return c, nil
}

// createLayout computes where the initial tables go: header, refcount
// table, refcount blocks, L1 table (qemu's order), all covered by the
// refcount blocks.
func createLayout(cs int64, rorder uint32, l1Entries int64) (rtClust, rbCount, l1Clust, total int64) {
	perRB := cs * 8 / (int64(1) << rorder)
	l1Clust = (l1Entries*8 + cs - 1) / cs
	rtClust, rbCount = 1, 1
	for {
		total = 1 + rtClust + rbCount + l1Clust
		nb := (total + perRB - 1) / perRB
		nt := (nb*8 + cs - 1) / cs
		if nb == rbCount && nt == rtClust {
			return
		}
		rbCount, rtClust = nb, nt
	}
}

func create(ctx context.Context, p *driver.CreateParams) (driver.Image, error) {
	c, err := parseCreateOpts(p)
	if err != nil {
		return nil, err
	}
	h, g, err := createHeader(c, p.Size)
	if err != nil {
		return nil, err
	}
	hb, err := h.encode(c.cs)
	if err != nil {
		return nil, err
	}
	// Truncating a file to zero makes ext4 write the whole file back when
	// it is closed (auto_da_alloc), which costs a convert as much as a
	// sync: an existing file is cut to the initial size instead.
	flag := driver.ReadWrite | driver.Create
	if !p.Overwrite {
		flag |= driver.Excl
	}
	_, serr := p.Storage.Stat(p.Name)
	existed := serr == nil
	// The external data file first, so a failure leaves no image behind
	// that names a missing file.
	if c.dataFile != "" {
		if err := createDataFile(p, c.dataFile, g.size); err != nil {
			return nil, err
		}
	}
	f, err := p.Storage.Open(p.Name, flag)
	if err != nil {
		return nil, err
	}
	if err := writeInitialTables(f, c, h, hb, g, existed); err != nil {
		f.Close()
		p.Storage.Remove(p.Name)
		return nil, err
	}
	// Keep the file open (and locked) from creation on.
	// The data file name is the caller's (create option), not an
	// untrusted image's: it is followed as given.
	img, err := openFile(ctx, f, &driver.OpenParams{Storage: p.Storage, Name: p.Name, Logger: p.Logger, Options: driver.Values{}, Paths: driver.PathTrusted})
	if err != nil {
		return nil, err
	}
	im := img.(*image)
	if c.encrypt {
		if err := im.setupEncryption(p); err != nil {
			im.Close()
			p.Storage.Remove(p.Name)
			return nil, err
		}
	}
	if c.prealloc != "off" {
		if err := im.preallocate(ctx, 0, g.size, c.prealloc); err != nil {
			im.Close()
			return nil, err
		}
	}
	return im, nil
}

// createGeom is the size of a new image and where its initial tables go
// (see createLayout).
type createGeom struct {
	size                    int64 // the virtual size, in whole sectors
	l1Entries               int64
	rtClust, rbCount, total int64
}

// createHeader lays out a new image of reqSize bytes and builds its header.
func createHeader(c *createOpts, reqSize int64) (*header, createGeom, error) {
	g := createGeom{size: (reqSize + 511) &^ 511}
	esz := int64(8)
	if c.extL2 {
		esz = 16
	}
	perL1 := c.cs * (c.cs / esz)
	g.l1Entries = (g.size + perL1 - 1) / perL1
	if g.l1Entries*8 > maxL1Bytes {
		return nil, g, driver.OptionErrorf("size %d is too large for %d-byte clusters (the L1 table would exceed %d bytes)", reqSize, c.cs, maxL1Bytes)
	}
	g.rtClust, g.rbCount, _, g.total = createLayout(c.cs, c.rorder, g.l1Entries)
	if g.rtClust*c.cs > maxRefTableBytes {
		return nil, g, driver.OptionErrorf("size %d is too large for %d-byte clusters", reqSize, c.cs)
	}
	h := &header{
		version:        c.version,
		clusterBits:    uint32(log2(c.cs)),
		size:           uint64(g.size),
		l1Size:         uint32(g.l1Entries),
		refTableOffset: uint64(c.cs),
		refTableClust:  uint32(g.rtClust),
		refcountOrder:  c.rorder,
		headerLen:      v2HeaderLen,
		backingFile:    c.backing,
		backingFmt:     c.backFmt,
		hasBackingFmt:  c.hasBackFm,
	}
	if g.l1Entries > 0 {
		h.l1Offset = uint64((1 + g.rtClust + g.rbCount) * c.cs)
	}
	if c.version == 3 {
		h.headerLen = ourV3HeaderLen
		if c.lazy {
			h.compat |= compatLazyRefcounts
		}
		if c.extL2 {
			h.incompat |= incompatExtL2
		}
		if c.ctype != compressionZlib {
			h.incompat |= incompatCompression
			h.compressionType = c.ctype
		}
		if c.dataFile != "" {
			h.incompat |= incompatDataFile
			h.dataFile, h.hasDataFile = c.dataFile, true
			if c.dataRaw {
				h.autoclear |= autoclearDataFileRaw
			}
		}
	}
	return h, g, nil
}

// createDataFile creates the external data file name (relative to the
// image's directory) with the disk's size.
func createDataFile(p *driver.CreateParams, name string, size int64) error {
	path := name
	if !filepath.IsAbs(path) {
		path = filepath.Join(filepath.Dir(p.Name), path)
	}
	df, err := p.Storage.Open(path, driver.ReadWrite|driver.Create|driver.Truncate)
	if err != nil {
		return driver.Errorf(err, p.Name, -1, "cannot create the external data file %s", path)
	}
	err = df.Truncate(size)
	if err == nil {
		err = df.Sync()
	}
	df.Close()
	return err
}

// writeInitialTables writes the header hb, the refcount table and blocks
// (counting every initial cluster once) and the L1 table's entries to the
// new file f, and syncs it. A file that existed is cut to the tables' end
// first, so that no old bytes survive in their clusters.
func writeInitialTables(f driver.File, c *createOpts, h *header, hb []byte, g createGeom, existed bool) error {
	buf := make([]byte, g.total*c.cs)
	copy(buf, hb)
	// Refcount table and blocks.
	rtOff := c.cs
	rbOff := (1 + g.rtClust) * c.cs
	perRB := c.cs * 8 / (int64(1) << c.rorder)
	tmp := &image{rorder: uint(c.rorder)}
	for i := int64(0); i < g.rbCount; i++ {
		put64(buf[rtOff+i*8:], uint64(rbOff+i*c.cs))
	}
	for cl := int64(0); cl < g.total; cl++ {
		blk := buf[rbOff+(cl/perRB)*c.cs:]
		tmp.setRefRaw(blk, cl%perRB, 1)
	}
	// The L1 table is all zeros; write only its entries, as qemu does.
	end := g.total * c.cs
	if existed {
		// Overwriting: old bytes must not survive in the tables'
		// clusters.
		if err := f.Truncate(end); err != nil {
			return err
		}
	} else if g.l1Entries > 0 {
		end = int64(h.l1Offset) + g.l1Entries*8
	} else {
		end = (1 + g.rtClust + g.rbCount) * c.cs
	}
	if _, err := f.WriteAt(buf[:end], 0); err != nil {
		return err
	}
	return f.Sync()
}

// preallocate allocates host clusters for [from, to) (whole clusters) with
// metadata, and for falloc/full also reserves or writes the data area.
func (im *image) preallocate(ctx context.Context, from, to int64, mode string) error {
	im.mu.Lock()
	defer im.mu.Unlock()
	from = from &^ (im.cs - 1)
	var dataRuns []span
	l2span := im.l2Span()
	for v := from; v < to; {
		if err := ctx.Err(); err != nil {
			return err
		}
		l1i := v / l2span
		tend := min(to, (l1i+1)*l2span)
		t, err := im.l2ForWrite(l1i)
		if err != nil {
			return err
		}
		for v < tend {
			ci := (v >> im.cbits) & (im.l2n - 1)
			e, bm := im.entry(t.buf, ci)
			if e&offMask != 0 || e&oflagCompressed != 0 || (im.extData && e&oflagCopied != 0) {
				v += im.cs
				continue
			}
			var host int64
			if im.extData {
				host = v
			} else {
				n := int64(0)
				for w := v; w < tend; w += im.cs {
					x, _ := im.entry(t.buf, (w>>im.cbits)&(im.l2n-1))
					if x != 0 {
						break
					}
					n++
				}
				s, k, err := im.allocRun(max(n, 1))
				if err != nil {
					return err
				}
				for j := int64(0); j < k; j++ {
					cj := ((v + j*im.cs) >> im.cbits) & (im.l2n - 1)
					_, bmj := im.entry(t.buf, cj)
					im.setEntry(t.buf, cj, uint64((s+j)<<im.cbits)|oflagCopied, bmj)
				}
				t.dirty = true
				if n := len(dataRuns); n > 0 && dataRuns[n-1].hi == s {
					dataRuns[n-1].hi = s + k
				} else {
					dataRuns = append(dataRuns, span{s, s + k})
				}
				v += k * im.cs
				continue
			}
			im.setEntry(t.buf, ci, uint64(host)|oflagCopied, bm)
			t.dirty = true
			v += im.cs
		}
		im.shrinkCaches()
	}
	// The file covers every preallocated cluster, reading zeros.
	if sz, err := im.f.Size(); err == nil && sz < im.fileEnd {
		if err := im.f.Truncate(im.fileEnd); err != nil {
			return err
		}
	}
	if mode == prealloc.Falloc || mode == prealloc.Full {
		f := im.f
		runs := dataRuns
		if im.extData {
			f = im.df
			runs = []span{{from >> im.cbits, (to + im.cs - 1) >> im.cbits}}
		}
		for _, r := range runs {
			if err := prealloc.File(ctx, f, im.name, mode, r.lo<<im.cbits, (r.hi-r.lo)<<im.cbits); err != nil {
				return err
			}
		}
		im.dataDirty.Store(true)
	}
	return im.flushLocked(false)
}
