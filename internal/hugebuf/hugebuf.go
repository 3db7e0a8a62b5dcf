// Package hugebuf allocates large I/O buffers that the kernel may back
// with transparent huge pages.
//
// A buffer a convert worker reads into is touched page by page the first
// time: one page fault per 4 KiB, which costs several microseconds in a
// virtual machine (about a tenth of a raw-to-raw convert's CPU time was
// spent in those faults). An anonymous mapping marked MADV_HUGEPAGE takes
// one fault per 2 MiB instead, where the kernel has transparent huge pages
// enabled ("always" or "madvise"); elsewhere it behaves as ordinary memory.
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
	if n < Size {
		return make([]byte, n), func() {}
	}
	// Round up to whole huge pages and map one more, so that the buffer
	// can start on a huge page boundary.
	want := (n + Size - 1) / Size * Size
	m, err := unix.Mmap(-1, 0, want+Size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return make([]byte, n), func() {}
	}
	start := alignOffset(m)
	buf = m[start : start+want : start+want]
	// A hint: where the kernel refuses it the buffer is ordinary memory.
	_ = unix.Madvise(buf, unix.MADV_HUGEPAGE)
	var once sync.Once
	return buf[:n:n], func() { once.Do(func() { _ = unix.Munmap(m) }) }
}

// alignOffset is the offset of the first huge page boundary in m.
func alignOffset(m []byte) int {
	p := uintptr(unsafe.Pointer(unsafe.SliceData(m)))
	return int((Size - p%Size) % Size)
}
