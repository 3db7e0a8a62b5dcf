package nbd

import (
	"sync"
	"time"
)

// Defaults of the Server's limits.
const (
	DefaultIdleTimeout    = 10 * time.Minute
	DefaultMaxConnections = 256
	DefaultMemoryBudget   = 256 << 20
	// MinMemoryBudget is the smallest MemoryBudget a Server accepts: half
	// of it goes to connections (at least a few), the rest must hold the
	// largest fixed per-request charge (block status, CACHE).
	MinMemoryBudget = 4 << 20
)

// Memory charged to the budget. The figures are upper bounds of what the
// server allocates for the purpose, not of what the Go runtime keeps
// around (heap slack until the next collection is not counted; the CLI
// sets a soft memory limit for that).
const (
	// connCharge: one connection's fixed buffers (the 128 KiB request
	// reader, the gathered replies, TLS records, goroutine stacks).
	connCharge = 256 << 10
	// requestCharge: what any request costs besides its data buffer (the
	// goroutine running it, its bookkeeping, small reply messages, a
	// structured read's segment list).
	requestCharge = 32 << 10
	// statusCharge: a block status request's extent lists and reply (two
	// contexts of up to maxExtents descriptors, with append slack).
	statusCharge = 1 << 20
	// chunkLen: TRIM, WRITE_ZEROES and CACHE run in pieces of at most
	// this size, split at multiples of it (so at cluster boundaries of
	// every format): a 4 GiB request holds a Disk's range lock and the
	// budget for one piece at a time, and stops early when its reply can
	// no longer be sent.
	chunkLen = 32 << 20
	// cacheChunk is the buffer NBD_CMD_CACHE reads through.
	cacheChunk = 1 << 20
	// maxSegments bounds the data/hole pieces a structured read is split
	// into; past it the rest of the read is sent as data.
	maxSegments = 1024
)

// pool is a counting semaphore of bytes that hands out what it has in
// arrival order: a large request waits for the ones before it, but small
// ones arriving later cannot starve it. A wait ends early when quit closes.
type pool struct {
	mu      sync.Mutex
	avail   int64
	waiters []*poolWaiter
}

type poolWaiter struct {
	n     int64
	ready chan struct{}
}

func newPool(n int64) *pool { return &pool{avail: n} }

// tryAcquire takes n bytes if that can happen now without overtaking a
// waiter.
func (p *pool) tryAcquire(n int64) bool {
	if n == 0 {
		return true
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.waiters) > 0 || p.avail < n {
		return false
	}
	p.avail -= n
	return true
}

// acquire takes n bytes, waiting for them in turn; it reports false (and
// holds nothing) when quit closed first.
func (p *pool) acquire(n int64, quit <-chan struct{}) bool {
	if n == 0 {
		return true
	}
	p.mu.Lock()
	if len(p.waiters) == 0 && p.avail >= n {
		p.avail -= n
		p.mu.Unlock()
		return true
	}
	w := &poolWaiter{n: n, ready: make(chan struct{})}
	p.waiters = append(p.waiters, w)
	p.mu.Unlock()
	select {
	case <-w.ready:
		return true
	case <-quit:
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-w.ready:
		// Granted meanwhile: give it back.
		p.avail += n
	default:
		for i, x := range p.waiters {
			if x == w {
				p.waiters = append(p.waiters[:i], p.waiters[i+1:]...)
				break
			}
		}
	}
	p.grantLocked()
	return false
}

func (p *pool) release(n int64) {
	if n == 0 {
		return
	}
	p.mu.Lock()
	p.avail += n
	p.grantLocked()
	p.mu.Unlock()
}

// grantLocked serves the waiters in order while there is enough.
func (p *pool) grantLocked() {
	for len(p.waiters) > 0 && p.avail >= p.waiters[0].n {
		w := p.waiters[0]
		p.waiters[0] = nil
		p.waiters = p.waiters[1:]
		p.avail -= w.n
		close(w.ready)
	}
}

// available returns the bytes not handed out (for tests).
func (p *pool) available() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.avail
}
