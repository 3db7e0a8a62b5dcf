package qcow2

import (
	"bytes"
	"context"
	"fmt"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/memfs"
)

// newFillImage creates an image through the driver (no container), with
// a recorded backing file when backed. The backing file does not exist:
// the driver never opens or reads it.
func newFillImage(t *testing.T, size int64, backed bool, opts ...string) *image {
	t.Helper()
	var kvs []driver.KV
	for _, o := range opts {
		kv, err := driver.SplitOptions(o)
		if err != nil {
			t.Fatal(err)
		}
		kvs = append(kvs, kv...)
	}
	vals, err := driver.ParseOptions("qcow2", Format.CreateOptions, kvs)
	if err != nil {
		t.Fatal(err)
	}
	p := &driver.CreateParams{Storage: memfs.New(), Name: "/f.qcow2", Size: size, Options: vals}
	if backed {
		p.ParentRef = &driver.ParentRef{Name: "base.raw", Format: "raw"}
	}
	img, err := create(context.Background(), p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return img.(*image)
}

// fillModel is what a test expects the image to hold: known bytes are the
// image's own (or zeros of a base image); unknown ones are the chain's.
type fillModel struct {
	b     []byte
	known []bool
}

func newFillModel(size int64, backed bool) *fillModel {
	m := &fillModel{b: make([]byte, size), known: make([]bool, size)}
	for i := range m.known {
		m.known[i] = !backed
	}
	return m
}

func (m *fillModel) set(p []byte, off int64) {
	copy(m.b[off:], p)
	for i := range p {
		m.known[off+int64(i)] = true
	}
}

// verify compares the image with the model: runs the image holds (Data,
// Zero) read as the model says; unallocated runs are the model's unknown
// bytes (or zeros of a base image).
func (m *fillModel) verify(t *testing.T, im *image) {
	t.Helper()
	size := im.Size()
	for off := int64(0); off < size; {
		x, err := im.Status(off, size-off)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, x.Length)
		if x.State != driver.Unallocated {
			if _, err := im.ReadAt(got, off); err != nil {
				t.Fatal(err)
			}
		}
		for i := range got {
			v := off + int64(i)
			switch {
			case x.State == driver.Unallocated && m.known[v] && (im.backed() || m.b[v] != 0):
				t.Fatalf("byte %d: unallocated, want %#x", v, m.b[v])
			case x.State != driver.Unallocated && !m.known[v]:
				t.Fatalf("byte %d: %v, want unallocated", v, x.State)
			case x.State != driver.Unallocated && got[i] != m.b[v]:
				t.Fatalf("byte %d: %#x, want %#x", v, got[i], m.b[v])
			}
		}
		off += x.Length
	}
}

