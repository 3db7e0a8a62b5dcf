//go:build race

package luks

// raceEnabled shrinks the model runs: the race detector slows AES tenfold.
const raceEnabled = true
