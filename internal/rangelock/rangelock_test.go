package rangelock

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestReadersShare(t *testing.T) {
	var l Locker
	a := l.Lock(0, 100, false)
	done := make(chan struct{})
	go func() { b := l.Lock(50, 100, false); l.Unlock(b); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("overlapping readers blocked each other")
	}
	l.Unlock(a)
}

func TestWriterExcludes(t *testing.T) {
	cases := []struct {
		name           string
		aOff, aN       int64
		aW             bool
		bOff, bN       int64
		bW             bool
		expectBlocking bool
	}{
		{"write-write overlap", 0, 100, true, 99, 10, true, true},
		{"write-read overlap", 0, 100, true, 50, 1, false, true},
		{"read-write overlap", 0, 100, false, 0, 1, true, true},
		{"adjacent writers", 0, 100, true, 100, 10, true, false},
		{"disjoint", 0, 10, true, 1000, 10, true, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var l Locker
			a := l.Lock(c.aOff, c.aN, c.aW)
			var got atomic.Bool
			done := make(chan struct{})
			go func() { b := l.Lock(c.bOff, c.bN, c.bW); got.Store(true); l.Unlock(b); close(done) }()
			time.Sleep(20 * time.Millisecond)
			if got.Load() == c.expectBlocking {
				t.Fatalf("second lock acquired=%v, want blocking=%v", got.Load(), c.expectBlocking)
			}
			l.Unlock(a)
			<-done
		})
	}
}

func TestNoLostUpdates(t *testing.T) {
	var l Locker
	counters := make([]int, 8)
	var wg sync.WaitGroup
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 500; i++ {
				idx := (g + i) % 8
				r := l.Lock(int64(idx)*10, 10, true)
				v := counters[idx]
				counters[idx] = v + 1
				l.Unlock(r)
			}
		}(g)
	}
	wg.Wait()
	total := 0
	for _, c := range counters {
		total += c
	}
	if total != 16*500 {
		t.Fatalf("lost updates: %d", total)
	}
}
