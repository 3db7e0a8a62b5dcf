package s3

// extents is a sorted list of disjoint, non-adjacent [start, end) ranges:
// the bytes of a part that were written.
type extents [][2]int64

// add merges [lo, hi) in.
func (e *extents) add(lo, hi int64) {
	if lo >= hi {
		return
	}
	s := *e
	// i: first range ending at or after lo (touching counts: merge).
	i := 0
	for i < len(s) && s[i][1] < lo {
		i++
	}
	j := i
	for j < len(s) && s[j][0] <= hi {
		lo, hi = min(lo, s[j][0]), max(hi, s[j][1])
		j++
	}
	if i == j {
		s = append(s, [2]int64{})
		copy(s[i+1:], s[i:])
		s[i] = [2]int64{lo, hi}
	} else {
		s[i] = [2]int64{lo, hi}
		s = append(s[:i+1], s[j:]...)
	}
	*e = s
}

// covers reports whether [lo, hi) was written entirely.
func (e extents) covers(lo, hi int64) bool {
	for _, r := range e {
		if r[0] <= lo && r[1] >= hi {
			return true
		}
	}
	return lo >= hi
}

// trim drops everything at or after hi.
func (e *extents) trim(hi int64) {
	s := *e
	k := 0
	for _, r := range s {
		if r[0] >= hi {
			break
		}
		r[1] = min(r[1], hi)
		s[k] = r
		k++
	}
	*e = s[:k]
}
