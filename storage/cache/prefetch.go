package cache

import (
	"context"
	"io"
	"sync"

	"github.com/vdisk/vdisk/driver"
)

// Stats are a cache's counters, for `info` and query-jobs.
type Stats struct {
	// Hits and Misses count blocks served from the cache and fetched
	// from the source by reads (Prefetch counts only its fetches, as
	// misses).
	Hits   int64 `json:"hits"`
	Misses int64 `json:"misses"`
	// BytesFetched is what was read from the source.
	BytesFetched int64 `json:"bytes-fetched"`
	Evictions    int64 `json:"evictions"`
	// CachedBlocks of CapacityBlocks blocks of BlockSize bytes are held.
	CachedBlocks   int64 `json:"cached-blocks"`
	CapacityBlocks int64 `json:"capacity-blocks"`
	BlockSize      int64 `json:"block-size"`
	// File is the cache file ("" in memory).
	File string `json:"file,omitempty"`
	// Discarded says why the cache file found at open was not used.
	Discarded string `json:"discarded,omitempty"`
}

// Stats returns the current counters.
func (f *File) Stats() Stats {
	e := f.e
	e.mu.Lock()
	n := int64(len(e.byBlock))
	e.mu.Unlock()
	return Stats{Hits: e.hits.Load(), Misses: e.misses.Load(), BytesFetched: e.fetched.Load(),
		Evictions: e.evictions.Load(), CachedBlocks: n, CapacityBlocks: e.l.nslots, BlockSize: e.l.bs,
		File: e.name, Discarded: e.discarded}
}

// Prefetch pulls the source into the cache: only its data ranges when the
// source knows its holes, from the start, until the cache is full (so it
// never evicts what it fetched). progress, if not nil, is called with the
// bytes done and the bytes to do after each block. It stops early when ctx
// is cancelled, returning ctx.Err().
func (f *File) Prefetch(ctx context.Context, progress func(done, total int64)) error {
	e := f.e
	e.mu.Lock()
	size := e.size
	e.mu.Unlock()
	blocks, err := e.dataBlocks(size)
	if err != nil {
		return err
	}
	if int64(len(blocks)) > e.l.nslots {
		blocks = blocks[:e.l.nslots]
	}
	blockLen := func(b int64) int64 { return min(e.l.bs, size-b*e.l.bs) }
	var total int64
	for _, b := range blocks {
		total += blockLen(b)
	}
	var (
		mu    sync.Mutex
		done  int64
		first error
		wg    sync.WaitGroup
	)
	next := make(chan int64)
	for range e.o.Parallel {
		wg.Go(func() {
			for b := range next {
				lk := e.locks.Lock(b*e.l.bs, e.l.bs, false)
				err := e.readBlock(b, nil, 0, false)
				e.locks.Unlock(lk)
				mu.Lock()
				if err != nil && first == nil {
					first = err
				}
				done += blockLen(b)
				if progress != nil {
					progress(done, total)
				}
				mu.Unlock()
			}
		})
	}
	var cerr error
feed:
	for _, b := range blocks {
		mu.Lock()
		failed := first != nil
		mu.Unlock()
		if failed {
			break
		}
		select {
		case next <- b:
		case <-ctx.Done():
			cerr = ctx.Err()
			break feed
		}
	}
	close(next)
	wg.Wait()
	if cerr != nil {
		return cerr
	}
	return first
}

// dataBlocks lists the blocks holding the source's data, in order.
func (e *engine) dataBlocks(size int64) ([]int64, error) {
	var out []int64
	add := func(lo, hi int64) {
		for b := lo / e.l.bs; b*e.l.bs < hi; b++ {
			if n := len(out); n == 0 || out[n-1] < b {
				out = append(out, b)
			}
		}
	}
	hs, ok := e.src.(driver.HoleSeeker)
	if !ok {
		add(0, size)
		return out, nil
	}
	for off := int64(0); off < size; {
		d, err := hs.SeekData(off)
		if err == io.EOF || (err == nil && d >= size) {
			break
		}
		if err != nil {
			return nil, err
		}
		h, err := hs.SeekHole(d)
		if err != nil {
			return nil, err
		}
		h = min(h, size)
		if h <= d {
			// A source that reports no progress: take the rest as data.
			add(d, size)
			break
		}
		add(d, h)
		off = h
	}
	return out, nil
}
