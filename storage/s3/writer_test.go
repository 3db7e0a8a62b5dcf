package s3

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"strings"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// writeModel mirrors writes into a byte slice.
type writeModel struct{ b []byte }

func (m *writeModel) write(p []byte, off int64) {
	if end := off + int64(len(p)); end > int64(len(m.b)) {
		m.b = append(m.b, make([]byte, end-int64(len(m.b)))...)
	}
	copy(m.b[off:], p)
}

func (m *writeModel) truncate(n int64) {
	if n < int64(len(m.b)) {
		m.b = m.b[:n]
	} else {
		m.b = append(m.b, make([]byte, n-int64(len(m.b)))...)
	}
}

// TestWritePatterns drives the writer with the patterns image writers use
// (5 MiB parts, two held in memory, so every path is taken) and checks
// the object, the read-back while writing, and that no upload is left.
func TestWritePatterns(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	const mib = 1 << 20
	type op struct {
		off, n int64 // n < 0: truncate to off
	}
	seqSmall := func(total, step int64) []op {
		var ops []op
		for o := int64(0); o < total; o += step {
			ops = append(ops, op{o, min(step, total-o)})
		}
		return ops
	}
	cases := map[string][]op{
		"empty":  nil,
		"small":  {{0, 4096}, {100, 10}},
		"stream": append(append([]op{{0, 512}}, seqSmall(16*mib, 64<<10)...), op{0, 512}),
		// qcow2 -c: header and tables, data streams past reserved L2
		// tables, which (and the header) are written at close.
		"qcow2": append(append([]op{{0, 196616}}, func() []op {
			var ops []op
			for o := int64(327680); o < 17*mib; o += 7001 {
				if o/(8*mib) != (o+7001)/(8*mib) {
					o += 65536 // a reserved table
				}
				ops = append(ops, op{o, 7001})
			}
			return ops
		}()...), op{131072, 65536}, op{8*mib + 1000, 65536}, op{16*mib + 3000, 65536}, op{196608, 8}),
		// vhd fixed: truncate, footer first, then sparse data out of order.
		"vhd": {{21*mib + 512, -1}, {21 * mib, 512}, {2 * mib, mib}, {mib, mib}, {17 * mib, 3 * mib}, {0, mib}, {12 * mib, 4 * mib}},
		// raw with holes, parallel workers out of order.
		"raw": {{26 * mib, -1}, {4 * mib, 2 * mib}, {0, 2 * mib}, {8 * mib, 2 * mib}, {6 * mib, 2 * mib}, {20 * mib, 2 * mib}, {25 * mib, mib}},
		// dmg: everything at close, then truncate to the end.
		"dmg": append(append([]op{{0, -1}}, seqSmall(11*mib+77, 4442)...), op{11*mib + 77, -1}),
		// shrink then grow.
		"shrink": {{0, 7 * mib}, {3 * mib, -1}, {6 * mib, -1}, {5 * mib, 10}},
	}
	for name, ops := range cases {
		t.Run(name, func(t *testing.T) {
			st := s.storage("part-size", "5M", "mem-parts", "2")
			key := "w/" + name
			f, err := st.Open(key, driver.ReadWrite|driver.Create|driver.Truncate)
			if err != nil {
				t.Fatal(err)
			}
			var m writeModel
			r := rand.New(rand.NewPCG(7, uint64(len(ops))))
			for i, o := range ops {
				if o.n < 0 {
					if err := f.Truncate(o.off); err != nil {
						t.Fatalf("op %d truncate %d: %v", i, o.off, err)
					}
					m.truncate(o.off)
					continue
				}
				p := randBytes(r.Uint64(), int(o.n))
				p[0] |= 1 // never all zeros
				if _, err := f.WriteAt(p, o.off); err != nil {
					t.Fatalf("op %d write %d+%d: %v", i, o.off, o.n, err)
				}
				m.write(p, o.off)
				// Formats read back their header.
				if o.off < 5<<20 {
					got := make([]byte, min(o.n, 4096))
					if _, err := f.ReadAt(got, o.off); err != nil || !bytes.Equal(got, p[:len(got)]) {
						t.Fatalf("op %d read back at %d: %v", i, o.off, err)
					}
				}
			}
			if n, _ := f.Size(); n != int64(len(m.b)) {
				t.Fatalf("size %d, want %d", n, len(m.b))
			}
			w := f.(*writeFile)
			w.mu.Lock()
			spill := ""
			if w.tmp != nil {
				spill = w.tmp.Name()
			}
			w.mu.Unlock()
			if err := f.Close(); err != nil {
				t.Fatal(err)
			}
			if spill != "" {
				if _, err := os.Stat(spill); err == nil {
					t.Fatalf("spill file %s left", spill)
				}
			}
			if got := s.get(key); !bytes.Equal(got, m.b) {
				t.Fatalf("object differs (len %d, want %d)", len(got), len(m.b))
			}
			if u := s.uploads(); len(u) != 0 {
				t.Fatalf("uploads left: %v", u)
			}
		})
	}
}

