// Command rsswrap runs a command and writes its peak RSS (KiB) to a file:
//
//	rsswrap OUTFILE COMMAND [ARG...]
//
// TestConvertPeakRSS measures vdisk through it. A child started straight
// from the test binary reports the test binary's RSS as its own peak:
// Go starts children with vfork semantics (CLONE_VM), and exec records
// the peak of the address space it leaves, here the parent's. This small
// process leaves a small one. It exits with the command's status.
package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: rsswrap OUTFILE COMMAND [ARG...]")
		os.Exit(2)
	}
	cmd := exec.Command(os.Args[2], os.Args[3:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		fmt.Fprintln(os.Stderr, "rsswrap:", err)
		os.Exit(2)
	}
	ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	if !ok {
		fmt.Fprintln(os.Stderr, "rsswrap: no resource usage")
		os.Exit(2)
	}
	if err := os.WriteFile(os.Args[1], fmt.Appendf(nil, "%d\n", ru.Maxrss), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "rsswrap:", err)
		os.Exit(2)
	}
	os.Exit(cmd.ProcessState.ExitCode())
}
