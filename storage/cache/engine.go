package cache

import (
	"crypto/rand"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/bufpool"
	"github.com/vdisk/vdisk/internal/rangelock"
	"github.com/vdisk/vdisk/storage/memfs"
)

// entry is one cached block.
type entry struct {
	blk        int64
	slot       int64
	crc        uint32 // CRC-32C of the slot's bytes
	verified   bool   // the slot was checked against crc (or written) in this session
	pins       int    // readers and writers using the slot; never evicted while > 0
	prev, next *entry
}

// call is one fetch of a block from the source that concurrent readers of
// the same block wait for (singleflight).
type call struct {
	done chan struct{}
	buf  []byte // the fetched block (nil when fetched into a reader's buffer)
	err  error
	refs atomic.Int32 // the fetcher and its waiters still to copy from buf
}

// release drops one reference to c.buf; the last returns it to the pool.
func (e *engine) release(c *call) {
	if c.refs.Add(-1) == 0 && c.buf != nil {
		e.bufs.Put(c.buf)
	}
}

// engine is the cache of one source file.
type engine struct {
	src        driver.File
	f          driver.File // the cache file (a private memfs file in memory mode)
	name       string      // cache file name; "" in memory mode
	persistent bool
	l          layout
	o          Options
	log        *slog.Logger
	onClose    func()

	// locks orders reads against writes of the same blocks: readers and
	// fills hold their blocks shared, write-through, punch and truncate
	// exclusive.
	locks rangelock.Locker
	// commitMu: writers hold it shared, a metadata commit exclusive, so a
	// commit never records a write half done.
	commitMu sync.RWMutex
	// hdrMu serialises the header rewrite that marks the cache unclean.
	hdrMu  sync.Mutex
	hdr    header // the durable header (persistent mode)
	region int    // the metadata region hdr points to

	bufs       bufpool.Pool // blocks for fetches and checks: a cold read would allocate its whole size
	mu         sync.Mutex
	size       int64
	byBlock    map[int64]*entry
	head, tail *entry // LRU list, head most recently used
	free       []int64
	nextSlot   int64
	quarantine []int64 // slots freed since the last commit (the durable metadata may still name them)
	inflight   map[int64]*call
	dirty      bool   // the metadata differs from the durable one
	writes     uint64 // write operations passed to the source
	synced     uint64 // writes made durable by a source Sync
	closed     bool

	hits, misses, fetched, evictions atomic.Int64
	discarded                        string
	zeroCRC                          uint32 // CRC-32C of a block of zeros

	// Background flushes of filled blocks (persistent mode): see
	// flushAhead.
	unflushed atomic.Int64 // bytes stored since the last flush started
	flushing  atomic.Bool
	flushes   sync.WaitGroup
}

// flushAheadBytes is how many bytes of filled blocks start a background
// flush of the cache file (a variable for tests).
var flushAheadBytes int64 = 128 << 20

// flushAhead starts a flush of the cache file in the background once
// flushAheadBytes were stored since the last one, so that the blocks a
// cold read fills reach the disk while it goes on, instead of all in the
// flush of the metadata commit at close. It changes nothing durable: the
// metadata naming the blocks is written after its own flush, as before.
func (e *engine) flushAhead(n int64) {
	if !e.persistent || e.unflushed.Add(n) < flushAheadBytes || e.flushing.Swap(true) {
		return
	}
	e.unflushed.Store(0)
	e.mu.Lock()
	closed := e.closed
	if !closed {
		e.flushes.Add(1)
	}
	e.mu.Unlock()
	if closed {
		e.flushing.Store(false)
		return
	}
	go func() {
		defer e.flushes.Done()
		defer e.flushing.Store(false)
		if err := e.f.Sync(); err != nil {
			e.log.Debug("cache: background flush failed", "cache", e.name, "err", err)
		}
	}()
}

var errNoSlot = errors.New("cache: no block can be evicted")

