package qcow2

import (
	"context"

	"github.com/vdisk/vdisk/driver"
)

// Amend changes creation options in place (qemu-img amend): compat
// (upgrade to 1.1, or downgrade to 0.10 when no version 3 feature is in
// use; zero clusters are expanded), lazy_refcounts, refcount_bits (the
// refcount structure is rebuilt with the new width), size, backing_file,
// backing_fmt and data_file_raw. Options qemu cannot amend either
// (cluster_size, extended_l2, compression_type, preallocation) are refused
// when they differ from the image's.
func (im *image) Amend(ctx context.Context, opts []driver.KV) error {
	vals, err := parseAmendOpts(opts)
	if err != nil {
		return err
	}
	if err := im.amendRefused(vals); err != nil {
		return err
	}
	if vals.Has("size") {
		if err := im.Resize(ctx, vals.Int("size"), ""); err != nil {
			return err
		}
	}
	if err := im.amendParent(vals); err != nil {
		return err
	}
	if err := im.beginOp(); err != nil {
		return err
	}
	defer im.unlockOps()
	if err := im.flushLocked(false); err != nil {
		return err
	}
	version := im.hdr.version
	if vals.Has("compat") {
		version = 3
		if c := vals.String("compat"); c == "0.10" || c == "v2" {
			version = 2
		}
	}
	if err := im.amendLazyRefcounts(vals, version); err != nil {
		return err
	}
	if vals.Has("refcount_bits") {
		order := uint(log2(vals.Int("refcount_bits")))
		if order != 4 && version < 3 {
			return driver.OptionErrorf("refcount widths other than 16 bits require compat=1.1")
		}
		if order != im.rorder {
			if err := im.changeRefcountOrder(ctx, order); err != nil {
				return err
			}
		}
	}
	if err := im.amendDataFileRaw(vals); err != nil {
		return err
	}
	if h := im.hdr; version != h.version {
		if version == 3 {
			h.version = 3
			h.headerLen = ourV3HeaderLen
			return im.writeHeaderSync(true, true)
		}
		return im.downgrade(ctx)
	}
	return nil
}

// parseAmendOpts parses amend's options: the create options, size and the
// backing file, without defaults (only what was given counts).
func parseAmendOpts(opts []driver.KV) (driver.Values, error) {
	spec := Format.CreateOptions
	spec = append(spec[:len(spec):len(spec)],
		driver.Option{Name: "size", Type: driver.TypeSize},
		driver.Option{Name: "backing_file", Type: driver.TypeString},
		driver.Option{Name: "backing_fmt", Type: driver.TypeString},
	)
	var given []driver.Option
	for _, o := range spec {
		o.Default = ""
		given = append(given, o)
	}
	return driver.ParseOptions("qcow2", given, opts)
}

// amendRefused refuses the options that cannot change when they differ
// from the image's.
func (im *image) amendRefused(vals driver.Values) error {
	has := vals.Has
	if has("cluster_size") && vals.Int("cluster_size") != im.cs {
		return driver.Unsupportedf(im.name, "changing the cluster size is not supported")
	}
	if has("extended_l2") && vals.Bool("extended_l2") != im.ext {
		return driver.Unsupportedf(im.name, "changing extended_l2 is not supported")
	}
	if has("compression_type") {
		want := uint8(compressionZlib)
		if vals.String("compression_type") == "zstd" {
			want = compressionZstd
		}
		if want != im.hdr.compressionType {
			return driver.Unsupportedf(im.name, "changing the compression type is not supported")
		}
	}
	if has("preallocation") {
		return driver.Unsupportedf(im.name, "preallocation cannot be amended")
	}
	if has("data_file") && vals.String("data_file") != im.dfName {
		return driver.Unsupportedf(im.name, "changing the external data file is not supported")
	}
	return nil
}

// amendParent records a given backing_file or backing_fmt.
func (im *image) amendParent(vals driver.Values) error {
	if !vals.Has("backing_file") && !vals.Has("backing_fmt") {
		return nil
	}
	ref := im.Parent()
	if ref == nil {
		ref = &driver.ParentRef{}
	}
	if vals.Has("backing_file") {
		ref.Name = vals.String("backing_file")
	}
	if vals.Has("backing_fmt") {
		ref.Format = vals.String("backing_fmt")
	}
	return im.SetParent(ref)
}

// amendLazyRefcounts switches lazy refcounts as given; version is the
// version the image is amended to. Callers hold mu with everything
// flushed.
func (im *image) amendLazyRefcounts(vals driver.Values, version uint32) error {
	if !vals.Has("lazy_refcounts") {
		return nil
	}
	h := im.hdr
	lazy := vals.Bool("lazy_refcounts")
	if lazy && version < 3 {
		return driver.OptionErrorf("lazy refcounts require compat=1.1")
	}
	if lazy == im.lazy {
		return nil
	}
	if !lazy {
		// Refcounts on disk and the dirty bit cleared first.
		if err := im.flushLocked(true); err != nil {
			return err
		}
		h.compat &^= compatLazyRefcounts
	} else {
		h.compat |= compatLazyRefcounts
	}
	im.lazy = lazy
	return im.writeHeaderSync(true, true)
}

// amendDataFileRaw switches data_file_raw as given. Callers hold mu with
// everything flushed.
func (im *image) amendDataFileRaw(vals driver.Values) error {
	if !vals.Has("data_file_raw") {
		return nil
	}
	h := im.hdr
	raw := vals.Bool("data_file_raw")
	if raw && !im.extData {
		return driver.OptionErrorf("data_file_raw requires an external data file")
	}
	if raw && h.backingFile != "" {
		return driver.OptionErrorf("a raw external data file cannot be used with a backing file")
	}
	if raw == im.rawData {
		return nil
	}
	if raw {
		h.autoclear |= autoclearDataFileRaw
	} else {
		h.autoclear &^= autoclearDataFileRaw
	}
	im.rawData = raw
	return im.writeHeaderSync(true, true)
}

