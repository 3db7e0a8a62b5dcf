// Package sockpair gives tests a connected pair of unix stream sockets as
// net.UnixConns (kernel sockets: SyscallConn works, as it does for a
// server's accepted connections).
package sockpair

import (
	"net"
	"os"
	"syscall"
	"testing"
)

// Unix returns both ends of a socketpair(2); the test's cleanup closes them.
func Unix(t testing.TB) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c.(*net.UnixConn)
	}
	return conn(fds[0]), conn(fds[1])
}
