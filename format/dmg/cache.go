package dmg

import (
	"container/list"
	"sync"
)

// chunkCache keeps the most recently used decompressed chunks, up to a
// byte budget (and at least minEntries chunks, so a read crossing a chunk
// boundary never evicts what it is about to use). Concurrent requests for
// one chunk decompress it once; different chunks decompress in parallel
// (convert reads with several workers), so the lock is never held while
// decompressing.
type chunkCache struct {
	mu      sync.Mutex
	budget  int64
	min     int
	used    int64
	entries map[int]*centry
	lru     list.List // of *centry, most recent first; only loaded entries
}

type centry struct {
	idx   int
	data  []byte
	err   error
	ready chan struct{}
	elem  *list.Element
}

func newChunkCache(budget int64, minEntries int) *chunkCache {
	return &chunkCache{budget: budget, min: minEntries, entries: map[int]*centry{}}
}

// get returns chunk idx's bytes, loading them with load when absent. The
// returned slice is shared: callers only read it.
func (c *chunkCache) get(idx int, load func() ([]byte, error)) ([]byte, error) {
	c.mu.Lock()
	if e, ok := c.entries[idx]; ok {
		if e.elem != nil {
			c.lru.MoveToFront(e.elem)
		}
		c.mu.Unlock()
		<-e.ready
		return e.data, e.err
	}
	e := &centry{idx: idx, ready: make(chan struct{})}
	c.entries[idx] = e
	c.mu.Unlock()

	data, err := load()

	c.mu.Lock()
	e.data, e.err = data, err
	if err != nil {
		// Failures are not cached: the next read tries again (an I/O
		// error may be transient) and reports the error again.
		delete(c.entries, idx)
	} else {
		e.elem = c.lru.PushFront(e)
		c.used += int64(len(data))
		for c.used > c.budget && c.lru.Len() > c.min {
			old := c.lru.Back().Value.(*centry)
			c.lru.Remove(old.elem)
			delete(c.entries, old.idx)
			c.used -= int64(len(old.data))
		}
	}
	c.mu.Unlock()
	close(e.ready)
	return data, err
}
