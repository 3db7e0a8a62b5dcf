// Package bufpool recycles byte buffers of one length (a cache block, a
// table block): code that moves many of them at once otherwise allocates
// its whole volume.
package bufpool

import "sync"

// Pool holds buffers of Size bytes. Set Size before the first Get; the
// zero Pool is otherwise ready. It is safe for concurrent use.
type Pool struct {
	Size int
	p    sync.Pool // *[]byte
}

// Get returns a buffer of Size bytes; its content is undefined.
func (p *Pool) Get() []byte {
	if b, ok := p.p.Get().(*[]byte); ok && len(*b) == p.Size {
		return *b
	}
	return make([]byte, p.Size)
}

// Put gives b back for reuse; a buffer of another length is dropped.
func (p *Pool) Put(b []byte) {
	if len(b) == p.Size {
		p.p.Put(&b)
	}
}
