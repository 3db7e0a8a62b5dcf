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
	res := &driver.CheckResult{}
	const maxReported = 1000
	bad := func(file string, off int64, format string, a ...any) {
		res.Corruptions++
		if len(res.Messages) < 100 {
			res.Messages = append(res.Messages, fmt.Sprintf("%s: at offset %d: %s", file, off, fmt.Sprintf(format, a...)))
		}
	}
	for _, e := range im.exts {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		sp := e.sp
		if sp == nil {
			if e.f != nil {
				fsz, err := e.f.Size()
				if err != nil {
					return nil, driver.WithFile(err, "check", e.path)
				}
				if e.flatOff+e.size > fsz {
					bad(e.path, e.flatOff, "flat extent of %d bytes runs past the end of the %d-byte file", e.size, fsz)
				}
			}
			continue
		}
		fsz, err := e.f.Size()
		if err != nil {
			return nil, driver.WithFile(err, "check", e.path)
		}
		grains := (sp.capacity + sp.grain - 1) / sp.grain
		res.TotalClusters += grains
		type span struct{ off, end int64 }
		var used []span
		meta := []span{{0, sectorSize}}
		if sp.h.overhead > 0 && !sp.compressed {
			meta[0].end = int64(sp.h.overhead) * sectorSize
		}
		gtB := (sp.gtBytes() + sectorSize - 1) &^ (sectorSize - 1)
		sp.mu.Lock()
		gd := slices.Clone(sp.gd)
		sp.mu.Unlock()
		for gi, gde := range gd {
			if gde == 0 || res.Corruptions > maxReported {
				continue
			}
			gtOff := int64(gde) * sectorSize
			if gtOff+sp.gtBytes() > fsz {
				bad(e.path, sp.gdOff+int64(gi)*4, "grain table %d at %d is past the end of the file", gi, gtOff)
				continue
			}
			meta = append(meta, span{gtOff, gtOff + gtB})
			t, err := readGT(sp, gtOff)
			var rt []uint32
			sp.mu.Lock()
			if err == nil && sp.rgd != nil {
				if r := sp.rgd[gi]; r == 0 {
					bad(e.path, sp.rgdOff+int64(gi)*4, "redundant grain directory entry %d is empty, the primary is not", gi)
				} else if int64(r)*sectorSize+sp.gtBytes() > fsz {
					bad(e.path, sp.rgdOff+int64(gi)*4, "redundant grain table %d is past the end of the file", gi)
				} else {
					rt, err = readGT(sp, int64(r)*sectorSize)
					meta = append(meta, span{int64(r) * sectorSize, int64(r)*sectorSize + gtB})
				}
			}
			sp.mu.Unlock()
			if err != nil {
				return nil, err
			}
			if rt != nil && !slices.Equal(t, rt) {
				bad(e.path, int64(sp.rgd[gi])*sectorSize, "redundant grain table %d differs from the primary", gi)
			}
			for j, v := range t {
				g := int64(gi)*sp.gtes + int64(j)
				if g >= grains {
					if v != 0 {
						bad(e.path, gtOff+int64(j)*4, "grain table entry past the end of the extent is set")
					}
					continue
				}
				if sp.grainState(v) != driver.Data {
					continue
				}
				res.AllocatedClusters++
				off := int64(v) * sectorSize
				if off >= fsz {
					bad(e.path, gtOff+int64(j)*4, "grain %d at %d points past the end of the file", g, off)
					continue
				}
				if sp.compressed {
					res.CompressedClusters++
					continue
				}
				if int64(len(used)) > fsz/sectorSize {
					bad(e.path, gtOff+int64(j)*4, "more grains than the file can hold: grains overlap")
					break
				}
				used = append(used, span{off, off + sp.grain})
			}
		}
		for gi := range gd {
			if sp.rgd != nil && gd[gi] == 0 && sp.rgd[gi] != 0 {
				bad(e.path, sp.gdOff+int64(gi)*4, "grain directory entry %d is empty, the redundant one is not", gi)
			}
		}
		slices.SortFunc(used, func(a, b span) int { return int(a.off - b.off) })
		for i := 1; i < len(used); i++ {
			if used[i].off < used[i-1].end {
				bad(e.path, used[i].off, "grains overlap")
			}
		}
		for _, u := range used {
			for _, m := range meta {
				if u.off < m.end && m.off < u.end {
					bad(e.path, u.off, "a grain overlaps metadata at %d", m.off)
					break
				}
			}
		}
		if e.f == im.main {
			res.ImageEndOffset = fsz
		}
	}
	if mode != driver.RepairNone && res.Corruptions > 0 {
		return res, driver.Unsupportedf(im.name, "VMDK repair (%s)", strings.Join(res.Messages[:min(1, len(res.Messages))], ""))
	}
	return res, nil
}

func readGT(sp *sparse, off int64) ([]uint32, error) {
	raw := make([]byte, sp.gtBytes())
	if err := driver.ReadFullAt(sp.f, raw, off); err != nil {
		return nil, driver.WithFile(err, "read grain table", sp.name)
	}
	t := make([]uint32, sp.gtes)
	for j := range t {
		t[j] = uint32(raw[j*4]) | uint32(raw[j*4+1])<<8 | uint32(raw[j*4+2])<<16 | uint32(raw[j*4+3])<<24
	}
	return t, nil
}
