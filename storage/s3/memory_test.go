package s3

import (
	"bytes"
	"encoding/binary"
	"os"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/vdisk/vdisk/driver"
)

// TestUploadMemoryBound streams a 1 GiB object (4 GiB with VDISK_LONG=1)
// through the writer with the default settings and samples the heap: it
// stays within the part buffers plus slack.
func TestUploadMemoryBound(t *testing.T) {
	s := startServer(t)
	size := int64(1 << 30)
	if os.Getenv("VDISK_LONG") != "" {
		size = 4 << 30
	}
	st := s.storage()
	f, err := st.Open("m/big.raw", driver.ReadWrite|driver.Create)
	if err != nil {
		t.Fatal(err)
	}
	runtime.GC()
	var base runtime.MemStats
	runtime.ReadMemStats(&base)
	var peak uint64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		var ms runtime.MemStats
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			runtime.ReadMemStats(&ms)
			peak = max(peak, ms.HeapInuse)
		}
	}()
	start := time.Now()
	chunk := randBytes(9, 1<<20)
	for off := int64(0); off < size; off += int64(len(chunk)) {
		// Random bytes with each 4 KiB block stamped with its offset.
		for i := 0; i < len(chunk); i += 4096 {
			binary.LittleEndian.PutUint64(chunk[i:], uint64(off+int64(i)))
		}
		if _, err := f.WriteAt(chunk, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	close(stop)
	wg.Wait()
	elapsed := time.Since(start)
	fi, err := st.Stat("m/big.raw")
	if err != nil || fi.Size != size {
		t.Fatalf("stat: %+v %v", fi, err)
	}
	// Spot-check content through a reader.
	r, err := st.Open("m/big.raw", driver.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	buf := make([]byte, 16)
	for _, off := range []int64{0, 8 << 20, size/2 + 4096, size - 4096} {
		if _, err := r.ReadAt(buf, off); err != nil {
			t.Fatal(err)
		}
		if v := binary.LittleEndian.Uint64(buf); v != uint64(off) || !bytes.Equal(buf[8:], chunk[off%(1<<20)+8:off%(1<<20)+16]) {
			t.Fatalf("content at %d", off)
		}
	}
	bufs := uint64(st.cfg.memParts+uploadsInFlight) * uint64(st.cfg.partSize)
	growth := int64(peak) - int64(base.HeapInuse)
	t.Logf("%d MiB uploaded in %v (%.0f MiB/s); heap in use: base %d MiB, peak %d MiB (growth %d MiB; part buffers %d MiB)",
		size>>20, elapsed.Round(time.Millisecond), float64(size>>20)/elapsed.Seconds(), base.HeapInuse>>20, peak>>20, growth>>20, bufs>>20)
	if growth > int64(bufs)+32<<20 {
		t.Fatalf("heap grew %d MiB while uploading (bound %d MiB)", growth>>20, (bufs+32<<20)>>20)
	}
	if u := s.uploads(); len(u) != 0 {
		t.Fatalf("uploads left: %v", u)
	}
}
