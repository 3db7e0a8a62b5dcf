// Package hugebuf allocates large I/O buffers that the kernel may back
// with transparent huge pages.
//
// A buffer a convert worker reads into is touched page by page the first
// time: one page fault per 4 KiB, which costs several microseconds in a
// virtual machine (about a tenth of a raw-to-raw convert's CPU time was
// spent in those faults). An anonymous mapping marked MADV_HUGEPAGE takes
// one fault per 2 MiB instead, where the kernel has transparent huge pages
// enabled ("always" or "madvise"); elsewhere it behaves as ordinary memory.
// An Arena cuts one such buffer into pieces for buffers smaller than a
// huge page that are reused many times (a compressed convert's slabs).
package hugebuf

import (
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Size is the huge page size the buffers are aligned to.
const Size = 2 << 20

// Alloc returns a zeroed buffer of n bytes and the function that frees
// it. Buffers of Size or more live outside the Go heap: the caller must
// call free exactly when nothing uses buf any more (free is idempotent);
// using buf after free crashes the process. Smaller buffers, and any
// buffer when the mapping fails, come from the Go heap and free does
// nothing.
func Alloc(n int) (buf []byte, free func()) {
	if n >= Size {
		if buf, free, ok := mapHuge(n); ok {
			return buf, free
		}
	}
	return make([]byte, n), func() {}
}

// mapHuge maps n bytes (n >= Size) starting on a huge page boundary; ok
// is false when the mapping fails.
func mapHuge(n int) (buf []byte, free func(), ok bool) {
	// Round up to whole huge pages and map one more, so that the buffer
	// can start on a huge page boundary.
	want := (n + Size - 1) / Size * Size
	m, err := unix.Mmap(-1, 0, want+Size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, nil, false
	}
	start := alignOffset(m)
	buf = m[start : start+want : start+want]
	// A hint: where the kernel refuses it the buffer is ordinary memory.
	_ = unix.Madvise(buf, unix.MADV_HUGEPAGE)
	var once sync.Once
	return buf[:n:n], func() { once.Do(func() { _ = unix.Munmap(m) }) }, true
}

// alignOffset is the offset of the first huge page boundary in m.
func alignOffset(m []byte) int {
	p := uintptr(unsafe.Pointer(unsafe.SliceData(m)))
	return int((Size - p%Size) % Size)
}

// Arena is one huge-page mapping cut into pieces of equal size, for
// buffers that a job reuses many times and whose last use may end on
// another goroutine after the job itself (a read buffer lent to a write
// pipeline). The memory is freed once the arena is closed and no piece is
// in use; until then it stays mapped.
//
// Piece hands out each piece once; the caller keeps and reuses it, and
// brackets every use with Acquire and Release.
type Arena struct {
	mu     sync.Mutex
	mem    []byte
	free   func()
	piece  int
	next   int // offset of the first piece not handed out
	inUse  int
	closed bool
}

// MaxArena bounds the memory of one arena.
const MaxArena = 64 << 20

// NewArena maps n pieces of size bytes each, or as many as MaxArena
// holds. Where that is less than one huge page, or the mapping fails, the
// arena has no pieces: the caller's buffers then come from the heap as
// they would without it (a failed mapping is not retried as one large
// heap allocation).
func NewArena(size, n int) *Arena {
	a := &Arena{piece: size, free: func() {}}
	if size <= 0 || n <= 0 {
		return a
	}
	n = min(n, MaxArena/size)
	if size*n < Size {
		return a
	}
	if mem, free, ok := mapHuge(size * n); ok {
		a.mem, a.free = mem, free
	}
	return a
}

// Piece returns a piece not handed out before, or nil when none is left
// (or the arena is closed).
func (a *Arena) Piece() []byte {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed || a.piece <= 0 || a.next+a.piece > len(a.mem) {
		return nil
	}
	p := a.mem[a.next : a.next+a.piece : a.next+a.piece]
	a.next += a.piece
	return p
}

// Acquire marks one use of a piece as begun.
func (a *Arena) Acquire() {
	a.mu.Lock()
	a.inUse++
	a.mu.Unlock()
}

// Release ends one use begun by Acquire; the last one after Close frees
// the memory.
func (a *Arena) Release() {
	a.mu.Lock()
	a.inUse--
	last := a.closed && a.inUse == 0
	a.mu.Unlock()
	if last {
		a.free()
	}
}

// Close frees the memory now if no piece is in use, else at the last
// Release. No piece may be acquired after Close.
func (a *Arena) Close() {
	a.mu.Lock()
	was := a.closed
	a.closed = true
	last := !was && a.inUse == 0
	a.mu.Unlock()
	if last {
		a.free()
	}
}

// Freed reports whether the memory has been freed (for tests).
func (a *Arena) Freed() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.closed && a.inUse == 0
}
