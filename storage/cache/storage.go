package cache

import (
	"sync"

	"github.com/vdisk/vdisk/driver"
)

// Storage is a storage whose files are read through a cache (NewStorage).
type Storage struct {
	inner     driver.Storage
	st        driver.Storage
	cacheName string
	o         Options

	mu   sync.Mutex
	open bool // a cached file is open
}

var _ driver.Storage = (*Storage)(nil)

// NewStorage returns a storage that opens inner's files through a cache
// (see Wrap): the VCI file cacheName in st, or memory when cacheName is
// "". One cache file caches one source, so while a cached file is open a
// second read-only open of inner is served uncached (it reads the source
// directly, which is always right) and a second writable one is refused
// (its writes would bypass the cache). Files opened to be created or
// truncated are not cached. A cache that was filled from another file is
// discarded when opened, as Wrap does.
func NewStorage(inner driver.Storage, st driver.Storage, cacheName string, o Options) driver.Storage {
	return &Storage{inner: inner, st: st, cacheName: cacheName, o: o}
}

// Open opens name in the inner storage, through the cache.
func (s *Storage) Open(name string, flag driver.OpenFlag) (driver.File, error) {
	f, err := s.inner.Open(name, flag)
	if err != nil || flag&(driver.Create|driver.Truncate) != 0 {
		return f, err
	}
	rw := flag&driver.ReadWrite != 0
	s.mu.Lock()
	if s.open {
		s.mu.Unlock()
		if !rw {
			return f, nil
		}
		f.Close()
		return nil, driver.Errorf(driver.ErrBusy, name, -1, "its cache %q is in use by another open file", s.cacheName)
	}
	s.open = true
	s.mu.Unlock()
	cf, err := wrap(f, s.st, s.cacheName, s.o, func() {
		s.mu.Lock()
		s.open = false
		s.mu.Unlock()
	})
	if err != nil {
		f.Close()
		s.mu.Lock()
		s.open = false
		s.mu.Unlock()
		return nil, err
	}
	return cf, nil
}

// Remove, Rename, Stat, FreeSpace and List act on the inner storage.
func (s *Storage) Remove(name string) error                  { return s.inner.Remove(name) }
func (s *Storage) Rename(oldName, newName string) error      { return s.inner.Rename(oldName, newName) }
func (s *Storage) Stat(name string) (driver.FileInfo, error) { return s.inner.Stat(name) }
func (s *Storage) FreeSpace(name string) (int64, error)      { return s.inner.FreeSpace(name) }
func (s *Storage) List(dir string) ([]string, error)         { return s.inner.List(dir) }
