package qcow2

import "github.com/vdisk/vdisk/driver"

func init() { Format.Measure = measure }

// measure answers qemu-img measure for qcow2: the metadata a fully
// allocated image of the virtual size needs (header, L1, L2 and refcount
// structures, as qemu computes them), plus the data clusters the source
// holds (required) or all of them (fully allocated).
func measure(p *driver.MeasureParams) (driver.MeasureResult, error) {
	cs := p.Options.Int("cluster_size")
	if cs <= 0 {
		cs = 64 << 10
	}
	rbits := p.Options.Int("refcount_bits")
	if rbits <= 0 {
		rbits = 16
	}
	l2e := int64(8)
	if p.Options.Bool("extended_l2") {
		l2e = 16
	}
	aligned := (p.Size + cs - 1) / cs * cs
	meta := metadataSize(aligned, cs, rbits, l2e)
	if p.Options.String("encrypt.format") == "luks" {
		// The LUKS header's clusters, as qemu counts them.
		_, kb, err := encryptSpec(p.Options)
		if err != nil {
			return driver.MeasureResult{}, err
		}
		meta += (luksHeaderLen(kb) + cs - 1) / cs * cs
	}
	// By size alone nothing is allocated yet, as qemu-img measure --size says.
	data := int64(0)
	if p.Allocated != nil {
		n, err := p.Allocated(cs)
		if err != nil {
			return driver.MeasureResult{}, err
		}
		data = n
	}
	res := driver.MeasureResult{Required: data + meta, FullyAllocated: aligned + meta}
	if c := p.Options.String("compat"); p.SourceHasBitmaps && c != "0.10" && c != "v2" {
		n := bitmapsSize(p.SourceBitmaps, cs)
		res.Bitmaps = &n
	}
	return res, nil
}

// bitmapsSize is the space bitmaps take in an image of cluster size cs,
// counted as qemu counts it for measure: every bitmap fully allocated, its
// table, and the directory.
func bitmapsSize(bms []driver.Bitmap, cs int64) int64 {
	roundUp := func(n, m int64) int64 { return (n + m - 1) / m * m }
	var total, dir int64
	for _, b := range bms {
		if b.Granularity <= 0 {
			continue
		}
		bits := (b.Size + b.Granularity - 1) / b.Granularity
		clusters := ((bits+7)/8 + cs - 1) / cs
		total += clusters*cs + roundUp(clusters*8, cs)
		dir += bitmapDirEntrySize(len(b.Name), 0)
	}
	return total + roundUp(dir, cs)
}

// metadataSize is the size of the header cluster, the L2 and L1 tables and
// the refcount table and blocks for a fully allocated image of aligned
// bytes (qemu's qcow2_calc_prealloc_size less the data).
func metadataSize(aligned, cs, rbits, l2e int64) int64 {
	roundUp := func(n, m int64) int64 { return (n + m - 1) / m * m }
	meta := cs // header
	nl2e := roundUp(aligned/cs, cs/l2e)
	meta += nl2e * l2e
	nl1e := roundUp(nl2e*l2e/cs, cs/8)
	meta += nl1e * 8
	clusters := (meta + aligned) / cs
	perBlock := cs * 8 / rbits
	var blocks, table, n int64
	last := int64(-1)
	for n != last {
		last = n
		blocks = (clusters + table + blocks + perBlock - 1) / perBlock
		table = (blocks + cs/8 - 1) / (cs / 8)
		n = clusters + blocks + table
	}
	return meta + (blocks+table)*cs
}