func newEngine(src driver.File, st driver.Storage, name string, o Options) (*engine, error) {
	o, err := o.normalize()
	if err != nil {
		return nil, err
	}
	size, err := src.Size()
	if err != nil {
		return nil, err
	}
	l, _ := newLayout(o.Size, o.BlockSize)
	e := &engine{src: src, name: name, l: l, o: o, log: o.Logger, size: size,
		byBlock: map[int64]*entry{}, inflight: map[int64]*call{},
		zeroCRC: crc32.Checksum(make([]byte, l.bs), castagnoli)}
	e.bufs.Size = int(l.bs)
	if name == "" {
		f, err := memfs.New().Open("/cache", driver.ReadWrite|driver.Create)
		if err != nil {
			return nil, err
		}
		e.f = f
		return e, nil
	}
	if st == nil {
		return nil, driver.OptionErrorf("cache %s: no storage to hold it", name)
	}
	f, err := st.Open(name, driver.ReadWrite|driver.Create)
	if err != nil {
		return nil, err
	}
	e.f, e.persistent = f, true
	if err := e.load(); err != nil {
		var fresh *freshCache
		if !errors.As(err, &fresh) {
			e.discarded = err.Error()
			e.log.Warn("cache: discarding the cache file and starting empty", "cache", name, "source", src.Name(), "reason", err)
		}
		if err := e.reset(); err != nil {
			f.Close()
			return nil, err
		}
	}
	return e, nil
}

// freshCache is load's answer for an empty file: nothing to warn about.
type freshCache struct{}

func (*freshCache) Error() string { return "empty cache file" }

func (e *engine) identity() ([32]byte, string) {
	v := ""
	if vs, ok := e.src.(driver.Versioned); ok {
		v = vs.Version()
	}
	return identityHash(e.src.Name(), v), v
}

// load validates the cache file against the layout the options give and
// the source's identity, and takes over its blocks. Any error discards it.
func (e *engine) load() error {
	fsz, err := e.f.Size()
	if err != nil {
		return err
	}
	if fsz == 0 {
		return &freshCache{}
	}
	b := make([]byte, hdrSize)
	if err := readFull(e.f, b, 0); err != nil {
		return driver.Corruptf(e.name, 0, "cannot read the header: %v", err)
	}
	h, err := decodeHeader(e.name, b)
	if err != nil {
		return err
	}
	l := &e.l
	if h.cacheSecs != l.cacheSecs || int64(h.blockSize) != l.bs {
		return fmt.Errorf("cache %s holds %d-byte blocks in %d bytes; the options ask for %d-byte blocks in %d bytes",
			e.name, h.blockSize, h.cacheSecs*sectorSize, l.bs, l.cacheSecs*sectorSize)
	}
	r := -1
	for i := range 2 {
		if h.treeRoot == l.rootSec(i) && h.blkMap == l.regionSec(i) {
			r = i
		}
	}
	if r < 0 || uint64(h.cBlkMap) != l.cBlkMap {
		return driver.Corruptf(e.name, offTreeRoot, "tree root %d, block map %d (%d sectors) are not where the layout puts them", h.treeRoot, h.blkMap, h.cBlkMap)
	}
	if int64(h.extents) > l.nslots || int64(h.nodesUsed) != treeNodes(int64(h.extents)) || int64(h.nodesUsed) > l.nodes {
		return driver.Corruptf(e.name, offExtents, "%d extents in %d tree nodes do not fit %d slots", h.extents, h.nodesUsed, l.nslots)
	}
	id, v := e.identity()
	if h.srcSize != uint64(e.size) || h.identity != id {
		return fmt.Errorf("cache %s was filled from another source (size %d, now %d; or name/version changed: now %q version %q)",
			e.name, h.srcSize, e.size, e.src.Name(), v)
	}
	if h.unclean {
		return fmt.Errorf("cache %s was not closed cleanly after writes to the source", e.name)
	}
	start := int64(l.regionSec(r)) * sectorSize
	rlen := l.fixedBytes() + int64(h.nodesUsed)*nodeSize
	if start+rlen > fsz {
		return driver.Corruptf(e.name, start, "metadata region of %d bytes beyond the end of the %d-byte file", rlen, fsz)
	}
	region := make([]byte, rlen)
	if err := readFull(e.f, region, start); err != nil {
		return driver.Corruptf(e.name, start, "cannot read the metadata: %v", err)
	}
	if c := crc32.Checksum(region, castagnoli); c != h.metaCRC {
		return driver.Corruptf(e.name, start, "metadata checksum %#x, header says %#x", c, h.metaCRC)
	}
	byBlock, lru, err := decodeRegion(e.name, l, r, &h, region)
	if err != nil {
		return err
	}
	used := make([]bool, l.nslots)
	for _, m := range byBlock {
		end := int64(l.slotSec(m.slot))*sectorSize + l.bs
		if end > fsz {
			return driver.Corruptf(e.name, end-l.bs, "block %d's data ends at %d, beyond the %d-byte file", m.blk, end, fsz)
		}
		used[m.slot] = true
		e.nextSlot = max(e.nextSlot, m.slot+1)
	}
	for s := int64(0); s < e.nextSlot; s++ {
		if !used[s] {
			e.free = append(e.free, s)
		}
	}
	for i := len(lru) - 1; i >= 0; i-- {
		en := &entry{blk: lru[i].blk, slot: lru[i].slot, crc: lru[i].crc}
		e.byBlock[en.blk] = en
		e.pushFront(en)
	}
	e.hdr, e.region = h, r
	return nil
}

