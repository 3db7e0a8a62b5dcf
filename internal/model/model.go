// Package model is the reference model for random-I/O tests: a plain byte
// array that says what every byte of a disk must read as, and a seeded
// random-operation harness that drives a vdisk.Disk (of any writable format
// and chain depth) and the model side by side, comparing every read.
package model

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/vdisk/vdisk"
)

// Model is the expected content of a disk. Bytes inside an unknown range
// (after a discard) may read as anything, but must read the same every time
// until written again.
type Model struct {
	Data    []byte
	unknown []span // sorted, disjoint
}

type span struct{ off, end int64 }

// New returns a model of an all-zero disk of size bytes.
func New(size int64) *Model { return &Model{Data: make([]byte, size)} }

// Write records a write.
func (m *Model) Write(p []byte, off int64) {
	copy(m.Data[off:], p)
	m.known(off, off+int64(len(p)))
}

// Zero records a write of zeroes.
func (m *Model) Zero(off, n int64) {
	clear(m.Data[off : off+n])
	m.known(off, off+n)
}

// Discard marks a range unspecified.
func (m *Model) Discard(off, n int64) {
	m.known(off, off+n)
	i := 0
	for i < len(m.unknown) && m.unknown[i].off < off {
		i++
	}
	m.unknown = append(m.unknown, span{})
	copy(m.unknown[i+1:], m.unknown[i:])
	m.unknown[i] = span{off, off + n}
}

// known removes [off, end) from the unknown ranges.
func (m *Model) known(off, end int64) {
	if len(m.unknown) == 0 {
		return
	}
	out := m.unknown[:0:0]
	for _, s := range m.unknown {
		if s.end <= off || s.off >= end {
			out = append(out, s)
			continue
		}
		if s.off < off {
			out = append(out, span{s.off, off})
		}
		if s.end > end {
			out = append(out, span{end, s.end})
		}
	}
	m.unknown = out
}

func (m *Model) isKnown(i int64) bool {
	for _, s := range m.unknown {
		if i >= s.off && i < s.end {
			return false
		}
	}
	return true
}

// Check compares p, read at off, with the model; it returns the offset of
// the first mismatch or -1.
func (m *Model) Check(p []byte, off int64) int64 {
	want := m.Data[off : off+int64(len(p))]
	if bytes.Equal(p, want) {
		return -1
	}
	for i := range p {
		if p[i] != want[i] && m.isKnown(off+int64(i)) {
			return off + int64(i)
		}
	}
	return -1
}

// Learn records what was read for unknown bytes, so later reads must be
// stable (a discarded range must not change content by itself).
func (m *Model) Learn(p []byte, off int64) {
	end := off + int64(len(p))
	for _, s := range m.unknown {
		lo, hi := max(s.off, off), min(s.end, end)
		if lo < hi {
			copy(m.Data[lo:hi], p[lo-off:hi-off])
		}
	}
	m.known(off, end)
}

// Harness drives random operations against a disk and the model.
type Harness struct {
	Seed int64
	Ops  int
	// MaxIO bounds the length of one operation (default 256 KiB).
	MaxIO int64
	// Align, when > 1, aligns offsets and lengths (default 1: any byte).
	Align int64
	// Unit is the allocation unit whose boundaries a quarter of the
	// operations straddle, at every alignment, so that the container's
	// copy-on-write fills are exercised (default: the top's cluster size,
	// else 64 KiB; 512 bytes are straddled too, for sector-granular
	// formats).
	Unit int64
	// Reopen closes d and opens the chain again (nil: no reopen steps).
	Reopen func(d *vdisk.Disk) (*vdisk.Disk, error)
	// Snapshot puts a new diff image on top of d and returns the new disk,
	// or (nil, nil) when the chain is deep enough (nil: no snapshot steps).
	Snapshot func(d *vdisk.Disk) (*vdisk.Disk, error)
	// NoDiscard skips discard steps; NoZero skips write-zeroes steps.
	NoDiscard, NoZero bool
	// Parallel is the number of goroutines in parallel batches (default 4).
	Parallel int
}

type op struct {
	kind  string
	off   int64
	n     int64
	unmap bool
}

func (o op) String() string {
	return fmt.Sprintf("%s off=%d len=%d unmap=%v", o.kind, o.off, o.n, o.unmap)
}

