package driver

import (
	"context"
	"errors"
	"testing"
)

// pieces records the writes it gets.
type pieces struct {
	data []byte
	lens []int
}

func (w *pieces) WriteAt(p []byte, off int64) (int, error) {
	if end := off + int64(len(p)); end > int64(len(w.data)) {
		w.data = append(w.data, make([]byte, end-int64(len(w.data)))...)
	}
	copy(w.data[off:], p)
	w.lens = append(w.lens, len(p))
	return len(p), nil
}

func TestWriteZeros(t *testing.T) {
	w := &pieces{data: make([]byte, 3*ZeroChunk)}
	for i := range w.data {
		w.data[i] = 0xAA
	}
	off, n := int64(100), int64(2*ZeroChunk+5)
	if err := WriteZeros(w, off, n); err != nil {
		t.Fatal(err)
	}
	if len(w.lens) != 3 || w.lens[0] != ZeroChunk || w.lens[2] != 5 {
		t.Fatalf("pieces %v", w.lens)
	}
	if !IsZero(w.data[off:off+n]) || w.data[off-1] != 0xAA || w.data[off+n] != 0xAA {
		t.Fatal("wrong bytes zeroed")
	}
	if !IsZero(zeroBuf) {
		t.Fatal("the shared zero buffer was written")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := WriteZerosContext(ctx, w, 0, 1); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: %v", err)
	}
	if err := WriteZeros(w, 0, 0); err != nil || len(w.lens) != 3 {
		t.Fatalf("empty write: %v, %d pieces", err, len(w.lens))
	}
	if len(Zeros(10)) != 10 || &Zeros(10)[0] != &zeroBuf[0] || len(Zeros(ZeroChunk+1)) != ZeroChunk+1 {
		t.Fatal("Zeros")
	}
}

func TestCheckExtent(t *testing.T) {
	for _, c := range []struct {
		e  Extent
		ok bool
	}{
		{Extent{State: Data, Length: 512}, true},
		{Extent{State: Zero, Length: 1024}, true},
		{Extent{State: Unallocated, Length: 0}, false},
		{Extent{State: Data, Length: 1025}, false},
		{Extent{State: Zero + 1, Length: 512}, false},
	} {
		err := CheckExtent("fmt", "img", 0, 1024, c.e)
		if (err == nil) != c.ok || (err != nil && !errors.Is(err, ErrCorrupt)) {
			t.Errorf("%+v: %v", c.e, err)
		}
	}
}