// reset empties the cache file and writes an empty cache.
func (e *engine) reset() error {
	if err := e.f.Truncate(0); err != nil {
		return err
	}
	var h header
	h.cacheSecs = e.l.cacheSecs
	h.cBlkMap = uint32(e.l.cBlkMap)
	h.blockSize = uint32(e.l.bs)
	rand.Read(h.uuidImage[:])
	e.hdr, e.region = h, 1
	e.byBlock, e.head, e.tail = map[int64]*entry{}, nil, nil
	e.free, e.quarantine, e.nextSlot = nil, nil, 0
	return e.writeMeta(nil, nil, false, e.size)
}

// writeMeta makes the data written so far durable, then writes the
// metadata into the region not in use and switches the header to it: a
// crash at any point leaves the old or the new metadata, each naming only
// slots whose data it describes.
func (e *engine) writeMeta(byBlock, lru []metaEntry, unclean bool, size int64) error {
	if err := e.f.Sync(); err != nil {
		return err
	}
	r := 1 - e.region
	region, nodes := encodeRegion(&e.l, r, byBlock, lru)
	if _, err := e.f.WriteAt(region, int64(e.l.regionSec(r))*sectorSize); err != nil {
		return err
	}
	if err := e.f.Sync(); err != nil {
		return err
	}
	h := e.hdr
	h.unclean = unclean
	h.treeRoot, h.blkMap = e.l.rootSec(r), e.l.regionSec(r)
	h.generation++
	h.srcSize = uint64(size)
	h.identity, _ = e.identity()
	h.metaCRC = crc32.Checksum(region, castagnoli)
	h.lruHead = 0
	if len(lru) > 0 {
		h.lruHead = e.l.slotSec(lru[0].slot)
	}
	h.extents = uint32(len(byBlock))
	h.nodesUsed = uint32(nodes)
	rand.Read(h.uuidMod[:])
	_, err := e.f.WriteAt(h.encode(), 0)
	if err == nil {
		err = e.f.Sync()
	}
	if err != nil {
		// The header on the medium may now be the new one, clean: the
		// next write must mark it unclean again, whatever we knew.
		e.hdr.unclean = false
		return err
	}
	e.hdr, e.region = h, r
	return nil
}

