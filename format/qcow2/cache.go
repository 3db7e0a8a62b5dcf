package qcow2

import (
	"cmp"
	"slices"
)

// table is one cached metadata cluster: an L2 table or a refcount block.
type table struct {
	off   int64 // host offset of the cluster
	idx   int64 // refcount blocks: index in the refcount table
	buf   []byte
	dirty bool
	// orig is, for a refcount block, its content when the first decrement
	// since the last flush happened: phase A of a flush writes the maximum
	// of orig and buf so that a crash can only leak.
	orig []byte
	// pend marks, for a refcount block, clusters freed since the last flush.
	// They are not reused before the flush that makes the freeing durable.
	pend []uint64

	prev, next *table
}

// cache is an LRU cache of metadata clusters keyed by host offset. It is not
// safe for concurrent use; the image's metadata mutex guards it. Entries are
// never dropped implicitly: the image calls evict at safe points.
type cache struct {
	max  int // capacity in entries
	m    map[int64]*table
	head table // sentinel: head.next is the most recently used
}

func newCache(max int) *cache {
	if max < 4 {
		max = 4
	}
	c := &cache{max: max, m: make(map[int64]*table)}
	c.head.next, c.head.prev = &c.head, &c.head
	return c
}

func (c *cache) unlink(t *table) {
	t.prev.next, t.next.prev = t.next, t.prev
	t.prev, t.next = nil, nil
}

func (c *cache) pushFront(t *table) {
	t.next, t.prev = c.head.next, &c.head
	c.head.next.prev = t
	c.head.next = t
}

// get returns the cached table at off (moving it to the front), or nil.
func (c *cache) get(off int64) *table {
	t := c.m[off]
	if t != nil && c.head.next != t {
		c.unlink(t)
		c.pushFront(t)
	}
	return t
}

// peek returns the cached table at off without touching the LRU order.
func (c *cache) peek(off int64) *table { return c.m[off] }

// add inserts t at the front, replacing a stale entry for the same offset
// (a cluster freed and reused).
func (c *cache) add(t *table) {
	c.remove(t.off)
	c.m[t.off] = t
	c.pushFront(t)
}

// remove drops the table at off, dirty or not.
func (c *cache) remove(off int64) {
	if t := c.m[off]; t != nil {
		c.unlink(t)
		delete(c.m, off)
	}
}

func (c *cache) len() int { return len(c.m) }

// over reports whether the cache holds more than its capacity.
func (c *cache) over() bool { return len(c.m) > c.max }

// evictClean drops least recently used entries for which ok returns true
// until the cache is within capacity; it reports whether it got there.
func (c *cache) evictClean(ok func(*table) bool) bool {
	for t := c.head.prev; t != &c.head && len(c.m) > c.max; {
		prev := t.prev
		if ok(t) {
			c.unlink(t)
			delete(c.m, t.off)
		}
		t = prev
	}
	return len(c.m) <= c.max
}

// each calls fn for every entry (in no particular order).
func (c *cache) each(fn func(*table)) {
	for _, t := range c.m {
		fn(t)
	}
}

// dirtyTables returns the dirty entries sorted by offset.
func (c *cache) dirtyTables() []*table {
	var out []*table
	for _, t := range c.m {
		if t.dirty {
			out = append(out, t)
		}
	}
	sortTables(out)
	return out
}

func sortTables(ts []*table) {
	slices.SortFunc(ts, func(a, b *table) int { return cmp.Compare(a.off, b.off) })
}
