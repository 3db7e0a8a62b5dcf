package vdisk

import (
	"bytes"
	"context"
	"errors"
	"io"
	"sync"
	"testing"

	"github.com/vdisk/vdisk/driver"
)

// scripted is a test image whose status runs are given explicitly; data
// bytes read as the layer's tag byte.
type scripted struct {
	size   int64
	tag    byte
	runs   []driver.Extent // consecutive from 0
	parent *driver.ParentRef
	mu     sync.Mutex
	writes map[int64]byte
	badLen bool
}

func (s *scripted) Size() int64 { return s.size }
func (s *scripted) Status(off, n int64) (driver.Extent, error) {
	if s.badLen {
		return driver.Extent{State: driver.Data, Length: n + 1}, nil
	}
	pos := int64(0)
	for _, r := range s.runs {
		if off < pos+r.Length {
			return driver.Extent{State: r.State, Length: min(n, pos+r.Length-off), Offset: -1}, nil
		}
		pos += r.Length
	}
	return driver.Extent{State: driver.Unallocated, Length: n, Offset: -1}, nil
}
func (s *scripted) ReadAt(p []byte, off int64) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := range p {
		if b, ok := s.writes[off+int64(i)]; ok {
			p[i] = b
		} else {
			p[i] = s.tag
		}
	}
	return len(p), nil
}
func (s *scripted) WriteAt(p []byte, off int64) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.writes == nil {
		s.writes = map[int64]byte{}
	}
	for i, b := range p {
		s.writes[off+int64(i)] = b
	}
	return len(p), nil
}
func (s *scripted) Flush() error              { return nil }
func (s *scripted) Close() error              { return nil }
func (s *scripted) Info() driver.Info         { return driver.Info{Format: "scripted", VirtualSize: s.size} }
func (s *scripted) Parent() *driver.ParentRef { return s.parent }

var scriptedFormat = &driver.Format{Name: "scripted"}

func chainOf(imgs ...*scripted) *Disk {
	var layers []*Layer
	for i, im := range imgs {
		layers = append(layers, &Layer{Name: string(rune('a' + i)), Format: scriptedFormat, img: im, ReadOnly: i > 0})
	}
	return newDisk(layers, false, nil, nil)
}

func runs(rs ...any) []driver.Extent {
	var out []driver.Extent
	for i := 0; i < len(rs); i += 2 {
		out = append(out, driver.Extent{State: rs[i].(driver.State), Length: int64(rs[i+1].(int))})
	}
	return out
}

const (
	U = driver.Unallocated
	D = driver.Data
	Z = driver.Zero
)

func TestChainRead(t *testing.T) {
	cases := []struct {
		name   string
		layers []*scripted
		want   string // one char per byte: tag letters or '0'
	}{
		{"single data", []*scripted{{size: 4, tag: 'a', runs: runs(D, 4)}}, "aaaa"},
		{"base unallocated reads zeros", []*scripted{{size: 4, tag: 'a', runs: runs(U, 2, D, 2)}}, "00aa"},
		{"fall through", []*scripted{
			{size: 6, tag: 't', runs: runs(D, 1, U, 4, Z, 1)},
			{size: 6, tag: 'b', runs: runs(D, 6)},
		}, "tbbbb0"},
		{"zero stops fall through", []*scripted{
			{size: 4, tag: 't', runs: runs(Z, 2, U, 2)},
			{size: 4, tag: 'b', runs: runs(D, 4)},
		}, "00bb"},
		{"smaller parent reads zeros past its end", []*scripted{
			{size: 8, tag: 't', runs: runs(U, 8)},
			{size: 3, tag: 'b', runs: runs(D, 3)},
		}, "bbb00000"},
		{"three layers", []*scripted{
			{size: 6, tag: 't', runs: runs(U, 2, D, 1, U, 3)},
			{size: 6, tag: 'm', runs: runs(D, 1, U, 4, D, 1)},
			{size: 4, tag: 'b', runs: runs(D, 4)},
		}, "mbtb0m"},
		{"middle smaller than base hides base", []*scripted{
			{size: 6, tag: 't', runs: runs(U, 6)},
			{size: 2, tag: 'm', runs: runs(U, 2)},
			{size: 6, tag: 'b', runs: runs(D, 6)},
		}, "bb0000"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := chainOf(c.layers...)
			p := make([]byte, len(c.want))
			if _, err := d.ReadAt(p, 0); err != nil {
				t.Fatal(err)
			}
			got := bytes.ReplaceAll(p, []byte{0}, []byte("0"))
			if string(got) != c.want {
				t.Fatalf("read %q, want %q", got, c.want)
			}
			// Reads of every sub-range agree with the whole.
			for off := 0; off < len(c.want); off++ {
				for n := 1; off+n <= len(c.want); n++ {
					q := make([]byte, n)
					if _, err := d.ReadAt(q, int64(off)); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(q, p[off:off+n]) {
						t.Fatalf("read %d+%d = %q, whole read says %q", off, n, q, p[off:off+n])
					}
				}
			}
		})
	}
}

