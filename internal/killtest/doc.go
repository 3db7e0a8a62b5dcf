// Package killtest holds the process-crash tests of every writable format
// (issue 21): a process killed at any moment, with the kernel alive, must
// leave an image that qemu-img check and vdisk's Check accept (or one
// whose own dirty flag asks for the repair the next open does), with every
// flushed write readable.
//
// The package has only tests. kill_test.go re-executes the test binary as
// a child that writes through the library under a random load and is
// killed with SIGKILL at random moments; stop_test.go runs the same load
// on storage/faultfs, stopping the world after a chosen write, for many
// write indices. The formats are the rows of rows_test.go: a format added
// later is one more row.
package killtest
