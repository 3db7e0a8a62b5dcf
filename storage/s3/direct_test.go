package s3

import (
	"bytes"
	"sync"
	"testing"

	"github.com/vdisk/vdisk/driver"
)

// TestWholeBlockReads: reads covering whole blocks go straight into the
// caller's buffer, one GET per run of blocks (up to maxDirect); with
// read-ahead on, parallel readers (convert's workers) still fetch every
// byte once.
func TestWholeBlockReads(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	const size = 16 << 20
	data := randBytes(31, size)
	s.put("d/w.raw", data)
	for _, c := range []struct {
		name     string
		n        int64 // read size
		readers  int
		wantGets int64
	}{
		{"8 readers of 2M", 2 << 20, 8, 8},
		{"2 readers of 8M", 8 << 20, 2, 4}, // maxDirect: two GETs a read
		{"2 readers of 1M", 1 << 20, 2, 16},
		{"1 reader of 16M", 16 << 20, 1, 4},
	} {
		for _, ra := range []string{"0", "4"} {
			t.Run(c.name+" read-ahead "+ra, func(t *testing.T) {
				st := s.storage("block-size", "1M", "read-ahead", ra)
				f, err := st.Open("d/w.raw", driver.ReadOnly)
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				s.dial.reset()
				next := make(chan int64)
				var wg sync.WaitGroup
				for range c.readers {
					wg.Go(func() {
						buf := make([]byte, c.n)
						for off := range next {
							if _, err := f.ReadAt(buf, off); err != nil {
								t.Error(err)
							} else if !bytes.Equal(buf, data[off:off+c.n]) {
								t.Errorf("read at %d: wrong content", off)
							}
						}
					})
				}
				for off := int64(0); off < size; off += c.n {
					next <- off
				}
				close(next)
				wg.Wait()
				f.Close() // waits for read-ahead
				gets, in := s.dial.gets.Load(), s.dial.bytesIn.Load()
				t.Logf("%d GETs, %d bytes in", gets, in)
				if in < size || in > size+gets*4096 {
					t.Fatalf("%d bytes fetched for %d", in, size)
				}
				if ra == "0" && gets != c.wantGets {
					t.Fatalf("%d GETs, want %d", gets, c.wantGets)
				}
			})
		}
	}
}