// Run executes the harness on d with model m (which must describe d's
// current content). It returns the disk it ended with (possibly reopened or
// snapshotted) so the caller can close it.
func (h *Harness) Run(t testing.TB, d *vdisk.Disk, m *Model) *vdisk.Disk {
	t.Helper()
	var seed [32]byte
	binary.LittleEndian.PutUint64(seed[:], uint64(h.Seed))
	src := rand.NewChaCha8(seed)
	rng := rand.New(src)
	maxIO := h.MaxIO
	if maxIO <= 0 {
		maxIO = 256 << 10
	}
	align := max(h.Align, 1)
	par := h.Parallel
	if par <= 0 {
		par = 4
	}
	size := d.Size()
	if int64(len(m.Data)) != size {
		t.Fatalf("model size %d != disk size %d", len(m.Data), size)
	}
	unit := h.Unit
	if unit <= 0 {
		unit = d.Top().Info().ClusterSize
	}
	if unit <= 0 {
		unit = 64 << 10
	}
	randRange := func() (int64, int64) {
		if u := []int64{unit, 512}[rng.IntN(2)]; rng.IntN(4) == 0 && u > align && size >= 2*u {
			// Across a unit boundary: x bytes before it, y after.
			b := (rng.Int64N(size/u-1) + 1) * u
			x := (rng.Int64N(min(u, maxIO/2))/align + 1) * align
			y := (rng.Int64N(min(u, maxIO/2))/align + 1) * align
			x, y = min(x, b), min(y, size-b)
			return b - x, x + y
		}
		n := (rng.Int64N(maxIO)/align + 1) * align
		if rng.IntN(8) == 0 { // small ops around block edges
			n = (rng.Int64N(3*align+1)/align + 1) * align
		}
		n = min(n, size)
		off := rng.Int64N((size-n)/align+1) * align
		return off, n
	}
	fail := func(i int, o op, format string, args ...any) {
		t.Helper()
		t.Fatalf("seed %d, op %d (%s): %s", h.Seed, i, o, fmt.Sprintf(format, args...))
	}
	buf := make([]byte, maxIO+3*align)
	for i := 0; i < h.Ops; i++ {
		r := rng.IntN(100)
		var o op
		switch {
		case r < 38:
			o.kind = "write"
		case r < 70:
			o.kind = "read"
		case r < 78:
			o.kind = "zero"
		case r < 84:
			o.kind = "discard"
		case r < 89:
			o.kind = "flush"
		case r < 91:
			o.kind = "reopen"
		case r < 92:
			o.kind = "snapshot"
		default:
			o.kind = "parallel"
		}
		if (o.kind == "zero" && h.NoZero) || (o.kind == "discard" && h.NoDiscard) {
			o.kind = "write"
		}
		o.off, o.n = randRange()
		switch o.kind {
		case "write":
			p := buf[:o.n]
			fillPattern(rng, src, p)
			if _, err := d.WriteAt(p, o.off); err != nil {
				fail(i, o, "write: %v", err)
			}
			m.Write(p, o.off)
		case "read":
			p := buf[:o.n]
			if _, err := d.ReadAt(p, o.off); err != nil {
				fail(i, o, "read: %v", err)
			}
			if bad := m.Check(p, o.off); bad >= 0 {
				fail(i, o, "byte %d reads %#x, model says %#x", bad, p[bad-o.off], m.Data[bad])
			}
			m.Learn(p, o.off)
		case "zero":
			o.unmap = rng.IntN(2) == 0
			if err := d.WriteZeroes(o.off, o.n, o.unmap); err != nil {
				fail(i, o, "write zeroes: %v", err)
			}
			m.Zero(o.off, o.n)
		case "discard":
			if err := d.Discard(o.off, o.n); err != nil {
				fail(i, o, "discard: %v", err)
			}
			m.Discard(o.off, o.n)
		case "flush":
			if err := d.Flush(); err != nil {
				fail(i, o, "flush: %v", err)
			}
		case "reopen":
			if h.Reopen == nil {
				continue
			}
			nd, err := h.Reopen(d)
			if err != nil {
				fail(i, o, "reopen: %v", err)
			}
			d = nd
		case "snapshot":
			if h.Snapshot == nil {
				continue
			}
			nd, err := h.Snapshot(d)
			if err != nil {
				fail(i, o, "snapshot: %v", err)
			}
			if nd != nil {
				d = nd
			}
		case "parallel":
			d = h.parallel(t, i, rng, src, d, m, par, randRange, fail)
		}
	}
	h.Verify(t, d, m)
	return d
}

