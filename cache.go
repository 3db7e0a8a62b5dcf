package vdisk

import (
	"context"
	"sync"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/cache"
	"github.com/vdisk/vdisk/storage/osfs"
)

// cacheState is one Open's block cache (OpenOptions.Cache): it goes in
// front of the first layer that lives on a network storage (a URL name of
// a registered scheme), since one cache file caches one source. The files
// opened through it are kept for Disk.Prefetch and Disk.CacheStats.
type cacheState struct {
	mu    sync.Mutex
	used  bool
	files []cache.Cached
}

// checkCache refuses a block cache named by a URL: the cache is a local
// file (a cache of a network image kept on the network would fetch what it
// saves).
func (o *OpenOptions) checkCache() error {
	if s := driver.SchemeOf(o.Cache); s != "" && !o.CacheInMemory {
		return driver.OptionErrorf("the block cache %q is a %s:// name: it must be a local file", o.Cache, s)
	}
	return nil
}

// cached wraps st, the storage of the network layer name, with o's cache
// when o asks for one and no other layer of this open has it.
func (o *OpenOptions) cached(name string, st driver.Storage) driver.Storage {
	if o.cache == nil || (o.Cache == "" && !o.CacheInMemory) || driver.SchemeOf(name) == "" {
		return st
	}
	c := o.cache
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.used {
		o.logger().Warn("the block cache serves one network image; this one is read uncached", "image", name)
		return st
	}
	c.used = true
	co := o.CacheOptions
	if co.Logger == nil {
		co.Logger = o.logger()
	}
	file := o.Cache
	if o.CacheInMemory {
		file = ""
	}
	return &recordingStorage{Storage: cache.NewStorage(st, osfs.New(), file, co), state: c}
}

// recordingStorage keeps the cached files its storage opens.
type recordingStorage struct {
	driver.Storage
	state *cacheState
}

func (r *recordingStorage) Open(name string, flag driver.OpenFlag) (driver.File, error) {
	f, err := r.Storage.Open(name, flag)
	if c, ok := f.(cache.Cached); ok && err == nil {
		r.state.mu.Lock()
		r.state.files = append(r.state.files, c)
		r.state.mu.Unlock()
	}
	return f, err
}

func (c *cacheState) list() []cache.Cached {
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]cache.Cached(nil), c.files...)
}

// CacheStats reports the counters of the disk's block cache
// (OpenOptions.Cache): one entry per cached file, none without a cache.
func (d *Disk) CacheStats() []cache.Stats {
	var out []cache.Stats
	for _, f := range d.caches.list() {
		out = append(out, f.Stats())
	}
	return out
}

// Prefetch pulls the whole of the cached network layer (its allocated
// ranges) into the block cache, as `vdisk serve --prefetch` does in the
// background; progress reports bytes. Without a cache it does nothing.
func (d *Disk) Prefetch(ctx context.Context, progress func(done, total int64)) error {
	for _, f := range d.caches.list() {
		if err := f.Prefetch(ctx, progress); err != nil {
			return err
		}
	}
	return nil
}

// logCacheStats reports the block cache's counters on the debug log when
// the disk closes (vdisk --debug shows them: bytes fetched from the
// source, hits and misses).
func (d *Disk) logCacheStats() {
	for _, s := range d.CacheStats() {
		d.log.Debug("block cache", "file", s.File, "hits", s.Hits, "misses", s.Misses, "bytes-fetched", s.BytesFetched,
			"cached-blocks", s.CachedBlocks, "capacity-blocks", s.CapacityBlocks, "evictions", s.Evictions)
	}
}
