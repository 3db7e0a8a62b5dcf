package driver

import (
	"errors"
	"fmt"
	"strings"
)

// Sentinel errors. Every error a driver or the container returns wraps one of
// these (or an underlying OS error), so callers can test with errors.Is.
var (
	// ErrCorrupt: the image's metadata is inconsistent or hostile.
	ErrCorrupt = errors.New("corrupt image")
	// ErrUnsupported: a valid feature this build or this format does not handle.
	ErrUnsupported = errors.New("unsupported")
	// ErrReadOnly: a write to an image or layer opened read-only.
	ErrReadOnly = errors.New("read-only")
	// ErrInvalidOption: an unknown, ill-typed or out-of-range option or argument.
	ErrInvalidOption = errors.New("invalid option")
	// ErrNotFound: a file, format, parent or snapshot that does not exist.
	ErrNotFound = errors.New("not found")
	// ErrBusy: the image is locked by another writer.
	ErrBusy = errors.New("busy")
	// ErrOutOfRange: an access past the end of the virtual disk.
	ErrOutOfRange = errors.New("out of range")
	// ErrClosed: a use of a disk or image after Close.
	ErrClosed = errors.New("closed")
)

// Error carries the context of a failure: which operation, on which file, at
// which offset, and why. Err is the sentinel (or OS error) it wraps.
type Error struct {
	Op     string // "open", "read", "write", "create", ...
	File   string // file name, may be empty
	Offset int64  // byte offset the problem concerns; -1 when none
	Reason string // human explanation; may be empty
	Err    error
}

func (e *Error) Error() string {
	s := ""
	if e.File != "" {
		s = e.File + ": "
	}
	if e.Op != "" {
		s += e.Op + ": "
	}
	if e.Offset >= 0 {
		s += fmt.Sprintf("at offset %d (0x%x): ", e.Offset, e.Offset)
	}
	if e.Reason != "" {
		s += e.Reason
		// A reason built with the cause already in it ("...: %v", err)
		// does not repeat it.
		if e.Err != nil {
			if cause := e.Err.Error(); !strings.Contains(e.Reason, cause) {
				s += " (" + cause + ")"
			}
		}
		return s
	}
	if e.Err != nil {
		s += e.Err.Error()
	}
	return s
}

func (e *Error) Unwrap() error { return e.Err }

// Errorf builds an *Error wrapping err with a formatted reason. Use off = -1
// when no offset applies.
func Errorf(err error, file string, off int64, format string, args ...any) error {
	return &Error{File: file, Offset: off, Reason: fmt.Sprintf(format, args...), Err: err}
}

// Corruptf reports corrupt metadata in file at off.
func Corruptf(file string, off int64, format string, args ...any) error {
	return Errorf(ErrCorrupt, file, off, format, args...)
}

// Unsupportedf reports an unsupported feature of file.
func Unsupportedf(file string, format string, args ...any) error {
	return Errorf(ErrUnsupported, file, -1, format, args...)
}

// OptionErrorf reports an invalid option or argument.
func OptionErrorf(format string, args ...any) error {
	return Errorf(ErrInvalidOption, "", -1, format, args...)
}

// WithFile wraps err with a file name and operation unless it already names
// that file.
func WithFile(err error, op, file string) error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) && e.File != "" {
		return err
	}
	return &Error{Op: op, File: file, Offset: -1, Err: err}
}
