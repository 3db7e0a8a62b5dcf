package nbdstore_test

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
)

// TestBlockSizePolicy runs unaligned I/O against an export whose server
// rejects requests that break its advertised block sizes (minimum 4 KiB,
// maximum 64 KiB): reads and writes are widened (read-modify-write) and
// split, zeroing edges are written as data.
func TestBlockSizePolicy(t *testing.T) {
	_, url := nbdkit(t, "--filter=blocksize-policy", "memory", "2M",
		"blocksize-minimum=4096", "blocksize-preferred=4096", "blocksize-maximum=65536", "blocksize-error-policy=error")
	d := openRaw(t, url, false, nil)
	want := make([]byte, 2<<20)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 300 {
		off := rng.Int64N(int64(len(want)) - 1)
		n := 1 + rng.Int64N(min(int64(len(want))-off, 200<<10))
		switch i % 5 {
		case 3:
			if err := d.WriteZeroes(off, n, i%2 == 0); err != nil {
				t.Fatalf("op %d: zero %d+%d: %v", i, off, n, err)
			}
			clear(want[off : off+n])
		default:
			b := pattern(int(n), byte(i))
			if _, err := d.WriteAt(b, off); err != nil {
				t.Fatalf("op %d: write %d+%d: %v", i, off, n, err)
			}
			copy(want[off:], b)
		}
		if i%10 == 0 {
			b := make([]byte, n)
			if _, err := d.ReadAt(b, off); err != nil {
				t.Fatalf("op %d: read %d+%d: %v", i, off, n, err)
			}
			if !bytes.Equal(b, want[off:off+n]) {
				t.Fatalf("op %d: read %d+%d differs", i, off, n)
			}
		}
	}
	if got := readAll(t, d); firstDiff(got, want) >= 0 {
		t.Fatalf("differs at %d", firstDiff(got, want))
	}
}

// TestFileNoZero serves a sparse file with nbdkit's file plugin behind a
// filter that hides WRITE_ZEROES: holes come through as holes, and
// PunchHole falls back to writing zeros (never a TRIM that might not read
// back as zeros).
func TestFileNoZero(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "disk.raw")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(8 << 20)
	f.WriteAt(pattern(1<<20, 9), 2<<20)
	f.Close()
	_, url := nbdkit(t, "--filter=nozero", "file", "file="+p)
	d := openRaw(t, url, false, nil)
	var runs []vdisk.Extent
	d.Map(context.Background(), 0, d.Size(), func(e vdisk.Extent) error {
		runs = append(runs, e)
		return nil
	})
	if len(runs) != 3 || runs[1].Start != 2<<20 || runs[1].Length != 1<<20 {
		t.Fatalf("map of a file with one data MiB: %+v", runs)
	}
	if err := d.Discard(2<<20+512, 4096); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 4096)
	if _, err := d.ReadAt(b, 2<<20+512); err != nil || !bytes.Equal(b, make([]byte, 4096)) {
		t.Fatalf("after discard: %v, zeros %v", err, bytes.Equal(b, make([]byte, 4096)))
	}
	// The file is written by the server.
	d.Flush()
	raw, _ := os.ReadFile(p)
	if !bytes.Equal(raw[2<<20+512:2<<20+4608], make([]byte, 4096)) {
		t.Fatal("the discarded range of the file is not zero")
	}
}

// TestRequestTimeout: a server that answers too slowly is cut by the
// request timeout; the request is retried once and then fails clearly.
func TestRequestTimeout(t *testing.T) {
	_, url := nbdkit(t, "--filter=noextents", "--filter=delay", "memory", "1M", "rdelay=3")
	d := openRaw(t, url, true, &vdisk.OpenOptions{StorageOptions: map[string]string{"request-timeout": "0.3", "reconnect-delay": "1"}})
	start := time.Now()
	_, err := d.ReadAt(make([]byte, 512), 4096)
	el := time.Since(start)
	if err == nil || !strings.Contains(err.Error(), url) {
		t.Fatalf("slow read: %v", err)
	}
	if el > 2500*time.Millisecond {
		t.Fatalf("the timeout took %v", el)
	}
	t.Logf("failed after %v: %v", el, err)
	closeWithin(t, d, 5*time.Second)
}