// fileBytes is the image file's content with the metadata written back.
func fileBytes(t *testing.T, im *image) []byte {
	t.Helper()
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}
	n, err := im.f.Size()
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, n)
	if err := driver.ReadFullAt(im.f, b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func pattern(n int64, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

// TestNeedFill: a write (or zero write) covering part of an unallocated
// unit of an image with a backing file writes nothing and asks for the
// whole units (driver.FillError); the extended write then succeeds. Units
// the image holds, and images without a backing file, never ask.
func TestNeedFill(t *testing.T) {
	const K = 1024
	type step func(t *testing.T, im *image, m *fillModel)
	write := func(off, n int64, seed byte) step {
		return func(t *testing.T, im *image, m *fillModel) {
			p := pattern(n, seed)
			if _, err := im.WriteAt(p, off); err != nil {
				t.Fatal(err)
			}
			m.set(p, off)
		}
	}
	zero := func(off, n int64) step {
		return func(t *testing.T, im *image, m *fillModel) {
			if err := im.WriteZeroes(off, n, false); err != nil {
				t.Fatal(err)
			}
			m.set(make([]byte, n), off)
		}
	}
	compressed := func(off int64, seed byte) step {
		return func(t *testing.T, im *image, m *fillModel) {
			p := pattern(im.cs, seed)
			if err := im.WriteCompressed(p, off); err != nil {
				t.Fatal(err)
			}
			if err := im.Flush(); err != nil {
				t.Fatal(err)
			}
			if x, err := im.Status(off, im.cs); err != nil || !x.Compressed {
				t.Fatalf("setup: status %+v, %v; want compressed", x, err)
			}
			m.set(p, off)
		}
	}
	snapshot := func(t *testing.T, im *image, m *fillModel) {
		if err := im.CreateSnapshot("s"); err != nil {
			t.Fatal(err)
		}
	}
	cases := []struct {
		name   string
		opts   []string
		size   int64
		backed bool
		setup  []step
		zero   bool // WriteZeroes instead of WriteAt
		off, n int64
		fill   [2]int64 // the FillError's range; zero for none
	}{
		{name: "partial head", backed: true, off: 4 * K, n: 60 * K, fill: [2]int64{0, 64 * K}},
		{name: "partial tail", backed: true, off: 64 * K, n: 4 * K, fill: [2]int64{64 * K, 128 * K}},
		{name: "both ends", backed: true, off: 4 * K, n: 128 * K, fill: [2]int64{0, 192 * K}},
		{name: "inside one cluster", backed: true, off: 4 * K, n: 4 * K, fill: [2]int64{0, 64 * K}},
		{name: "whole clusters", backed: true, off: 64 * K, n: 128 * K},
		{name: "no backing file", off: 4 * K, n: 4 * K},
		{name: "no backing file both ends", off: 4 * K, n: 128 * K},
		{name: "v2 no backing file", opts: []string{"compat=0.10"}, off: 100, n: 1000},
		{name: "v2 backed", opts: []string{"compat=0.10"}, backed: true, off: 100, n: 1000, fill: [2]int64{0, 64 * K}},
		{name: "zero cluster", backed: true, setup: []step{zero(0, 64*K)}, off: 4 * K, n: 4 * K},
		{name: "allocated cluster", backed: true, setup: []step{write(0, 64*K, 0x11)}, off: 4 * K, n: 4 * K},
		{name: "allocated head, unallocated tail", backed: true, setup: []step{write(0, 64*K, 0x11)},
			off: 60 * K, n: 8 * K, fill: [2]int64{60 * K, 128 * K}},
		{name: "compressed cluster", backed: true, setup: []step{compressed(0, 0x22)}, off: 4 * K, n: 4 * K},
		{name: "compressed cluster 4k", opts: []string{"cluster_size=4k"}, backed: true, setup: []step{compressed(4*K, 0x22)}, off: 5 * K, n: 100},
		{name: "shared with a snapshot", backed: true, setup: []step{write(0, 64*K, 0x11), snapshot}, off: 4 * K, n: 4 * K},
		{name: "end of disk covered", backed: true, size: 65 * K, off: 64 * K, n: K},
		{name: "end of disk partial", backed: true, size: 65 * K, off: 64 * K, n: 512, fill: [2]int64{64 * K, 65 * K}},
		{name: "across L2 tables", opts: []string{"cluster_size=512"}, backed: true, off: 100, n: 40000, fill: [2]int64{0, 40448}},
		// Extended L2: 2 KiB subclusters of 64 KiB clusters.
		{name: "extl2 subcluster aligned", opts: []string{"extended_l2=on"}, backed: true, off: 2 * K, n: 4 * K},
		{name: "extl2 partial head", opts: []string{"extended_l2=on"}, backed: true, off: 2*K + 100, n: 4*K - 100, fill: [2]int64{2 * K, 6 * K}},
		{name: "extl2 partial tail", opts: []string{"extended_l2=on"}, backed: true, off: 2 * K, n: 4*K - 100, fill: [2]int64{2 * K, 6 * K}},
		{name: "extl2 inside a subcluster", opts: []string{"extended_l2=on"}, backed: true, off: 100, n: 100, fill: [2]int64{0, 2 * K}},
		{name: "extl2 next to allocated", opts: []string{"extended_l2=on"}, backed: true, setup: []step{write(0, 2*K, 0x11)},
			off: K, n: 2 * K, fill: [2]int64{K, 4 * K}},
		{name: "extl2 zero subcluster", opts: []string{"extended_l2=on"}, backed: true, setup: []step{zero(2*K, 2*K)}, off: 2*K + 100, n: 100},
		{name: "extl2 compressed cluster", opts: []string{"extended_l2=on"}, backed: true, setup: []step{compressed(64*K, 0x33)}, off: 64*K + 100, n: 100},
		{name: "extl2 shared with a snapshot", opts: []string{"extended_l2=on"}, backed: true,
			setup: []step{write(0, 2*K, 0x11), snapshot}, off: 100, n: 100},
		{name: "extl2 shared, unallocated subcluster", opts: []string{"extended_l2=on"}, backed: true,
			setup: []step{write(0, 2*K, 0x11), snapshot}, off: 2*K + 100, n: 100, fill: [2]int64{2 * K, 4 * K}},
		// Zero writes: the partial units are written as bytes.
		{name: "zeroes both ends", zero: true, backed: true, off: 4 * K, n: 128 * K, fill: [2]int64{0, 192 * K}},
		{name: "zeroes whole clusters", zero: true, backed: true, off: 64 * K, n: 128 * K},
		{name: "zeroes no backing file", zero: true, off: 4 * K, n: 4 * K},
		{name: "zeroes allocated cluster", zero: true, backed: true, setup: []step{write(0, 64*K, 0x11)}, off: 4 * K, n: 4 * K},
		{name: "zeroes v2 backed", zero: true, opts: []string{"compat=0.10"}, backed: true, off: 4 * K, n: 4 * K, fill: [2]int64{0, 64 * K}},
		{name: "zeroes v2 backed whole", zero: true, opts: []string{"compat=0.10"}, backed: true, off: 64 * K, n: 64 * K},
		{name: "zeroes extl2", zero: true, opts: []string{"extended_l2=on"}, backed: true, off: 2*K + 100, n: 8 * K, fill: [2]int64{2 * K, 12 * K}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			size := c.size
			if size == 0 {
				size = 1 << 20
			}
			im := newFillImage(t, size, c.backed, c.opts...)
			m := newFillModel(size, c.backed)
			for _, s := range c.setup {
				s(t, im, m)
			}
			before := fileBytes(t, im)
			p := pattern(c.n, 0xa0)
			if c.zero {
				p = make([]byte, c.n)
			}
			var err error
			if c.zero {
				err = im.WriteZeroes(c.off, c.n, false)
			} else {
				_, err = im.WriteAt(p, c.off)
			}
			if c.fill == [2]int64{} {
				if err != nil {
					t.Fatal(err)
				}
				m.set(p, c.off)
				m.verify(t, im)
				return
			}
			fe, ok := driver.AsFill(err)
			if !ok {
				t.Fatalf("got %v, want a fill of [%d, %d)", err, c.fill[0], c.fill[1])
			}
			if got := [2]int64{fe.Off, fe.Off + fe.Len}; got != c.fill {
				t.Fatalf("fill [%d, %d), want [%d, %d)", got[0], got[1], c.fill[0], c.fill[1])
			}
			if after := fileBytes(t, im); !bytes.Equal(before, after) {
				t.Fatal("the image changed before asking for a fill")
			}
			m.verify(t, im)
			// The container's answer: the chain's bytes around the request.
			buf := pattern(fe.Len, 0x40)
			copy(buf[c.off-fe.Off:], p)
			if _, err := im.WriteAt(buf, fe.Off); err != nil {
				t.Fatalf("filled write: %v", err)
			}
			m.set(buf, fe.Off)
			m.verify(t, im)
		})
	}
}

// TestDiscardUnallocates: Discard makes every whole unit inside the range
// unallocated (the chain shows there again) and leaves partial units as
// they are.
func TestDiscardUnallocates(t *testing.T) {
	const K = 1024
	for _, c := range []struct {
		opts []string
		unit int64
	}{
		{nil, 64 * K},
		{[]string{"compat=0.10"}, 64 * K},
		{[]string{"extended_l2=on"}, 2 * K},
	} {
		for _, backed := range []bool{false, true} {
			t.Run(fmt.Sprint(c.opts, backed), func(t *testing.T) {
				im := newFillImage(t, 1<<20, backed, c.opts...)
				m := newFillModel(1<<20, backed)
				p := pattern(256*K, 0x11)
				if _, err := im.WriteAt(p, 0); err != nil {
					t.Fatal(err)
				}
				m.set(p, 0)
				off, n := c.unit/2, 2*c.unit
				if err := im.Discard(off, n); err != nil {
					t.Fatal(err)
				}
				// The one whole unit inside is unallocated.
				x, err := im.Status(c.unit, c.unit)
				if err != nil || x.State != driver.Unallocated || x.Length != c.unit {
					t.Fatalf("discarded unit: %+v, %v", x, err)
				}
				for i := c.unit; i < 2*c.unit; i++ {
					m.b[i], m.known[i] = 0, !backed
				}
				m.verify(t, im)
			})
		}
	}
}

// TestResizeOwnDataOnly: growing zeroes the image's own data left past
// the old end in its last cluster but allocates nothing for the grown
// range (the container zeroes what a larger backing file shows).
func TestResizeOwnDataOnly(t *testing.T) {
	const K = 1024
	ctx := context.Background()
	for _, c := range []struct {
		name   string
		opts   []string
		backed bool
		write  bool
	}{
		{"base", nil, false, true},
		{"backed, allocated", nil, true, true},
		{"backed, unallocated", nil, true, false},
		{"v2 backed, allocated", []string{"compat=0.10"}, true, true},
		{"v2 backed, unallocated", []string{"compat=0.10"}, true, false},
		{"extl2 backed, allocated", []string{"extended_l2=on"}, true, true},
		{"extl2 backed, unallocated", []string{"extended_l2=on"}, true, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			// Data past the old end inside the last cluster: written
			// before a shrink.
			im := newFillImage(t, 128*K, c.backed, c.opts...)
			m := newFillModel(192*K, c.backed)
			if c.write {
				p := pattern(64*K, 0x11)
				if _, err := im.WriteAt(p, 64*K); err != nil {
					t.Fatal(err)
				}
				m.set(p[:K], 64*K)
				m.set(make([]byte, 63*K), 65*K)
			}
			if err := im.Resize(ctx, 65*K, ""); err != nil {
				t.Fatal(err)
			}
			if err := im.Resize(ctx, 192*K, ""); err != nil {
				t.Fatal(err)
			}
			// The grown range holds no data of the image's but what the
			// write left in the old last cluster (now zeros); unallocated
			// units stay so (or become zero units).
			for off := int64(65 * K); off < 192*K; {
				x, err := im.Status(off, 192*K-off)
				if err != nil {
					t.Fatal(err)
				}
				switch {
				case x.State == driver.Data && !(c.write && off+x.Length <= 128*K):
					t.Fatalf("grown range: data at %d (%+v)", off, x)
				case x.State == driver.Zero:
					m.set(make([]byte, x.Length), off)
				}
				off += x.Length
			}
			m.verify(t, im)
		})
	}
}
