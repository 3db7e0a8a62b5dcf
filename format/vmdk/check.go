package vmdk

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/vdisk/vdisk/driver"
)

// Check validates every sparse extent: directory entries and grain table
// entries inside the file, the redundant directory and tables equal to
// the primary ones, and no two grains (or a grain and the metadata)
// overlapping. It repairs nothing.
func (im *image) Check(ctx context.Context, mode driver.RepairMode) (*driver.CheckResult, error) {
	if im.stream != nil {
		return nil, driver.Errorf(driver.ErrUnsupported, im.name, -1, "a streamOptimized image being written cannot be checked before it is closed")
	}
	// Check reads the tables from the file: write back what is in memory.
	if err := im.writeBack(); err != nil {
		return nil, err
	}
	c := &checker{res: &driver.CheckResult{}}
	for _, e := range im.exts {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if e.sp == nil {
			if err := c.checkFlat(e); err != nil {
				return nil, err
			}
			continue
		}
		fsz, err := c.checkSparse(e)
		if err != nil {
			return nil, err
		}
		if e.f == im.main {
			c.res.ImageEndOffset = fsz
		}
	}
	res := c.res
	if mode != driver.RepairNone && res.Corruptions > 0 {
		return res, driver.Unsupportedf(im.name, "VMDK repair (%s)", strings.Join(res.Messages[:min(1, len(res.Messages))], ""))
	}
	return res, nil
}

// checker collects what Check finds.
type checker struct {
	res *driver.CheckResult
}

// maxReported is the number of corruptions after which Check reads no
// more grain tables.
const maxReported = 1000

// bad reports a corruption in file at off.
func (c *checker) bad(file string, off int64, format string, a ...any) {
	c.res.Corruptions++
	if len(c.res.Messages) < 100 {
		c.res.Messages = append(c.res.Messages, fmt.Sprintf("%s: at offset %d: %s", file, off, fmt.Sprintf(format, a...)))
	}
}

// lag reports a redundant grain directory entry or table that lags behind
// the primary one: not a corruption. The driver writes the primary copy
// first and the redundant one right after, so a writer killed between the
// two writes leaves exactly this; reads use the primary only, and qemu-img
// check does not compare the copies either.
func (c *checker) lag(file string, off int64, format string, a ...any) {
	if len(c.res.Messages) < 100 {
		c.res.Messages = append(c.res.Messages, fmt.Sprintf("%s: at offset %d: warning: %s", file, off, fmt.Sprintf(format, a...)))
	}
}

// fileSpan is the byte range [off, end) of an extent file.
type fileSpan struct{ off, end int64 }

// checkFlat checks that the flat extent e lies inside its file.
func (c *checker) checkFlat(e *extent) error {
	if e.f == nil {
		return nil
	}
	fsz, err := e.f.Size()
	if err != nil {
		return driver.WithFile(err, "check", e.path)
	}
	if e.flatOff+e.size > fsz {
		c.bad(e.path, e.flatOff, "flat extent of %d bytes runs past the end of the %d-byte file", e.size, fsz)
	}
	return nil
}

// checkSparse checks the sparse extent e: its grain directories, grain
// tables and grains. It returns the size of the extent's file.
func (c *checker) checkSparse(e *extent) (int64, error) {
	sp := e.sp
	fsz, err := e.f.Size()
	if err != nil {
		return 0, driver.WithFile(err, "check", e.path)
	}
	grains := (sp.capacity + sp.grain - 1) / sp.grain
	c.res.TotalClusters += grains
	var used []fileSpan
	meta := []fileSpan{{0, sectorSize}}
	if sp.h.overhead > 0 && !sp.compressed {
		meta[0].end = int64(sp.h.overhead) * sectorSize
	}
	sp.mu.Lock()
	gd := slices.Clone(sp.gd)
	sp.mu.Unlock()
	for gi, gde := range gd {
		if gde == 0 || c.res.Corruptions > maxReported {
			continue
		}
		gtOff := int64(gde) * sectorSize
		if gtOff+sp.gtBytes() > fsz {
			c.bad(e.path, sp.gdOff+int64(gi)*4, "grain table %d at %d is past the end of the file", gi, gtOff)
			continue
		}
		var t []uint32
		t, meta, err = c.grainTable(e, gi, gtOff, fsz, meta)
		if err != nil {
			return 0, err
		}
		used = c.grains(e, gi, gtOff, t, grains, fsz, used)
	}
	for gi := range gd {
		if sp.rgd != nil && gd[gi] == 0 && sp.rgd[gi] != 0 {
			c.bad(e.path, sp.gdOff+int64(gi)*4, "grain directory entry %d is empty, the redundant one is not", gi)
		}
	}
	c.overlaps(e.path, used, meta)
	return fsz, nil
}