// changeRefcountOrder rebuilds the refcount structure with a new width.
// Callers hold mu with everything flushed.
func (im *image) changeRefcountOrder(ctx context.Context, order uint) error {
	res, err := im.checkOnce(ctx, driver.RepairNone)
	if err != nil {
		return err
	}
	if res.Corruptions != 0 || res.CheckErrors != 0 {
		return driver.Corruptf(im.name, -1, "the image has %d corruptions; repair it (check -r all) before changing refcount_bits", res.Corruptions)
	}
	// The references as they are now, counted like check does.
	t, err := im.countReferences(ctx)
	if err != nil {
		return err
	}
	oldOrder, oldRbn, oldRbBits, oldMax := im.rorder, im.rbn, im.rbBits, im.refMax
	im.setRefcountOrder(order)
	im.hdr.refcountOrder = uint32(order)
	if err := im.rebuildRefcounts(t); err != nil {
		im.rorder, im.rbn, im.rbBits, im.refMax = oldOrder, oldRbn, oldRbBits, oldMax
		im.hdr.refcountOrder = uint32(oldOrder)
		return err
	}
	return nil
}

// countReferences counts every reference of the image (the counting pass
// of check). A damaged image is refused: amend rewrites the refcounts from
// these counts, which must be right.
func (im *image) countReferences(ctx context.Context) (*tally, error) {
	c := &checker{im: im, mode: driver.RepairNone, res: &driver.CheckResult{}, t: newTally()}
	c.nfile = (im.fileEnd + im.cs - 1) / im.cs
	if err := c.countAll(ctx); err != nil {
		return nil, err
	}
	if n := c.res.Corruptions + c.res.CheckErrors; n > 0 {
		msg := ""
		if len(c.res.Messages) > 0 {
			msg = ": " + c.res.Messages[0]
		}
		return nil, driver.Corruptf(im.name, -1, "the image has %d errors (run check -r all first)%s", n, msg)
	}
	return c.t, nil
}

// downgrade turns a version 3 image into a version 2 one. Callers hold mu
// with everything flushed.
func (im *image) downgrade(ctx context.Context) error {
	h := im.hdr
	switch {
	case im.ext:
		return driver.Unsupportedf(im.name, "cannot downgrade an image with extended L2 entries to compat=0.10")
	case im.extData:
		return driver.Unsupportedf(im.name, "cannot downgrade an image with an external data file to compat=0.10")
	case h.compressionType != compressionZlib:
		return driver.Unsupportedf(im.name, "cannot downgrade an image using zstd compression to compat=0.10")
	case im.rorder != 4:
		return driver.Unsupportedf(im.name, "cannot downgrade an image with refcount_bits other than 16 to compat=0.10")
	case im.lazy:
		return driver.Unsupportedf(im.name, "cannot downgrade an image with lazy refcounts to compat=0.10 (set lazy_refcounts=off)")
	case h.bitmaps != nil:
		return driver.Unsupportedf(im.name, "cannot downgrade an image with persistent bitmaps to compat=0.10")
	}
	// Zero clusters do not exist in version 2: expand them in every table.
	tables := [][]uint64{im.l1}
	for i := range im.snaps {
		if im.snaps[i].l1Size == 0 {
			continue
		}
		l1, err := im.readL1(im.snaps[i].l1Offset, im.snaps[i].l1Size)
		if err != nil {
			return err
		}
		tables = append(tables, l1)
	}
	for ti, l1 := range tables {
		for _, e := range l1 {
			o := int64(e & offMask)
			if o == 0 {
				continue
			}
			t, err := im.loadL2(o)
			if err != nil {
				return err
			}
			for j := int64(0); j < im.l2n; j++ {
				e2, _ := im.entry(t.buf, j)
				if e2&oflagCompressed != 0 || e2&oflagZero == 0 {
					continue
				}
				if err := ctx.Err(); err != nil {
					return err
				}
				if ti > 0 || im.backed() {
					if ti > 0 {
						return driver.Unsupportedf(im.name, "cannot downgrade: snapshot %q has zero clusters", im.snaps[ti-1].name)
					}
					return driver.Unsupportedf(im.name, "cannot downgrade an image with zero clusters over a backing file to compat=0.10")
				}
				// Without a backing file an unallocated cluster reads zeros.
				if im.l2ForWriteShared(t) {
					return driver.Unsupportedf(im.name, "cannot downgrade: zero clusters in a table shared with a snapshot")
				}
				if err := im.releaseEntry(e2 &^ oflagZero); err != nil {
					return err
				}
				im.setEntry(t.buf, j, 0, 0)
				t.dirty = true
			}
			im.shrinkCaches()
		}
	}
	if err := im.flushLocked(false); err != nil {
		return err
	}
	// Snapshots need no extra data in version 2 but keep it harmlessly.
	h.version = 2
	h.headerLen = v2HeaderLen
	h.incompat, h.compat, h.autoclear = 0, 0, 0
	h.extraFields = nil
	h.compressionType = 0
	return im.writeHeaderSync(true, true)
}

// l2ForWriteShared reports whether a cached L2 table is shared with a
// snapshot (its refcount is not 1).
func (im *image) l2ForWriteShared(t *table) bool {
	r, err := im.refcount(t.off >> im.cbits)
	return err != nil || r != 1
}

var _ driver.Amender = (*image)(nil)
