package luks

import "runtime"

// heapGrowth is the heap in use after fn minus before (a rough bound: the
// collector runs first).
func heapGrowth(fn func()) uint64 {
	var a, b runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&a)
	fn()
	runtime.ReadMemStats(&b)
	if b.TotalAlloc < a.TotalAlloc {
		return 0
	}
	return b.TotalAlloc - a.TotalAlloc
}
