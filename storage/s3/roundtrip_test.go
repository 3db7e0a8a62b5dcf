package s3

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	_ "github.com/vdisk/vdisk/format/all"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// makeSource writes a local raw image of size bytes: random data in some
// 1 MiB blocks, zero-filled data in others, holes elsewhere.
func makeSource(t testing.TB, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "src.raw")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for i, off := 0, int64(0); off < size; i, off = i+1, off+1<<20 {
		var b []byte
		switch i % 5 {
		case 0, 3:
			b = randBytes(uint64(i), 1<<20)
		case 1:
			b = make([]byte, 1<<20) // zeros written as data
		case 2:
			// compressible: a repeated pattern with a random head
			b = []byte(strings.Repeat("vdisk-s3 ", 1<<20/9+1))[:1<<20]
			copy(b, randBytes(uint64(i), 4096))
		}
		if b != nil {
			if _, err := f.WriteAt(b[:min(int64(len(b)), size-off)], off); err != nil {
				t.Fatal(err)
			}
		}
	}
	return p
}

// convertTo converts the local raw src to name (s3://...) as `vdisk
// convert -O format [-c]` does.
func convertTo(t testing.TB, s *server, src, name, format string, opts []driver.KV, compress bool, extra ...string) error {
	t.Helper()
	ctx := context.Background()
	sd, err := vdisk.Open(ctx, src, &vdisk.OpenOptions{Format: "raw", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer sd.Close()
	d, err := vdisk.Create(ctx, name, &vdisk.CreateOptions{Format: format, Size: sd.Size(), Options: opts, Overwrite: true, Dialer: s.dial.Dial, StorageOptions: s.opts(extra...)})
	if err != nil {
		return err
	}
	if err := vdisk.Convert(ctx, d, sd, &vdisk.ConvertOptions{Compress: compress}); err != nil {
		d.CloseUnsynced()
		return err
	}
	return d.CloseUnsynced()
}

// TestRoundTrip creates every streamable format on S3 with vdisk.Convert,
// reads it back through vdisk from S3, and checks a downloaded copy with
// qemu-img check and compare.
func TestRoundTrip(t *testing.T) {
	t.Parallel()
	qemutest.Require(t, "qemu-img")
	s := startServer(t)
	const size = 20<<20 + 512*3
	src := makeSource(t, size)
	for _, c := range []struct {
		name, format string
		opts         []driver.KV
		compress     bool
		check        bool
	}{
		{"raw", "raw", nil, false, false},
		{"qcow2c", "qcow2", nil, true, true},
		{"qcow2", "qcow2", nil, false, true},
		{"vmdk", "vmdk", []driver.KV{{Key: "subformat", Value: "streamOptimized"}}, false, true},
		{"vhdfixed", "vpc", []driver.KV{{Key: "subformat", Value: "fixed"}}, false, false},
		{"dmg", "dmg", nil, false, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			key := "rt/" + c.name + ".img"
			// Small parts and little memory: parts are uploaded, spilled
			// and held while the writers run.
			start := time.Now()
			if err := convertTo(t, s, src, s3url(key), c.format, c.opts, c.compress, "part-size", "5M", "mem-parts", "2"); err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: converted in %v, object %d bytes", c.name, time.Since(start).Round(time.Millisecond), len(s.get(key)))
			if u := s.uploads(); len(u) != 0 {
				t.Fatalf("uploads left: %v", u)
			}
			local := s.download(key)
			if c.check {
				if r := qemutest.Check(t, c.format, local); r.Corruptions != 0 || r.Leaks != 0 {
					t.Fatalf("qemu-img check: %+v", r)
				}
			}
			if !qemutest.Compare(t, "raw", src, c.format, local) {
				t.Fatal("qemu-img compare: the copy on S3 differs from the source")
			}
			// Read back through vdisk straight from S3.
			ctx := context.Background()
			d, err := vdisk.Open(ctx, s3url(key), &vdisk.OpenOptions{Format: c.format, ReadOnly: true, Dialer: s.dial.Dial, StorageOptions: s.opts()})
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			sd, err := vdisk.Open(ctx, src, &vdisk.OpenOptions{Format: "raw", ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer sd.Close()
			res, err := vdisk.Compare(ctx, sd, d, nil)
			if err != nil || !res.Identical {
				t.Fatalf("vdisk compare from S3: %+v %v", res, err)
			}
		})
	}
}

// TestConvertOverExisting: an image created over an existing object
// replaces it whole (objects cannot be changed in place), for raw, whose
// creator reuses an existing file, and qcow2, which cuts it to its tables;
// an upload cut midway leaves the old object as it was.
func TestConvertOverExisting(t *testing.T) {
	t.Parallel()
	qemutest.Require(t, "qemu-img")
	s := startServer(t)
	src := makeSource(t, 12<<20)
	old := randBytes(99, 20<<20+512)
	for _, format := range []string{"raw", "qcow2"} {
		key := "over/" + format
		s.put(key, old)
		if err := convertTo(t, s, src, s3url(key), format, nil, false); err != nil {
			t.Fatalf("%s over an existing object: %v", format, err)
		}
		if u := s.uploads(); len(u) != 0 {
			t.Fatalf("uploads left: %v", u)
		}
		local := s.download(key)
		if format == "qcow2" {
			if r := qemutest.Check(t, format, local); r.Corruptions != 0 || r.Leaks != 0 {
				t.Fatalf("qemu-img check: %+v", r)
			}
		}
		if !qemutest.Compare(t, "raw", src, format, local) {
			t.Fatalf("%s: the replaced object differs from the source", format)
		}

		// A cut upload over it: the object stays what it was.
		before := s.get(key)
		s.dial.partPuts.Store(0)
		s.dial.failPartsAfter.Store(1)
		err := convertTo(t, s, makeSource(t, 30<<20), s3url(key), format, nil, false, "part-size", "5M", "mem-parts", "1", "retries", "1")
		s.dial.failPartsAfter.Store(0)
		if err == nil {
			t.Fatalf("%s: the cut upload succeeded", format)
		}
		if got := s.get(key); !bytes.Equal(got, before) {
			t.Fatalf("%s: a failed upload changed the existing object (%d bytes, was %d)", format, len(got), len(before))
		}
		if u := s.uploads(); len(u) != 0 {
			t.Fatalf("%s: orphaned uploads: %v", format, u)
		}
	}
}
