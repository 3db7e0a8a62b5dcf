package qcow

import (
	"sync"

	"github.com/vdisk/vdisk/driver"
)

// runBytes bounds the clusters one allocation takes (and the buffer it
// composes them in).
const runBytes = 1 << 20

// maxFileOff bounds the file offsets data entries may hold; larger ones
// are corrupt (and would overflow int64 arithmetic).
const maxFileOff = 1 << 62

var runPool = sync.Pool{New: func() any { b := make([]byte, runBytes); return &b }}

// WriteAt writes p at off. Allocated clusters are written in place
// (clusters contiguous in the file with one write). Unallocated and
// compressed clusters get new clusters at the end of the file: a run of
// them is composed in memory (the rest of a partly written cluster is
// zeros, or the inflated old content of a compressed cluster), written,
// and then pointed at by its L2 entries.
//
// In an image with a backing file, a write covering only part of an
// unallocated cluster writes nothing and returns a *driver.FillError
// asking for the whole partially covered clusters at its ends (and
// everything between): the rest of such a cluster must keep showing the
// backing chain, which the container reads and writes back with the
// data. Without a backing file unallocated clusters read zeros, and
// clusters that would hold only zeros stay unallocated.
func (im *image) WriteAt(p []byte, off int64) (int, error) {
	if err := im.writable(off); err != nil {
		return 0, err
	}
	if err := im.drainCompressed(); err != nil {
		return 0, err
	}
	im.mu.RLock()
	defer im.mu.RUnlock()
	if err := driver.CheckRange(im.name, off, int64(len(p)), im.Size()); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	if err := im.needFill(off, off+int64(len(p))); err != nil {
		return 0, err
	}
	if err := im.write(p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

// needFill returns the *driver.FillError for a write of [off, end) into
// an image with a backing file whose first or last cluster is unallocated
// and only partly covered, or nil when the write can go ahead.
func (im *image) needFill(off, end int64) error {
	if !im.hasBacking() {
		return nil
	}
	cs := im.lo.cs
	start, stop := off, end
	hc, tc := off/cs, (end-1)/cs
	if p, err := im.partialUnalloc(hc, off, end); err != nil {
		return err
	} else if p {
		start = hc * cs
	}
	if p, err := im.partialUnalloc(tc, off, end); err != nil {
		return err
	} else if p {
		stop = tc*cs + im.lo.clusterLen(tc)
	}
	if start == off && stop == end {
		return nil
	}
	return driver.NeedFill(im.name, start, stop)
}

// partialUnalloc reports whether cluster c is unallocated and [off, end)
// covers only part of it.
func (im *image) partialUnalloc(c, off, end int64) (bool, error) {
	lo := c * im.lo.cs
	if off <= lo && end >= lo+im.lo.clusterLen(c) {
		return false, nil
	}
	var e [1]uint64
	if _, err := im.entries(c, e[:]); err != nil {
		return false, err
	}
	return e[0] == 0, nil
}

// write does WriteAt's work once the fill check passed.
func (im *image) write(p []byte, off int64) error {
	cs := im.lo.cs
	maxRun := max(1, runBytes/cs)
	var buf [batch]uint64
	total := int64(len(p))
	done := int64(0)
	for done < total {
		c := (off + done) / cs
		want := min(int64(batch), (off+total-1)/cs-c+1)
		got, err := im.entries(c, buf[:want])
		if err != nil {
			return err
		}
		ents := buf[:got]
		for i := 0; i < len(ents); {
			pos := off + done
			in := pos % cs
			n := min(total-done, cs-in)
			e := ents[i]
			switch kindOf(e) {
			case kNormal:
				if err := im.checkData(e, c+int64(i)); err != nil {
					return err
				}
				i++
				for i < len(ents) && done+n < total && ents[i] == e+uint64(in+n) {
					n += min(total-done-n, cs)
					i++
				}
				if _, err := im.f.WriteAt(p[done:done+n], int64(e)+in); err != nil {
					return driver.WithFile(err, "write", im.name)
				}
			default:
				if e == 0 && !im.hasBacking() && driver.IsZero(p[done:done+n]) {
					// Reads zeros already.
					i++
					break
				}
				// A run of clusters to allocate.
				j := i + 1
				for j < len(ents) && j-i < int(maxRun) && done+n < total && kindOf(ents[j]) != kNormal {
					m := min(total-done-n, cs)
					if ents[j] == 0 && !im.hasBacking() && driver.IsZero(p[done+n:done+n+m]) {
						break
					}
					n += m
					j++
				}
				if err := im.allocRun(c+int64(i), ents[i:j], p[done:done+n], in); err != nil {
					return err
				}
				i = j
			}
			done += n
		}
	}
	return nil
}

// checkData refuses to write through a corrupt data entry: unaligned,
// past the end of the file, or inside the metadata at its start.
func (im *image) checkData(e uint64, c int64) error {
	im.meta.Lock()
	end := im.end
	im.meta.Unlock()
	switch {
	case e&511 != 0:
		return driver.Corruptf(im.name, int64(c)*im.lo.cs, "cluster %d is at file offset %d, which is not sector-aligned", c, e)
	case e >= maxFileOff || int64(e) >= end:
		return driver.Corruptf(im.name, int64(c)*im.lo.cs, "cluster %d is at file offset %d, past the end of the file", c, e)
	case int64(e) < im.lo.metaEnd:
		return driver.Corruptf(im.name, int64(c)*im.lo.cs, "cluster %d is at file offset %d, inside the header or L1 table", c, e)
	}
	return nil
}

// allocRun gives clusters c, c+1, ... (entries ents: unallocated or
// compressed, all in one L2 table) new contiguous clusters at the end of
// the file holding data, which starts at byte in of cluster c: the data
// first, then the L2 entries.
func (im *image) allocRun(c int64, ents []uint64, data []byte, in int64) error {
	cs := im.lo.cs
	k := int64(len(ents))
	var out []byte
	if in == 0 && int64(len(data)) == k*cs {
		out = data // whole clusters: write straight from the caller's buffer
	} else {
		bp := runPool.Get().(*[]byte)
		defer runPool.Put(bp)
		out = (*bp)[:k*cs]
		pos := int64(0)
		for j := int64(0); j < k; j++ {
			cl := out[j*cs : (j+1)*cs]
			lo := int64(0)
			if j == 0 {
				lo = in
			}
			m := min(int64(len(data))-pos, cs-lo)
			if lo > 0 || lo+m < im.lo.clusterLen(c+j) {
				if err := im.oldContent(cl, c+j, ents[j]); err != nil {
					return err
				}
			}
			copy(cl[lo:], data[pos:pos+m])
			if lo+m < cs {
				// Past the end of the disk: keep the file's bytes zero.
				clear(cl[max(lo+m, im.lo.clusterLen(c+j)):])
			}
			pos += m
		}
	}
	fo, err := im.reserve(k*cs, true)
	if err != nil {
		return err
	}
	if _, err := im.f.WriteAt(out, fo); err != nil {
		im.release(fo, k*cs)
		return driver.WithFile(err, "write", im.name)
	}
	vals := make([]uint64, k)
	for j := range vals {
		vals[j] = uint64(fo + int64(j)*cs)
	}
	return im.setEntries(c, vals)
}

// oldContent fills cl with what cluster c (entry e) reads before a
// partial write: zeros for an unallocated cluster of an image without a
// backing file, the inflated data of a compressed one.
func (im *image) oldContent(cl []byte, c int64, e uint64) error {
	switch kindOf(e) {
	case kCompressed:
		d, err := im.inflate(e, c)
		if err != nil {
			return err
		}
		copy(cl, d)
		return nil
	case kUnalloc:
		if !im.hasBacking() {
			clear(cl)
			return nil
		}
	}
	return driver.Corruptf(im.name, c*im.lo.cs, "internal error: partial write into unallocated cluster %d of an image with a backing file without a fill", c)
}