// commit records the cached blocks durably (persistent mode) and makes
// the slots evicted before it reusable.
func (e *engine) commit() error {
	e.commitMu.Lock()
	defer e.commitMu.Unlock()
	e.mu.Lock()
	unclean := e.writes != e.synced
	if !e.persistent {
		e.free = append(e.free, e.quarantine...)
		e.quarantine = nil
		e.mu.Unlock()
		return nil
	}
	if !e.dirty && len(e.quarantine) == 0 && unclean == e.hdr.unclean && uint64(e.size) == e.hdr.srcSize {
		e.mu.Unlock()
		return nil
	}
	byBlock := make([]metaEntry, 0, len(e.byBlock))
	lru := make([]metaEntry, 0, len(e.byBlock))
	for en := e.head; en != nil; en = en.next {
		lru = append(lru, metaEntry{en.blk, en.slot, en.crc})
	}
	byBlock = append(byBlock, lru...)
	slices.SortFunc(byBlock, func(a, b metaEntry) int { return cmpInt(a.blk, b.blk) })
	q := e.quarantine
	e.quarantine = nil
	e.dirty = false
	size := e.size
	e.mu.Unlock()

	err := e.writeMeta(byBlock, lru, unclean, size)
	e.mu.Lock()
	if err != nil {
		e.quarantine = append(e.quarantine, q...)
		e.dirty = true
	} else {
		e.free = append(e.free, q...)
	}
	e.mu.Unlock()
	return err
}

