package vdisk

import (
	"math/bits"
	"sync"
)

// dirtyMap records which ranges of the top were written while a live job
// runs, at a fixed granularity, so the job can copy them again.
type dirtyMap struct {
	mu   sync.Mutex
	gran int64
	bits []uint64
	n    int64 // set bits
}

func newDirtyMap(size, gran int64) *dirtyMap {
	// At most 2^24 granules (2 MiB of bits) however large the disk.
	for size/gran > 1<<24 {
		gran *= 2
	}
	units := (size + gran - 1) / gran
	return &dirtyMap{gran: gran, bits: make([]uint64, (units+63)/64)}
}

func (m *dirtyMap) mark(off, n int64) {
	if n <= 0 {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	last := int64(len(m.bits)) * 64
	for u := off / m.gran; u <= (off+n-1)/m.gran && u < last; u++ {
		w, b := u/64, uint(u%64)
		if m.bits[w]&(1<<b) == 0 {
			m.bits[w] |= 1 << b
			m.n++
		}
	}
}

// count is the number of dirty bytes (rounded to granules).
func (m *dirtyMap) count() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.n * m.gran
}

// take returns the dirty ranges (merged) and clears them.
func (m *dirtyMap) take() [][2]int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out [][2]int64
	for w, word := range m.bits {
		for word != 0 {
			b := bits.TrailingZeros64(word)
			word &^= 1 << uint(b)
			u := int64(w)*64 + int64(b)
			off := u * m.gran
			if k := len(out); k > 0 && out[k-1][1] == off {
				out[k-1][1] += m.gran
			} else {
				out = append(out, [2]int64{off, off + m.gran})
			}
		}
		m.bits[w] = 0
	}
	m.n = 0
	return out
}

// markDirty records a write to the top in every running job's map.
func (d *Disk) markDirty(off, n int64) {
	ts := d.trackers.Load()
	if ts == nil {
		return
	}
	for _, t := range *ts {
		t.mark(off, n)
	}
}

func (d *Disk) addTracker(t *dirtyMap) {
	for {
		old := d.trackers.Load()
		var next []*dirtyMap
		if old != nil {
			next = append(next, *old...)
		}
		next = append(next, t)
		if d.trackers.CompareAndSwap(old, &next) {
			return
		}
	}
}

func (d *Disk) removeTracker(t *dirtyMap) {
	for {
		old := d.trackers.Load()
		if old == nil {
			return
		}
		var next []*dirtyMap
		for _, x := range *old {
			if x != t {
				next = append(next, x)
			}
		}
		var p *[]*dirtyMap
		if len(next) > 0 {
			p = &next
		}
		if d.trackers.CompareAndSwap(old, p) {
			return
		}
	}
}