// TestRewriteUploadedRefused: a write into a part already uploaded fails
// clearly, and the upload is then aborted on Close.
func TestRewriteUploadedRefused(t *testing.T) {
	s := startServer(t)
	st := s.storage("part-size", "5M", "mem-parts", "2")
	f, err := st.Open("w/rewrite", driver.ReadWrite|driver.Create)
	if err != nil {
		t.Fatal(err)
	}
	buf := randBytes(3, 1<<20)
	for o := int64(0); o < 20<<20; o += 1 << 20 {
		if _, err := f.WriteAt(buf, o); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.WriteAt(buf[:10], 6<<20); !errors.Is(err, driver.ErrUnsupported) || !strings.Contains(err.Error(), "spill=all") {
		t.Fatalf("rewrite of an uploaded part: %v", err)
	}
	if _, err := f.ReadAt(buf[:10], 6<<20); !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("read of an uploaded part: %v", err)
	}
	// The caller gives up: Remove aborts the upload.
	if err := st.Remove("w/rewrite"); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if s.exists("w/rewrite") || len(s.uploads()) != 0 {
		t.Fatalf("object or upload left: %v", s.uploads())
	}
}

// TestSpillAll: with spill=all any write pattern lands, random rewrites of
// early bytes included (formats written at random, e.g. vdi), and a vdi
// created on S3 by Convert passes qemu-img check and compare.
func TestSpillAll(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	st := s.storage("part-size", "5M", "mem-parts", "2", "spill", "all")
	f, err := st.Open("w/random", driver.ReadWrite|driver.Create)
	if err != nil {
		t.Fatal(err)
	}
	var m writeModel
	r := rand.New(rand.NewPCG(9, 9))
	for i := 0; i < 200; i++ {
		off := r.Int64N(24 << 20)
		p := randBytes(uint64(i), 1+r.IntN(256<<10))
		if _, err := f.WriteAt(p, off); err != nil {
			t.Fatalf("write %d at %d: %v", len(p), off, err)
		}
		m.write(p, off)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(s.get("w/random"), m.b) {
		t.Fatal("object differs")
	}

	qemutest.Require(t, "qemu-img")
	src := makeSource(t, 12<<20)
	if err := convertTo(t, s, src, s3url("w/x.vdi"), "vdi", nil, false, "part-size", "5M", "mem-parts", "2", "spill", "all"); err != nil {
		t.Fatal(err)
	}
	local := s.download("w/x.vdi")
	if r := qemutest.Check(t, "vdi", local); r.Corruptions != 0 || r.Leaks != 0 {
		t.Fatalf("qemu-img check: %+v", r)
	}
	if !qemutest.Compare(t, "raw", src, "vdi", local) {
		t.Fatal("qemu-img compare: differs")
	}
	if u := s.uploads(); len(u) != 0 {
		t.Fatalf("uploads left: %v", u)
	}
}

// TestPartGeometry: part offsets, sizes and lookups agree across the size
// classes, and the last part fits S3's limit.
func TestPartGeometry(t *testing.T) {
	w := &writeFile{ps: 5 << 20}
	prevEnd := int64(0)
	for idx := int64(0); idx < maxParts; idx++ {
		start, n := w.partStart(idx), w.partLen(idx)
		if start != prevEnd || n < minPartSize {
			t.Fatalf("part %d: start %d (want %d), len %d", idx, start, prevEnd, n)
		}
		for _, off := range []int64{start, start + n/2, start + n - 1} {
			if got := w.partIndex(off); got != idx {
				t.Fatalf("partIndex(%d) = %d, want %d", off, got, idx)
			}
		}
		prevEnd = start + n
	}
	if prevEnd < 4<<40 {
		t.Fatalf("10000 parts of 5 MiB and up hold only %d bytes", prevEnd)
	}
	w = &writeFile{ps: 8 << 20, fixed: true}
	if w.partIndex(3*(8<<20)+1) != 3 || w.partStart(3) != 3*(8<<20) || w.partLen(9999) != 8<<20 {
		t.Fatal("fixed geometry")
	}
}