func cmpInt(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// markUnclean durably flags the cache as not matching the source before a
// write changes the source; the caller holds commitMu shared. A crash
// before the next clean commit then discards the cache.
func (e *engine) markUnclean() error {
	if !e.persistent {
		return nil
	}
	e.hdrMu.Lock()
	defer e.hdrMu.Unlock()
	if e.hdr.unclean {
		return nil
	}
	h := e.hdr
	h.unclean = true
	if _, err := e.f.WriteAt(h.encode(), 0); err != nil {
		return err
	}
	if err := e.f.Sync(); err != nil {
		return err
	}
	e.hdr = h
	return nil
}

// LRU list helpers; the caller holds mu.

func (e *engine) pushFront(en *entry) {
	en.prev, en.next = nil, e.head
	if e.head != nil {
		e.head.prev = en
	}
	e.head = en
	if e.tail == nil {
		e.tail = en
	}
}

func (e *engine) unlink(en *entry) {
	if en.prev != nil {
		en.prev.next = en.next
	} else {
		e.head = en.next
	}
	if en.next != nil {
		en.next.prev = en.prev
	} else {
		e.tail = en.prev
	}
	en.prev, en.next = nil, nil
}

func (e *engine) touch(en *entry) {
	if e.head != en {
		e.unlink(en)
		e.pushFront(en)
		e.dirty = true
	}
}

// dropLocked forgets a cached block. Its slot may still be named by the
// durable metadata, so in persistent mode it is reusable only after the
// next commit.
func (e *engine) dropLocked(en *entry) {
	if e.byBlock[en.blk] != en {
		return
	}
	delete(e.byBlock, en.blk)
	e.unlink(en)
	e.dirty = true
	if e.persistent {
		e.quarantine = append(e.quarantine, en.slot)
	} else {
		e.free = append(e.free, en.slot)
	}
}

// allocSlot finds a slot for a new block: a free one, a never used one, or
// the least recently used block's.
func (e *engine) allocSlot() (int64, error) {
	for try := 0; try < 4; try++ {
		e.mu.Lock()
		if n := len(e.free); n > 0 {
			s := e.free[n-1]
			e.free = e.free[:n-1]
			e.mu.Unlock()
			return s, nil
		}
		if e.nextSlot < e.l.nslots {
			s := e.nextSlot
			e.nextSlot++
			e.mu.Unlock()
			return s, nil
		}
		// Evict a batch so one commit frees many slots.
		batch := 1
		if e.persistent {
			batch = int(max(1, e.l.nslots/16))
		}
		n := 0
		for en := e.tail; en != nil && n < batch; {
			prev := en.prev
			if en.pins == 0 {
				e.dropLocked(en)
				e.evictions.Add(1)
				n++
			}
			en = prev
		}
		pending := len(e.quarantine)
		e.mu.Unlock()
		if pending == 0 && n == 0 {
			return 0, errNoSlot
		}
		if e.persistent {
			if err := e.commit(); err != nil {
				return 0, err
			}
		}
	}
	return 0, errNoSlot
}

func (e *engine) slotOff(slot int64) int64 { return int64(e.l.slotSec(slot)) * sectorSize }

// fetch reads block b from the source into a pooled buffer; bytes past
// its end read as zeros.
func (e *engine) fetch(b int64) ([]byte, error) {
	buf := e.bufs.Get()
	e.mu.Lock()
	size := e.size
	e.mu.Unlock()
	off := b * e.l.bs
	n := min(e.l.bs, size-off)
	clear(buf[max(n, 0):])
	if n <= 0 {
		return buf, nil
	}
	got, err := e.src.ReadAt(buf[:n], off)
	if err == io.EOF && int64(got) == n {
		err = nil
	}
	if err != nil {
		e.bufs.Put(buf)
		return nil, err
	}
	e.misses.Add(1)
	e.fetched.Add(n)
	return buf, nil
}

// store puts a fetched block into the cache; failing that, the block is
// simply not cached.
func (e *engine) store(b int64, buf []byte) {
	slot, err := e.allocSlot()
	if err != nil {
		if !errors.Is(err, errNoSlot) {
			e.log.Warn("cache: cannot make room", "cache", e.name, "err", err)
		}
		return
	}
	zero := driver.IsZero(buf)
	if err := e.writeSlot(slot, buf, zero); err != nil {
		e.log.Warn("cache: cannot write a block", "cache", e.name, "err", err)
		e.mu.Lock()
		// Never named by durable metadata: free at once.
		e.free = append(e.free, slot)
		e.mu.Unlock()
		return
	}
	sum := e.zeroCRC
	if !zero {
		sum = crc32.Checksum(buf, castagnoli)
		e.flushAhead(int64(len(buf)))
	}
	e.mu.Lock()
	if old := e.byBlock[b]; old != nil {
		e.dropLocked(old)
	}
	en := &entry{blk: b, slot: slot, crc: sum, verified: true}
	e.byBlock[b] = en
	e.pushFront(en)
	e.dirty = true
	e.mu.Unlock()
}

// writeSlot puts a fetched block into its slot. A block of zeros is not
// written: a slot wholly past the end of the cache file becomes a hole
// by writing its last byte, one inside the file is punched (a slot may
// hold an older block's bytes). Cold reads of sparse sources thus cost
// no cache writes for their zeros, nor their flush at close.
func (e *engine) writeSlot(slot int64, buf []byte, zero bool) error {
	off := e.slotOff(slot)
	if !zero || int64(len(buf)) != e.l.bs {
		_, err := e.f.WriteAt(buf, off)
		return err
	}
	size, err := e.f.Size()
	if err != nil {
		return err
	}
	switch {
	case size <= off:
		// Only this slot's owner writes [off, off+bs): a write past it
		// by another leaves a hole here, which reads as zeros too.
		_, err = e.f.WriteAt(buf[:1], off+e.l.bs-1)
		return err
	case size >= off+e.l.bs:
		if err := e.f.PunchHole(off, e.l.bs); err == nil {
			return nil
		}
	}
	_, err = e.f.WriteAt(buf, off)
	return err
}

// readBlock copies [in, in+len(dst)) of block b into dst, from the cache
// or, on a miss, from the source (filling the cache). The caller holds the
// block locked shared. count says whether a hit counts in the stats.
func (e *engine) readBlock(b int64, dst []byte, in int64, count bool) error {
	for {
		e.mu.Lock()
		if en := e.byBlock[b]; en != nil {
			en.pins++
			e.touch(en)
			verified, sum := en.verified, en.crc
			e.mu.Unlock()
			var err error
			if !verified {
				// First use in this session: the data must match the
				// checksum recorded with it.
				blk := e.bufs.Get()
				if err = readFull(e.f, blk, e.slotOff(en.slot)); err == nil {
					if c := crc32.Checksum(blk, castagnoli); c != sum {
						err = driver.Corruptf(e.name, e.slotOff(en.slot), "cached block %d: checksum %#x, recorded %#x", b, c, sum)
					} else {
						copy(dst, blk[in:])
					}
				}
				e.bufs.Put(blk)
			} else if len(dst) > 0 {
				err = readFull(e.f, dst, e.slotOff(en.slot)+in)
			}
			e.mu.Lock()
			en.pins--
			if err != nil {
				e.dropLocked(en)
			} else {
				en.verified = true
			}
			e.mu.Unlock()
			if err == nil {
				if count {
					e.hits.Add(1)
				}
				return nil
			}
			e.log.Warn("cache: cannot read a cached block; fetching it again", "cache", e.name, "err", err)
			continue
		}
		if c := e.inflight[b]; c != nil {
			c.refs.Add(1)
			e.mu.Unlock()
			<-c.done
			err, direct := c.err, c.buf == nil
			if err == nil && !direct {
				copy(dst, c.buf[in:])
			}
			e.release(c)
			if err != nil {
				return err
			}
			if direct {
				// Fetched into its reader's buffer (fillDirect) and
				// stored: read it from the cache (or fetch it again if
				// it could not be kept).
				continue
			}
			return nil
		}
		c := &call{done: make(chan struct{})}
		c.refs.Store(1)
		e.inflight[b] = c
		e.mu.Unlock()
		c.buf, c.err = e.fetch(b)
		if c.err == nil {
			e.store(b, c.buf)
		}
		e.mu.Lock()
		delete(e.inflight, b)
		e.mu.Unlock()
		close(c.done)
		err := c.err
		if err == nil {
			copy(dst, c.buf[in:])
		}
		e.release(c)
		return err
	}
}

// fetchUnit is the largest source read of a run of missing blocks.
const fetchUnit = 1 << 20

// claimDirect marks the blocks of b0..b1 that [off, off+n) covers whole
// and that are neither cached nor being fetched as being fetched by the
// caller (who must pass each to fillDirect), and returns their calls.
func (e *engine) claimDirect(off, n, b0, b1 int64) map[int64]*call {
	var out map[int64]*call
	e.mu.Lock()
	defer e.mu.Unlock()
	for b := b0; b <= b1; b++ {
		if b*e.l.bs < off || (b+1)*e.l.bs > off+n || e.byBlock[b] != nil || e.inflight[b] != nil {
			continue
		}
		if out == nil {
			out = map[int64]*call{}
		}
		c := &call{done: make(chan struct{})}
		e.inflight[b] = c
		out[b] = c
	}
	return out
}

// fillDirect reads the claimed blocks from b0 on (calls, one each) from
// the source straight into dst, stores them in the cache and releases
// their waiters, who read them from the cache.
func (e *engine) fillDirect(b0 int64, dst []byte, calls []*call) error {
	got, err := e.src.ReadAt(dst, b0*e.l.bs)
	if err == io.EOF && got == len(dst) {
		err = nil
	}
	if err == nil {
		e.misses.Add(int64(len(calls)))
		e.fetched.Add(int64(len(dst)))
		for i := range calls {
			e.store(b0+int64(i), dst[int64(i)*e.l.bs:int64(i+1)*e.l.bs])
		}
	}
	e.mu.Lock()
	for i := range calls {
		delete(e.inflight, b0+int64(i))
	}
	e.mu.Unlock()
	for _, c := range calls {
		c.err = err
		close(c.done)
	}
	return err
}

func readFull(f driver.File, p []byte, off int64) error {
	n, err := f.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return err
}