func TestChainStatusDepth(t *testing.T) {
	d := chainOf(
		&scripted{size: 8, tag: 't', runs: runs(D, 2, U, 6)},
		&scripted{size: 8, tag: 'm', runs: runs(U, 2, Z, 2, U, 4)},
		&scripted{size: 6, tag: 'b', runs: runs(U, 4, D, 2)},
	)
	var got []Extent
	if err := d.Map(context.Background(), 0, 8, func(e Extent) error { got = append(got, e); return nil }); err != nil {
		t.Fatal(err)
	}
	want := []struct {
		start, length   int64
		depth           int
		present, z, dat bool
	}{
		{0, 2, 0, true, false, true},
		{2, 2, 1, true, true, false},
		{4, 2, 2, true, false, true},
		{6, 2, 2, false, true, false}, // past the base's end
	}
	if len(got) != len(want) {
		t.Fatalf("got %d runs %+v, want %d", len(got), got, len(want))
	}
	for i, w := range want {
		g := got[i]
		if g.Start != w.start || g.Length != w.length || g.Depth != w.depth || g.Present() != w.present || g.ReadsZero() != w.z || g.IsData() != w.dat {
			t.Errorf("run %d = %+v, want %+v", i, g, w)
		}
	}
}

func TestWritesGoToTopOnly(t *testing.T) {
	top := &scripted{size: 4, tag: 't', runs: runs(U, 4)}
	base := &scripted{size: 4, tag: 'b', runs: runs(D, 4)}
	d := chainOf(top, base)
	if _, err := d.WriteAt([]byte("xy"), 1); err != nil {
		t.Fatal(err)
	}
	if len(base.writes) != 0 {
		t.Fatalf("base was written: %v", base.writes)
	}
	if len(top.writes) != 2 {
		t.Fatalf("top got %d bytes, want 2", len(top.writes))
	}
}

func TestBadDriverStatusIsCorruptNotPanic(t *testing.T) {
	d := chainOf(&scripted{size: 8, tag: 'a', badLen: true})
	_, err := d.ReadAt(make([]byte, 4), 0)
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("err = %v, want ErrCorrupt", err)
	}
}

func TestAccessChecks(t *testing.T) {
	d := chainOf(&scripted{size: 8, tag: 'a', runs: runs(D, 8)})
	if n, err := d.ReadAt(make([]byte, 4), 6); n != 2 || err != io.EOF {
		t.Fatalf("read past end: n=%d err=%v, want 2, EOF", n, err)
	}
	if _, err := d.WriteAt(make([]byte, 4), 6); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("write past end: %v", err)
	}
	if _, err := d.ReadAt(make([]byte, 1), -1); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("negative offset: %v", err)
	}
	ro := chainOf(&scripted{size: 8, tag: 'a', runs: runs(D, 8)})
	ro.readOnly = true
	if _, err := ro.WriteAt([]byte{1}, 0); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("write to read-only disk: %v", err)
	}
	if err := ro.WriteZeroes(0, 1, true); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("zero on read-only disk: %v", err)
	}
	d.Close()
	if _, err := d.ReadAt(make([]byte, 1), 0); err == nil {
		t.Fatal("read after close succeeded")
	}
}

// filler asks for a fill of unit bytes around every write that does not
// cover whole units, with a lock granularity (ClusterSize) of 512 bytes:
// the Disk must widen a client's lock, and refuse in a job.
type filler struct {
	scripted
	unit   int64
	filled [][2]int64
}

func (f *filler) WriteAt(p []byte, off int64) (int, error) {
	start := off / f.unit * f.unit
	end := min((off+int64(len(p))+f.unit-1)/f.unit*f.unit, f.size)
	if start != off || end != off+int64(len(p)) {
		return 0, driver.NeedFill("filler", start, end)
	}
	f.mu.Lock()
	f.filled = append(f.filled, [2]int64{off, end})
	f.mu.Unlock()
	return f.scripted.WriteAt(p, off)
}
func (f *filler) Info() driver.Info {
	return driver.Info{Format: "filler", VirtualSize: f.size, ClusterSize: 512}
}

func TestFillPath(t *testing.T) {
	cases := []struct {
		name      string
		off, n    int64
		wantStart int64
		wantEnd   int64
	}{
		{"head and tail", 100, 200, 0, 8192},
		{"whole unit", 8192, 8192, 8192, 16384},
		{"across units", 8000, 400, 0, 16384},
		{"last unit", 30000, 100, 24576, 32768},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			top := &filler{scripted: scripted{size: 32768, tag: 't', runs: runs(U, 32768)}, unit: 8192}
			base := &scripted{size: 32768, tag: 'b', runs: runs(D, 32768)}
			d := newDisk([]*Layer{
				{Name: "top", Format: scriptedFormat, img: top},
				{Name: "base", Format: scriptedFormat, img: base, ReadOnly: true},
			}, false, nil, nil)
			p := bytes.Repeat([]byte{'w'}, int(c.n))
			if _, err := d.WriteAt(p, c.off); err != nil {
				t.Fatal(err)
			}
			if len(top.filled) != 1 || top.filled[0] != [2]int64{c.wantStart, c.wantEnd} {
				t.Fatalf("driver wrote %v, want [%d, %d)", top.filled, c.wantStart, c.wantEnd)
			}
			for i := c.wantStart; i < c.wantEnd; i++ {
				want := byte('b')
				if i >= c.off && i < c.off+c.n {
					want = 'w'
				}
				if got := top.writes[i]; got != want {
					t.Fatalf("byte %d written as %q, want %q", i, got, want)
				}
			}
			// A job writing into the same kind of unit may not trade its
			// lock: it refuses instead.
			err := d.shared(func() error {
				h := &held{r: d.lockRange(c.off, c.n, true)}
				defer d.locks.Unlock(h.r)
				return d.writeLayer(0, p, c.off, h)
			})
			if c.off%8192 != 0 || c.n%8192 != 0 {
				if !errors.Is(err, ErrUnsupported) {
					t.Fatalf("job write past the lock: %v", err)
				}
			} else if err != nil {
				t.Fatal(err)
			}
		})
	}
}
