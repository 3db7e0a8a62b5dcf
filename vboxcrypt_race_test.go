//go:build race

package vdisk_test

// Under the race detector (test.sh) the model runs fewer operations: the
// instrumented AES-XTS and PBKDF2 are ~10x slower. Without it, 10^4.
const vboxModelOps = 1000
