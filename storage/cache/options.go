package cache

import (
	"log/slog"

	"github.com/vdisk/vdisk/driver"
)

const (
	// DefaultSize is the default bound of a cache (cache-size).
	DefaultSize = 1 << 30
	// DefaultBlockSize is the default unit of caching (cache-block-size).
	DefaultBlockSize = 256 << 10
	// DefaultParallel is the default number of concurrent source reads.
	DefaultParallel = 8

	minCacheSize = 4 << 20
	// maxCacheSize keeps the metadata rewritten on every commit (block
	// bitmap and tree) at a few tens of MiB.
	maxCacheSize = 64 << 30
	minBlockSize = 64 << 10
	maxBlockSize = 1 << 20
)

// OptionList declares the cache's options, with qemu-style names, for
// `cache-size=` and friends on the command line.
var OptionList = []driver.Option{
	{Name: "cache-size", Type: driver.TypeSize, Default: "1G", Min: minCacheSize, Max: maxCacheSize,
		Doc: "bound of the cache file, metadata included (rounded down to 2 MiB); least recently used blocks are evicted"},
	{Name: "cache-block-size", Type: driver.TypeSize, Default: "256K", Min: minBlockSize, Max: maxBlockSize, PowerOf2: true,
		Doc: "unit in which blocks are fetched from the source and cached"},
	{Name: "cache-parallel", Type: driver.TypeInt, Default: "8", Min: 1, Max: 64,
		Doc: "number of blocks fetched from the source at the same time"},
}

// Options configure a cache. Zero fields take the defaults.
type Options struct {
	// Size bounds the cache file, metadata included (cache-size).
	Size int64
	// BlockSize is the caching unit, a power of two in 64 KiB..1 MiB
	// (cache-block-size).
	BlockSize int64
	// Parallel bounds concurrent source reads of one request or prefetch.
	Parallel int
	// Logger receives the warnings (a discarded cache, failing cache I/O).
	Logger *slog.Logger
}

// ParseOptions validates kvs against OptionList.
func ParseOptions(kvs []driver.KV) (Options, error) {
	v, err := driver.ParseOptions("cache", OptionList, kvs)
	if err != nil {
		return Options{}, err
	}
	return Options{Size: v.Int("cache-size"), BlockSize: v.Int("cache-block-size"), Parallel: int(v.Int("cache-parallel"))}, nil
}

// normalize fills defaults and checks the bounds.
func (o Options) normalize() (Options, error) {
	if o.Size == 0 {
		o.Size = DefaultSize
	}
	if o.BlockSize == 0 {
		o.BlockSize = DefaultBlockSize
	}
	if o.Parallel <= 0 {
		o.Parallel = DefaultParallel
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.BlockSize < minBlockSize || o.BlockSize > maxBlockSize || o.BlockSize&(o.BlockSize-1) != 0 {
		return o, driver.OptionErrorf("cache-block-size %d is not a power of two between %d and %d", o.BlockSize, minBlockSize, maxBlockSize)
	}
	if o.Size < minCacheSize || o.Size > maxCacheSize {
		return o, driver.OptionErrorf("cache-size %d is not between %d and %d", o.Size, minCacheSize, maxCacheSize)
	}
	o.Size -= o.Size % bitmapGranule
	if _, ok := newLayout(o.Size, o.BlockSize); !ok {
		return o, driver.OptionErrorf("cache-size %d holds fewer than two blocks of %d bytes besides its metadata", o.Size, o.BlockSize)
	}
	return o, nil
}
