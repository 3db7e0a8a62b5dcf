package disktest

import (
	"bytes"
	"context"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/osfs"
)

// SeekCounter is osfs with every SEEK_DATA/SEEK_HOLE counted.
type SeekCounter struct {
	driver.Storage
	Seeks atomic.Int64
}

type countedFile struct {
	driver.File
	s *SeekCounter
}

func (s *SeekCounter) Open(name string, flag driver.OpenFlag) (driver.File, error) {
	f, err := s.Storage.Open(name, flag)
	if err != nil {
		return nil, err
	}
	return &countedFile{File: f, s: s}, nil
}

func (f *countedFile) SeekData(off int64) (int64, error) {
	f.s.Seeks.Add(1)
	return f.File.(driver.HoleSeeker).SeekData(off)
}

func (f *countedFile) SeekHole(off int64) (int64, error) {
	f.s.Seeks.Add(1)
	return f.File.(driver.HoleSeeker).SeekHole(off)
}

func (f *countedFile) ZeroRange(off, n int64) error {
	return f.File.(driver.ZeroRanger).ZeroRange(off, n)
}

// WantStatus fails the test unless the 4 KiB at off have state want.
func WantStatus(t testing.TB, d *vdisk.Disk, off int64, want driver.State) {
	t.Helper()
	e, err := d.Status(off, 4096)
	if err != nil {
		t.Fatal(err)
	}
	if e.State != want {
		t.Fatalf("status at %d: %v, want %v", off, e.State, want)
	}
}

// StatusCache checks a format whose data lies in its file as a raw file's
// does (raw, fixed VHD: holes read zeros) and whose driver caches what
// SEEK_DATA/SEEK_HOLE said: on a 64 MiB image (opts: -o options that keep
// the size exact) a status walk costs at most one lseek per run boundary,
// the 4 KiB reads after it (the NBD server's hot path: every Disk read
// asks Status) none, and the image's own writes, discards, zeroes and
// resizes are seen at once.
func StatusCache(t *testing.T, format string, opts ...string) {
	ctx := context.Background()
	st := &SeekCounter{Storage: osfs.New()}
	name := filepath.Join(t.TempDir(), "a."+format)
	d, err := vdisk.Create(ctx, name, &vdisk.CreateOptions{Format: format, Size: 64 << 20, Storage: st, Options: KVs(opts...)})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.Size() != 64<<20 {
		t.Fatalf("size %d, want 64 MiB", d.Size())
	}
	// 16 data runs of 1 MiB, every other MiB from 0.
	buf := bytes.Repeat([]byte{0x5a}, 1<<20)
	for i := int64(0); i < 32; i += 2 {
		if _, err := d.WriteAt(buf, i<<20); err != nil {
			t.Fatal(err)
		}
	}
	st.Seeks.Store(0)
	runs := 0
	if err := d.Map(ctx, 0, d.Size(), func(vdisk.Extent) error { runs++; return nil }); err != nil {
		t.Fatal(err)
	}
	walk := st.Seeks.Load()
	if runs != 32 || walk > int64(runs)+1 {
		t.Fatalf("walk of %d runs cost %d lseeks (want 32 runs, at most one lseek per run boundary)", runs, walk)
	}
	p := make([]byte, 4096)
	for i := range 4096 {
		off := int64(i%8192) * 4096
		if _, err := d.ReadAt(p, off); err != nil {
			t.Fatal(err)
		}
	}
	if got := st.Seeks.Load() - walk; got != 0 {
		t.Fatalf("4096 reads of 4 KiB after the walk cost %d lseeks, want 0", got)
	}
	// Writes inside a known data run keep the cache; a write into a hole
	// and a discard are seen at once.
	if _, err := d.WriteAt(p[:512], 4096); err != nil {
		t.Fatal(err)
	}
	if _, err := d.ReadAt(p, 0); err != nil || st.Seeks.Load() != walk {
		t.Fatalf("a write inside a data run cost lseeks (%d) or failed: %v", st.Seeks.Load()-walk, err)
	}
	WantStatus(t, d, 40<<20, driver.Zero)
	if _, err := d.WriteAt(buf[:4096], 40<<20); err != nil {
		t.Fatal(err)
	}
	WantStatus(t, d, 40<<20, driver.Data)
	if err := d.Discard(3<<20-4096, 2<<20+8192); err != nil {
		t.Fatal(err)
	}
	WantStatus(t, d, 3<<20-4096, driver.Zero)
	WantStatus(t, d, 4<<20, driver.Zero)
	WantStatus(t, d, 4<<20+1<<20, driver.Zero)
	WantStatus(t, d, 3<<20-8192, driver.Data)
	if err := d.WriteZeroes(6<<20, 1<<20, true); err != nil {
		t.Fatal(err)
	}
	WantStatus(t, d, 6<<20, driver.Zero)
	// Shrinking and growing again: the tail is a hole.
	if err := d.Resize(ctx, 8<<20, ""); err != nil {
		t.Fatal(err)
	}
	if err := d.Resize(ctx, 64<<20, ""); err != nil {
		t.Fatal(err)
	}
	WantStatus(t, d, 10<<20, driver.Zero)
	WantStatus(t, d, 0, driver.Data)
}
