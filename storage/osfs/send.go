package osfs

import (
	"errors"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/vdisk/vdisk/driver"
)

// sendChunk bounds one sendfile(2) call (the kernel's own limit is just
// under 2 GiB).
const sendChunk = 1 << 30

// sendState is one SendTo call's state. The callbacks that Control and
// Write take are bound once per pooled state, so that a send allocates
// nothing.
type sendState struct {
	rc             syscall.RawConn
	sfd            int
	off, n, sent   int64
	err, werr      error
	control        func(fd uintptr)
	write          func(fd uintptr) bool
	controlStarted bool
}

var sendStates = sync.Pool{New: func() any {
	s := &sendState{}
	s.control = s.withFile
	s.write = s.toSocket
	return s
}}

// withFile runs with the file's descriptor held: it sends through the
// connection's Write, which waits for room in the socket.
func (s *sendState) withFile(fd uintptr) {
	s.sfd = int(fd)
	s.controlStarted = true
	s.werr = s.rc.Write(s.write)
}

// toSocket sends what it can; false asks Write to wait until the socket
// has room.
func (s *sendState) toSocket(dfd uintptr) bool {
	for s.sent < s.n {
		pos := s.off + s.sent
		k, err := unix.Sendfile(int(dfd), s.sfd, &pos, int(min(s.n-s.sent, sendChunk)))
		if k > 0 {
			s.sent += int64(k)
		}
		switch {
		case err == unix.EAGAIN:
			return false
		case err == unix.EINTR:
			continue
		case err != nil:
			s.err = err
			return true
		case k == 0:
			return true // the file ended
		}
	}
	return true
}

// SendTo implements driver.FileSender: n bytes of the file from off go to
// the socket behind rc by sendfile(2), without passing through user space
// (on a unix socket the pages are attached to the message, not copied).
// Waiting for room in the socket follows its write deadline. It fails with
// an error wrapping driver.ErrUnsupported, having sent nothing, where it
// cannot (an O_DIRECT file, a kernel that cannot sendfile there). Fewer
// than n bytes are sent, without an error, when the file ends first.
func (f *File) SendTo(rc syscall.RawConn, off, n int64) (int64, error) {
	if err := checkRange("send", f.name, off, n); err != nil {
		return 0, err
	}
	if f.direct {
		return 0, driver.Errorf(driver.ErrUnsupported, f.name, off, "send: the file is open with O_DIRECT")
	}
	s := sendStates.Get().(*sendState)
	s.rc, s.off, s.n, s.sent, s.err, s.werr, s.controlStarted = rc, off, n, 0, nil, nil, false
	cerr := f.rc.Control(s.control)
	sent, serr := s.sent, s.err
	if serr == nil {
		serr = s.werr
	}
	started := s.controlStarted
	s.rc, s.err, s.werr = nil, nil, nil
	sendStates.Put(s)
	if cerr != nil || !started {
		// Control fails only on a closed (or closing) file.
		return 0, wrap("send", f.name, off, "", os.ErrClosed)
	}
	if serr != nil && sent == 0 && (errors.Is(serr, unix.EINVAL) || errors.Is(serr, unix.ENOSYS) || errors.Is(serr, unix.EOPNOTSUPP)) {
		return 0, &driver.Error{Op: "send", File: f.name, Offset: off, Reason: "the kernel cannot send from this file to the connection",
			Err: &osError{err: serr, sentinel: driver.ErrUnsupported}}
	}
	if serr != nil {
		return sent, wrap("send", f.name, off+sent, "to the connection", serr)
	}
	return sent, nil
}
