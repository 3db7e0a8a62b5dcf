//go:build !race

package nbd

// allocTolerance is the allocations per request TestRequestAllocs lets
// pass: none but a rare one of the runtime's own.
const allocTolerance = 0.02

// allocRunsScale multiplies the requests measured (see the race build's).
const allocRunsScale = 1
