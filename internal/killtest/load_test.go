package killtest

import (
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"sync/atomic"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

const sector = 512

// loadConfig is one run of the random load.
type loadConfig struct {
	seed    uint64
	idBase  int64 // first operation id (ids are unique over a test's runs)
	workers int
	ops     int   // operations per worker; 0: until an operation fails (the kill)
	maxSize int64 // resizes grow the disk up to this size
	maxIO   int64 // the largest request (1 MiB when 0)
	zero    bool  // the format writes zeroes (driver.CapZero)
	discard bool  // the format discards (driver.CapDiscard)
	resize  bool  // the format resizes (driver.CapResize)
}

// opLog records the load as lines written one write(2) each, so that a
// killed child leaves a log of what it began and finished: "B id kind off
// len" before an operation, "E id size" after it succeeded, "FB" and "FE"
// around a flush. Kinds: w write, z write-zeroes, u write-zeroes with
// unmap, d discard, r resize (len is the new size).
type opLog struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *opLog) printf(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fmt.Fprintf(l.w, format, args...)
}

// patTable is the noise pattern copies sectors' bodies from.
var patTable = func() []byte {
	b := make([]byte, 8192)
	x := uint64(0x9E3779B97F4A7C15)
	for i := 0; i < len(b); i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(b[i:], x)
	}
	return b
}()

// pattern fills p with the data operation id writes at disk offset off
// (sector-aligned): each sector holds id and its offset, then noise that
// depends on both, so the checker can tell which write a sector holds.
// (Copies, not byte loops: cheap under the race detector.)
func pattern(p []byte, id, off int64) {
	for s := 0; s < len(p); s += sector {
		q := p[s:min(s+sector, len(p))]
		var h [16]byte
		binary.LittleEndian.PutUint64(h[:], uint64(id))
		binary.LittleEndian.PutUint64(h[8:], uint64(off+int64(s)))
		n := copy(q, h[:])
		start := (uint64(id)*131 + uint64(off+int64(s))/sector*17) % uint64(len(patTable)-sector)
		copy(q[n:], patTable[start:])
	}
}

// rangeLock keeps the load's operations on overlapping ranges apart, so
// that the log's order of completion is the order they took effect.
type rangeLock struct {
	mu   sync.Mutex
	cond *sync.Cond
	held map[[2]int64]int
}

func newRangeLock() *rangeLock {
	r := &rangeLock{held: make(map[[2]int64]int)}
	r.cond = sync.NewCond(&r.mu)
	return r
}

func (r *rangeLock) lock(off, n int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		busy := false
		for k := range r.held {
			if off < k[1] && k[0] < off+n {
				busy = true
				break
			}
		}
		if !busy {
			r.held[[2]int64{off, off + n}]++
			return
		}
		r.cond.Wait()
	}
}

func (r *rangeLock) unlock(off, n int64) {
	r.mu.Lock()
	k := [2]int64{off, off + n}
	if r.held[k]--; r.held[k] == 0 {
		delete(r.held, k)
	}
	r.mu.Unlock()
	r.cond.Broadcast()
}

// runLoad runs the random load on d until every worker has done its
// operations or one operation fails; it returns the first failure.
func runLoad(d *vdisk.Disk, cfg loadConfig, log *opLog) error {
	var (
		gate    sync.RWMutex // resizes exclude every other operation
		flushMu sync.Mutex   // one flush at a time: FB/FE pairs do not interleave
		rl      = newRangeLock()
		nextID  atomic.Int64
		errOnce sync.Once
		first   error
		stop    atomic.Bool
		wg      sync.WaitGroup
	)
	nextID.Store(cfg.idBase)
	fail := func(err error) {
		errOnce.Do(func() { first = err })
		stop.Store(true)
	}
	for w := range cfg.workers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(cfg.seed, uint64(w)))
			buf := make([]byte, 1<<20)
			for i := 0; (cfg.ops == 0 || i < cfg.ops) && !stop.Load(); i++ {
				if err := oneOp(d, cfg, rng, buf, &gate, &flushMu, rl, &nextID, log); err != nil {
					fail(err)
					return
				}
			}
		})
	}
	wg.Wait()
	return first
}

// oneOp picks and runs one random operation.
func oneOp(d *vdisk.Disk, cfg loadConfig, rng *rand.Rand, buf []byte, gate *sync.RWMutex, flushMu *sync.Mutex,
	rl *rangeLock, nextID *atomic.Int64, log *opLog) error {
	r := rng.IntN(100)
	switch {
	case r < 6:
		flushMu.Lock()
		defer flushMu.Unlock()
		log.printf("FB\n")
		if err := d.Flush(); err != nil {
			return fmt.Errorf("flush: %w", err)
		}
		log.printf("FE\n")
		return nil
	case r < 8 && cfg.resize:
		gate.Lock()
		defer gate.Unlock()
		size := d.Size()
		grow := (1 + rng.Int64N(4)) << 20
		if size+grow > cfg.maxSize {
			return nil
		}
		id := nextID.Add(1)
		log.printf("B %d r %d %d\n", id, size, size+grow)
		if err := d.Resize(ctx, size+grow, ""); err != nil {
			return fmt.Errorf("resize to %d: %w", size+grow, err)
		}
		log.printf("E %d %d\n", id, d.Size())
		return nil
	}
	gate.RLock()
	defer gate.RUnlock()
	size := d.Size() &^ (sector - 1)
	var n int64
	switch q := rng.IntN(100); {
	case q < 50:
		n = 4096
	case q < 85:
		n = (1 + rng.Int64N(128)) * sector
	default:
		n = (1 + rng.Int64N(2048)) * sector
	}
	if cfg.maxIO > 0 {
		n = min(n, cfg.maxIO)
	}
	n = min(n, size)
	off := rng.Int64N((size-n)/sector+1) * sector
	if rng.IntN(4) == 0 { // aligned to the request size: whole clusters
		off = off / n * n
	}
	kind := byte('w')
	switch {
	case r < 16 && cfg.zero:
		kind = 'z'
		if rng.IntN(2) == 0 {
			kind = 'u'
		}
	case r < 24 && cfg.discard:
		kind = 'd'
	}
	id := nextID.Add(1)
	rl.lock(off, n)
	defer rl.unlock(off, n)
	log.printf("B %d %c %d %d\n", id, kind, off, n)
	var err error
	switch kind {
	case 'w':
		p := buf[:n]
		pattern(p, id, off)
		_, err = d.WriteAt(p, off)
	case 'z', 'u':
		err = d.WriteZeroes(off, n, kind == 'u')
	case 'd':
		err = d.Discard(off, n)
	}
	if err != nil {
		return fmt.Errorf("op %d %c %d+%d: %w", id, kind, off, n, err)
	}
	log.printf("E %d %d\n", id, d.Size())
	return nil
}

// caps sets the load's operations from the format's capabilities.
func (cfg *loadConfig) caps(f *driver.Format) {
	cfg.zero = f.Caps&driver.CapZero != 0
	cfg.discard = f.Caps&driver.CapDiscard != 0
	cfg.resize = f.Caps&driver.CapResize != 0
}
