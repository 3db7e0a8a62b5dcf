package disktest

import (
	"context"
	"runtime"
	"runtime/metrics"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/memfs"
)

// heapMetric counts heap memory held by objects, live or not yet swept:
// a large allocation stays in it until a collection frees it, so sampling
// sees even short-lived ones.
const heapMetric = "/memory/classes/heap/objects:bytes"

func heapBytes() uint64 {
	s := []metrics.Sample{{Name: heapMetric}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindUint64 {
		return 0
	}
	return s[0].Value.Uint64()
}

// HeapBound runs fn and fails the test when the heap grew by more than
// limit bytes above what it held before at any moment while fn ran
// (sampled every 200µs). It is how a test proves that a hostile header
// claiming huge tables costs bounded memory. It returns the peak growth.
func HeapBound(t testing.TB, what string, limit uint64, fn func()) uint64 {
	t.Helper()
	runtime.GC()
	base := heapBytes()
	var peak atomic.Uint64
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		tick := time.NewTicker(200 * time.Microsecond)
		defer tick.Stop()
		for {
			if h := heapBytes(); h > base && h-base > peak.Load() {
				peak.Store(h - base)
			}
			select {
			case <-done:
				return
			case <-tick.C:
			}
		}
	}()
	fn()
	if h := heapBytes(); h > base && h-base > peak.Load() {
		peak.Store(h - base)
	}
	close(done)
	<-stopped
	if p := peak.Load(); p > limit {
		t.Fatalf("%s: the heap grew by %d MiB (bound %d MiB)", what, p>>20, limit>>20)
	}
	return peak.Load()
}

// Field is one header field a hostile image smashes: Size bytes (4 or 8)
// at Off, little- or big-endian, set to Value.
type Field struct {
	Off       int
	Size      int
	BigEndian bool
	Value     uint64
}

// Hostile is one hostile image: good with Fields smashed, then Fix (if
// set) applied, e.g. to make the header's checksum right again so the
// smashed fields are believed.
type Hostile struct {
	Name   string
	Fields []Field
	Fix    func([]byte)
}

// HostileMemory smashes each field of good (an image of format qemu made)
// in turn and proves that opening the result read-only, walking and
// reading it, checking it, and opening it read-write and repairing it stay
// within limit bytes of heap (or fail with a clear error). The heap growth
// each case took is logged.
func HostileMemory(t *testing.T, format string, good []byte, cases []Hostile, limit uint64) {
	t.Helper()
	f, err := driver.Lookup(format)
	if err != nil {
		t.Fatal(err)
	}
	// The unharmed image must open, or the cases prove nothing.
	{
		st := memfs.New()
		if err := st.WriteFile("/g."+format, good); err != nil {
			t.Fatal(err)
		}
		img, err := f.Open(context.Background(), &driver.OpenParams{Storage: st, Name: "/g." + format, ReadOnly: true, Options: driver.Values{}})
		if err != nil {
			t.Fatalf("the unharmed image does not open: %v", err)
		}
		img.Close()
	}
	for _, c := range cases {
		t.Run(c.Name, func(t *testing.T) {
			b := append([]byte(nil), good...)
			for _, fl := range c.Fields {
				if fl.Off+fl.Size > len(b) {
					t.Fatalf("field at %d is past the %d-byte image", fl.Off, len(b))
				}
				put(b[fl.Off:fl.Off+fl.Size], fl.Value, fl.BigEndian)
			}
			if c.Fix != nil {
				c.Fix(b)
			}
			opened := false
			peak := HeapBound(t, c.Name, limit, func() {
				st := memfs.New()
				if err := st.WriteFile("/h."+format, b); err != nil {
					t.Fatal(err)
				}
				for _, ro := range []bool{true, false} {
					img, err := f.Open(context.Background(), &driver.OpenParams{Storage: st, Name: "/h." + format, ReadOnly: ro, Options: driver.Values{}})
					if err != nil {
						if ro {
							t.Logf("%s: %v", c.Name, err)
						}
						continue
					}
					opened = true
					Walk(t, format, img, 16<<20)
					if c, ok := img.(driver.Checker); ok {
						mode := driver.RepairNone
						if !ro {
							mode = driver.RepairAll
						}
						c.Check(context.Background(), mode)
					}
					img.Close()
				}
			})
			t.Logf("%s: opened %v, heap grew by %d KiB at most", c.Name, opened, peak>>10)
		})
	}
}

func put(b []byte, v uint64, be bool) {
	for i := range b {
		sh := 8 * i
		if be {
			sh = 8 * (len(b) - 1 - i)
		}
		b[i] = byte(v >> sh)
	}
}
