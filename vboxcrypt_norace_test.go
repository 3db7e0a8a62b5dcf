//go:build !race

package vdisk_test

// The model's operation count without the race detector (see
// vboxcrypt_race_test.go).
const vboxModelOps = 10000
