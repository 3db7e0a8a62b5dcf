//go:build !race

package killtest

const raceOn = false
