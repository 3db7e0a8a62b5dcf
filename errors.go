// Package vdisk is a library for virtual disk images: a container that opens
// a chain of images (a base and differencing images on top), reads through
// it, writes to its top with copy-on-write, and offers the operations of
// qemu-img and VirtualBox's VD library (create, convert, map, compare, ...).
// Format drivers live in format/<name> and register with package driver;
// import github.com/vdisk/vdisk/format/all to get all of them.
package vdisk

import "github.com/vdisk/vdisk/driver"

// Sentinel errors, shared with package driver; test with errors.Is.
var (
	ErrCorrupt       = driver.ErrCorrupt
	ErrUnsupported   = driver.ErrUnsupported
	ErrReadOnly      = driver.ErrReadOnly
	ErrInvalidOption = driver.ErrInvalidOption
	ErrNotFound      = driver.ErrNotFound
	ErrBusy          = driver.ErrBusy
	ErrOutOfRange    = driver.ErrOutOfRange
	ErrClosed        = driver.ErrClosed
)

// Error is the error type carrying file, offset and reason.
type Error = driver.Error

// Progress reports done out of total units (bytes of virtual size for
// convert and copy).
type Progress = driver.Progress
