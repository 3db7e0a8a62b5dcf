package killtest

import (
	"bufio"
	"bytes"
	"fmt"
	"strconv"
	"strings"
)

// model is what the image must read: want, where known says a sector's
// content is certain. It starts each run as the image's exact content and
// takes the run's log: the operations that finished before a completed
// flush began are certain, every other one makes its range (and, for a
// resize, the size) uncertain.
type model struct {
	want  []byte
	known []bool // per sector
	size  int64  // the size the image must have at least
	maxSz int64  // the largest size an uncertain resize may have left
}

func newModel(content []byte) *model {
	m := &model{want: bytes.Clone(content), known: make([]bool, len(content)/sector), size: int64(len(content))}
	for i := range m.known {
		m.known[i] = true
	}
	m.maxSz = m.size
	return m
}

type logOp struct {
	id      int64
	kind    byte
	off, n  int64
	size    int64 // the disk's size after it (from its E line)
	ended   bool
	certain bool
}

// parseLog reads a run's log: the operations in the order they began and
// the number of them, in the order they ended, that a completed flush
// covers.
func parseLog(text []byte) (ops []*logOp, ended []*logOp, durable int, err error) {
	byID := make(map[int64]*logOp)
	pendingFB := -1
	sc := bufio.NewScanner(bytes.NewReader(text))
	for sc.Scan() {
		line := sc.Text()
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		num := func(i int) int64 {
			if i >= len(f) {
				err = fmt.Errorf("short log line %q", line)
				return 0
			}
			v, e := strconv.ParseInt(f[i], 10, 64)
			if e != nil {
				err = fmt.Errorf("log line %q: %v", line, e)
			}
			return v
		}
		switch f[0] {
		case "B":
			o := &logOp{id: num(1), off: num(3), n: num(4)}
			if len(f) > 2 && len(f[2]) == 1 {
				o.kind = f[2][0]
			}
			byID[o.id] = o
			ops = append(ops, o)
		case "E":
			o := byID[num(1)]
			if o == nil {
				return nil, nil, 0, fmt.Errorf("log: end of unknown operation %q", line)
			}
			o.size, o.ended = num(2), true
			ended = append(ended, o)
		case "FB":
			pendingFB = len(ended)
		case "FE":
			if pendingFB >= 0 {
				durable = pendingFB
			}
		}
		if err != nil {
			return nil, nil, 0, err
		}
	}
	// A line cut short by the kill (no newline) is one the scanner still
	// returns; its operation never started in earnest, which "uncertain"
	// covers.
	return ops, ended, durable, nil
}

// apply takes a run's log into the model.
func (m *model) apply(text []byte) error {
	ops, ended, durable, err := parseLog(text)
	if err != nil {
		return err
	}
	for _, o := range ended[:durable] {
		o.certain = true
		m.do(o)
	}
	for _, o := range ops {
		if o.certain {
			continue
		}
		if o.kind == 'r' {
			m.grow(max(o.n, o.size)) // n: the size asked for
			m.maxSz = max(m.maxSz, o.n, o.size)
			continue
		}
		m.forget(o.off, o.n)
	}
	return nil
}

// do applies a certain operation.
func (m *model) do(o *logOp) {
	switch o.kind {
	case 'w':
		m.grow(o.off + o.n)
		pattern(m.want[o.off:o.off+o.n], o.id, o.off)
		m.remember(o.off, o.n)
	case 'z', 'u':
		m.grow(o.off + o.n)
		clear(m.want[o.off : o.off+o.n])
		m.remember(o.off, o.n)
	case 'd':
		// Whole units read zeros afterwards, parts may keep their data.
		m.forget(o.off, o.n)
	case 'r':
		m.grow(o.size)
		clear(m.want[m.size:o.size])
		m.remember(m.size, o.size-m.size)
		m.size, m.maxSz = o.size, max(m.maxSz, o.size)
	}
}

func (m *model) grow(size int64) {
	if size <= int64(len(m.want)) {
		return
	}
	old := int64(len(m.want))
	m.want = append(m.want, make([]byte, size-old)...)
	for range (size - old) / sector {
		m.known = append(m.known, false)
	}
}

func (m *model) remember(off, n int64) {
	for s := off / sector; s < (off+n)/sector; s++ {
		m.known[s] = true
	}
}

func (m *model) forget(off, n int64) {
	m.grow(off + n)
	for s := off / sector; s < (off+n+sector-1)/sector; s++ {
		m.known[s] = false
	}
}

// verify compares the image's content with the model and returns the
// first difference.
func (m *model) verify(got []byte) error {
	if int64(len(got)) < m.size || int64(len(got)) > m.maxSz+(64<<20) {
		return fmt.Errorf("size %d, want at least %d (an uncertain resize may give up to %d)", len(got), m.size, m.maxSz)
	}
	for s := range min(int64(len(got)), m.size) / sector {
		if !m.known[s] {
			continue
		}
		a, b := got[s*sector:(s+1)*sector], m.want[s*sector:(s+1)*sector]
		if !bytes.Equal(a, b) {
			return fmt.Errorf("sector %d (offset %d) differs from what was flushed before the kill", s, s*sector)
		}
	}
	return nil
}
