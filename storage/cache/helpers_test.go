package cache

import (
	"bytes"
	"io"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/memfs"
)

// counting is a source storage that counts what is read from its files,
// per block, as a slow network storage's server would see it. Its files
// are Versioned when version is set.
type counting struct {
	driver.Storage
	reads, bytes atomic.Int64
	mu           sync.Mutex
	version      string
	perOff       map[int64]int // reads by offset
}

func newCounting(inner driver.Storage) *counting {
	return &counting{Storage: inner, perOff: map[int64]int{}}
}

func (c *counting) Open(name string, flag driver.OpenFlag) (driver.File, error) {
	f, err := c.Storage.Open(name, flag)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	v := c.version
	c.mu.Unlock()
	cf := &countingFile{File: f, c: c}
	if v != "" {
		return versioned{cf, v}, nil
	}
	return cf, nil
}

func (c *counting) reset() {
	c.reads.Store(0)
	c.bytes.Store(0)
	c.mu.Lock()
	c.perOff = map[int64]int{}
	c.mu.Unlock()
}

func (c *counting) maxPerOff() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := 0
	for _, n := range c.perOff {
		m = max(m, n)
	}
	return m
}

type countingFile struct {
	driver.File
	c *counting
}

func (f *countingFile) ReadAt(p []byte, off int64) (int, error) {
	n, err := f.File.ReadAt(p, off)
	f.c.reads.Add(1)
	f.c.bytes.Add(int64(n))
	f.c.mu.Lock()
	f.c.perOff[off]++
	f.c.mu.Unlock()
	return n, err
}

func (f *countingFile) SeekData(off int64) (int64, error) {
	return f.File.(driver.HoleSeeker).SeekData(off)
}

func (f *countingFile) SeekHole(off int64) (int64, error) {
	return f.File.(driver.HoleSeeker).SeekHole(off)
}

type versioned struct {
	*countingFile
	v string
}

func (v versioned) Version() string { return v.v }

// source makes a memfs holding /src of size bytes of seeded random data.
func source(t testing.TB, size int64, seed uint64) (*memfs.FS, []byte) {
	t.Helper()
	fs := memfs.New()
	data := make([]byte, size)
	rng := rand.New(rand.NewPCG(seed, 1))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	if err := fs.WriteFile("/src", data); err != nil {
		t.Fatal(err)
	}
	return fs, data
}

// openCached opens /src of st through a cache in cst.
func openCached(t testing.TB, st driver.Storage, cst driver.Storage, name string, o Options, flag driver.OpenFlag) *File {
	t.Helper()
	src, err := st.Open("/src", flag)
	if err != nil {
		t.Fatal(err)
	}
	f, err := Wrap(src, cst, name, o)
	if err != nil {
		t.Fatal(err)
	}
	cf, ok := As(f)
	if !ok {
		t.Fatalf("As(%T) failed", f)
	}
	return cf
}

// readAll reads f in chunks of n bytes (in a random order when rng is
// set) and compares with want.
func readAll(t testing.TB, f driver.File, want []byte, n int64, rng *rand.Rand) {
	t.Helper()
	size := int64(len(want))
	offs := []int64{}
	for off := int64(0); off < size; off += n {
		offs = append(offs, off)
	}
	if rng != nil {
		rng.Shuffle(len(offs), func(i, j int) { offs[i], offs[j] = offs[j], offs[i] })
	}
	buf := make([]byte, n)
	for _, off := range offs {
		m := min(n, size-off)
		got, err := f.ReadAt(buf[:m], off)
		if err != nil && !(err == io.EOF && int64(got) == m) {
			t.Fatalf("read %d+%d: %v", off, m, err)
		}
		if !bytes.Equal(buf[:m], want[off:off+m]) {
			t.Fatalf("read %d+%d: wrong data", off, m)
		}
	}
}

func mustClose(t testing.TB, f driver.File) {
	t.Helper()
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// small is a cache configuration that fits the tests: 64 KiB blocks.
var small = Options{Size: 8 << 20, BlockSize: 64 << 10}

// cowStorage holds one file, "/c.vci", whose content starts as base
// (shared, never written) with writes kept per 64 KiB chunk: thousands of
// mutated copies of a large cache file cost only their metadata.
type cowStorage struct {
	memfs.FS
	f *cowFile
}

func newCow(base []byte) *cowStorage {
	return &cowStorage{f: &cowFile{base: base, limit: int64(len(base)), size: int64(len(base)), chunks: map[int64][]byte{}}}
}

func (s *cowStorage) Open(name string, flag driver.OpenFlag) (driver.File, error) { return s.f, nil }

const cowChunk = 64 << 10

type cowFile struct {
	mu     sync.Mutex
	base   []byte
	limit  int64 // base bytes past limit read as zeros (after a truncate)
	size   int64
	chunks map[int64][]byte
}

func (f *cowFile) Name() string { return "/c.vci" }

func (f *cowFile) chunkLocked(c int64, write bool) []byte {
	if b, ok := f.chunks[c]; ok {
		return b
	}
	b := make([]byte, cowChunk)
	lo := c * cowChunk
	if lo < f.limit {
		copy(b, f.base[lo:min(lo+cowChunk, f.limit)])
	}
	if write {
		f.chunks[c] = b
	}
	return b
}

func (f *cowFile) ReadAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if off >= f.size {
		return 0, io.EOF
	}
	n := min(int64(len(p)), f.size-off)
	for i := int64(0); i < n; {
		c := (off + i) / cowChunk
		in := (off + i) % cowChunk
		m := copy(p[i:n], f.chunkLocked(c, false)[in:])
		i += int64(m)
	}
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

func (f *cowFile) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i := 0; i < len(p); {
		c := (off + int64(i)) / cowChunk
		in := (off + int64(i)) % cowChunk
		i += copy(f.chunkLocked(c, true)[in:], p[i:])
	}
	f.size = max(f.size, off+int64(len(p)))
	return len(p), nil
}

func (f *cowFile) Size() (int64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.size, nil
}

func (f *cowFile) Truncate(size int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if size < f.size {
		// Zero what is cut off, so a later growth reads zeros.
		f.limit = min(f.limit, size)
		for c, b := range f.chunks {
			lo := c * cowChunk
			if lo >= size {
				delete(f.chunks, c)
			} else if lo+cowChunk > size {
				clear(b[size-lo:])
			}
		}
	}
	f.size = size
	return nil
}

func (f *cowFile) Sync() error                  { return nil }
func (f *cowFile) PunchHole(off, n int64) error { return driver.ErrUnsupported }
func (f *cowFile) Close() error                 { return nil }
