// Package rangelock serialises access to byte ranges: any number of readers
// may hold overlapping ranges, a writer excludes every overlapping holder.
package rangelock

import "sync"

// Locker is a range lock. The zero value is ready to use.
type Locker struct {
	mu      sync.Mutex
	cond    *sync.Cond
	held    map[*Range]struct{}
	waiting int
	// free: released Ranges for reuse, so that a lock costs no
	// allocation (a Range must not be used after its Unlock).
	free []*Range
}

// maxFree bounds the released Ranges a Locker keeps.
const maxFree = 64

// Range is a held lock; release it with Unlock.
type Range struct {
	off, end int64
	write    bool
}

func (l *Locker) init() {
	if l.cond == nil {
		l.cond = sync.NewCond(&l.mu)
		l.held = map[*Range]struct{}{}
	}
}

func (l *Locker) conflicts(r *Range) bool {
	for h := range l.held {
		if h.off < r.end && r.off < h.end && (h.write || r.write) {
			return true
		}
	}
	return false
}

// Lock acquires [off, off+n) for reading (write=false) or writing.
func (l *Locker) Lock(off, n int64, write bool) *Range {
	l.mu.Lock()
	var r *Range
	if k := len(l.free); k > 0 {
		r = l.free[k-1]
		l.free = l.free[:k-1]
		*r = Range{off: off, end: off + n, write: write}
	} else {
		r = &Range{off: off, end: off + n, write: write}
	}
	l.init()
	for l.conflicts(r) {
		l.waiting++
		l.cond.Wait()
		l.waiting--
	}
	l.held[r] = struct{}{}
	l.mu.Unlock()
	return r
}

// Unlock releases r.
func (l *Locker) Unlock(r *Range) {
	l.mu.Lock()
	if _, ok := l.held[r]; ok {
		delete(l.held, r)
		if len(l.free) < maxFree {
			l.free = append(l.free, r)
		}
	}
	if l.waiting > 0 {
		l.cond.Broadcast()
	}
	l.mu.Unlock()
}

// Covers reports whether r holds all of [off, off+n).
func (r *Range) Covers(off, n int64) bool { return r.off <= off && off+n <= r.end }

// Widen releases r and acquires the smallest range covering both r and
// [off, off+n), with r's mode. It does not hold r while it waits (two
// widening holders would otherwise wait for each other), so what r
// protected may change in between: callers re-read after widening.
func (l *Locker) Widen(r *Range, off, n int64) *Range {
	start, end, write := min(r.off, off), max(r.end, off+n), r.write
	l.Unlock(r)
	return l.Lock(start, end-start, write)
}