// parallel runs one batch of non-overlapping writes and reads concurrently.
func (h *Harness) parallel(t testing.TB, i int, rng *rand.Rand, src *rand.ChaCha8, d *vdisk.Disk, m *Model, par int,
	randRange func() (int64, int64), fail func(int, op, string, ...any)) *vdisk.Disk {
	type pop struct {
		write bool
		off   int64
		p     []byte
	}
	var ops []pop
	overlaps := func(off, n int64) bool {
		for _, o := range ops {
			if off < o.off+int64(len(o.p)) && o.off < off+n {
				return true
			}
		}
		return false
	}
	for len(ops) < par {
		off, n := randRange()
		if overlaps(off, n) {
			if rng.IntN(4) == 0 {
				break
			}
			continue
		}
		p := make([]byte, n)
		w := rng.IntN(2) == 0
		if w {
			fillPattern(rng, src, p)
		}
		ops = append(ops, pop{w, off, p})
	}
	errs := make([]error, len(ops))
	var wg sync.WaitGroup
	for k := range ops {
		wg.Add(1)
		go func(k int) {
			defer wg.Done()
			o := ops[k]
			if o.write {
				_, errs[k] = d.WriteAt(o.p, o.off)
			} else {
				_, errs[k] = d.ReadAt(o.p, o.off)
			}
		}(k)
	}
	wg.Wait()
	for k, o := range ops {
		desc := op{kind: "parallel-read", off: o.off, n: int64(len(o.p))}
		if o.write {
			desc.kind = "parallel-write"
		}
		if errs[k] != nil {
			fail(i, desc, "%v", errs[k])
		}
		if !o.write {
			if bad := m.Check(o.p, o.off); bad >= 0 {
				fail(i, desc, "byte %d reads %#x, model says %#x", bad, o.p[bad-o.off], m.Data[bad])
			}
		}
	}
	for _, o := range ops {
		if o.write {
			m.Write(o.p, o.off)
		} else {
			m.Learn(o.p, o.off)
		}
	}
	return d
}

// Verify reads the whole disk and checks it against the model, and checks
// that every run the chain reports as zero reads as zeros.
func (h *Harness) Verify(t testing.TB, d *vdisk.Disk, m *Model) {
	t.Helper()
	size := d.Size()
	const chunk = 1 << 20
	buf := make([]byte, chunk)
	for off := int64(0); off < size; off += chunk {
		n := min(chunk, size-off)
		if _, err := d.ReadAt(buf[:n], off); err != nil {
			t.Fatalf("seed %d: final read at %d: %v", h.Seed, off, err)
		}
		if bad := m.Check(buf[:n], off); bad >= 0 {
			t.Fatalf("seed %d: final check: byte %d reads %#x, model says %#x", h.Seed, bad, buf[bad-off], m.Data[bad])
		}
		m.Learn(buf[:n], off)
	}
	err := d.Map(context.Background(), 0, size, func(e vdisk.Extent) error {
		if e.IsData() {
			return nil
		}
		if i := firstNonZero(m.Data[e.Start : e.Start+e.Length]); i >= 0 {
			return fmt.Errorf("status reports %d+%d as zero but byte %d is %#x", e.Start, e.Length, e.Start+int64(i), m.Data[e.Start+int64(i)])
		}
		return nil
	})
	if err != nil {
		t.Fatalf("seed %d: %v", h.Seed, err)
	}
}

var zeros = make([]byte, 64<<10)

func firstNonZero(b []byte) int {
	base := 0
	for len(b) > 0 {
		n := min(len(b), len(zeros))
		if !bytes.Equal(b[:n], zeros[:n]) {
			for i, c := range b[:n] {
				if c != 0 {
					return base + i
				}
			}
		}
		b, base = b[n:], base+n
	}
	return -1
}

// fillPattern fills p with random bytes, sometimes leaving runs of zeros so
// zero detection is exercised.
func fillPattern(rng *rand.Rand, src *rand.ChaCha8, p []byte) {
	switch rng.IntN(6) {
	case 0:
		clear(p)
	case 1:
		c := byte(rng.IntN(255) + 1)
		for i := range p {
			p[i] = c
		}
	case 2:
		// data with a zero hole in the middle
		src.Read(p)
		a := rng.IntN(len(p) + 1)
		b := a + rng.IntN(len(p)-a+1)
		clear(p[a:b])
	default:
		src.Read(p)
	}
}
