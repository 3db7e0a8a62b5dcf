//go:build race

package nbd

// allocTolerance is the allocations per request TestRequestAllocs lets
// pass under the race detector, whose sync.Pool drops a quarter of what
// is put back on purpose (a pooled buffer is then allocated anew, with
// its pointer): below one per request, so an allocation every request
// still fails.
const allocTolerance = 0.9

// allocRunsScale multiplies the requests measured: the drops are random,
// so more requests keep the average near its expected 0.5 (two
// allocations, buffer and pointer, for a quarter of the pooled buffers).
const allocRunsScale = 4
