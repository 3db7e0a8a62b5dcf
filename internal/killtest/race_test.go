//go:build race

package killtest

// raceOn: the race detector slows the in-process load several times; the
// storage-level test then uses smaller requests (the same write indices).
const raceOn = true