// grainTable reads grain table gi (at gtOff) and its redundant copy, and
// checks the copy against it. It returns the table with the file spans of
// both added to meta.
func (c *checker) grainTable(e *extent, gi int, gtOff, fsz int64, meta []fileSpan) ([]uint32, []fileSpan, error) {
	sp := e.sp
	gtB := (sp.gtBytes() + sectorSize - 1) &^ (sectorSize - 1)
	meta = append(meta, fileSpan{gtOff, gtOff + gtB})
	t, err := readGT(sp, gtOff)
	var rt []uint32
	sp.mu.Lock()
	if err == nil && sp.rgd != nil {
		if r := sp.rgd[gi]; r == 0 {
			c.lag(e.path, sp.rgdOff+int64(gi)*4, "redundant grain directory entry %d is empty, the primary is not", gi)
		} else if int64(r)*sectorSize+sp.gtBytes() > fsz {
			c.bad(e.path, sp.rgdOff+int64(gi)*4, "redundant grain table %d is past the end of the file", gi)
		} else {
			rt, err = readGT(sp, int64(r)*sectorSize)
			meta = append(meta, fileSpan{int64(r) * sectorSize, int64(r)*sectorSize + gtB})
		}
	}
	sp.mu.Unlock()
	if err != nil {
		return nil, meta, err
	}
	if rt != nil && !slices.Equal(t, rt) {
		c.lag(e.path, int64(sp.rgd[gi])*sectorSize, "redundant grain table %d differs from the primary", gi)
	}
	return t, meta, nil
}

// grains checks the entries of grain table gi (t, at gtOff) of an extent
// of grains grains in a file of fsz bytes, counts the allocated grains and
// returns used with the file spans of the uncompressed ones added.
func (c *checker) grains(e *extent, gi int, gtOff int64, t []uint32, grains, fsz int64, used []fileSpan) []fileSpan {
	sp := e.sp
	for j, v := range t {
		g := int64(gi)*sp.gtes + int64(j)
		if g >= grains {
			if v != 0 {
				c.bad(e.path, gtOff+int64(j)*4, "grain table entry past the end of the extent is set")
			}
			continue
		}
		if sp.grainState(v) != driver.Data {
			continue
		}
		c.res.AllocatedClusters++
		off := int64(v) * sectorSize
		if off >= fsz {
			c.bad(e.path, gtOff+int64(j)*4, "grain %d at %d points past the end of the file", g, off)
			continue
		}
		if sp.compressed {
			c.res.CompressedClusters++
			continue
		}
		if int64(len(used)) > fsz/sectorSize {
			c.bad(e.path, gtOff+int64(j)*4, "more grains than the file can hold: grains overlap")
			break
		}
		used = append(used, fileSpan{off, off + sp.grain})
	}
	return used
}

// overlaps reports grains of file that overlap each other or metadata.
func (c *checker) overlaps(file string, used, meta []fileSpan) {
	slices.SortFunc(used, func(a, b fileSpan) int { return int(a.off - b.off) })
	for i := 1; i < len(used); i++ {
		if used[i].off < used[i-1].end {
			c.bad(file, used[i].off, "grains overlap")
		}
	}
	for _, u := range used {
		for _, m := range meta {
			if u.off < m.end && m.off < u.end {
				c.bad(file, u.off, "a grain overlaps metadata at %d", m.off)
				break
			}
		}
	}
}

func readGT(sp *sparse, off int64) ([]uint32, error) {
	raw := make([]byte, sp.gtBytes())
	if err := readMeta(sp.f, raw, off, "grain table", sp.name); err != nil {
		return nil, err
	}
	t := make([]uint32, sp.gtes)
	for j := range t {
		t[j] = uint32(raw[j*4]) | uint32(raw[j*4+1])<<8 | uint32(raw[j*4+2])<<16 | uint32(raw[j*4+3])<<24
	}
	return t, nil
}
