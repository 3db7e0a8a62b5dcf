// Package prealloc holds the file-level part of qemu's preallocation modes
// shared by the drivers that offer them (raw, vhd, qcow2): validating a
// mode, reserving space through the storage's fallocate (driver.Allocator)
// and writing zeros. What a mode means for a format's own metadata (qcow2's
// metadata mode) stays in the format.
package prealloc

import (
	"context"
	"strings"

	"github.com/vdisk/vdisk/driver"
)

// The preallocation modes, as qemu names them; "" means Off.
const (
	Off      = "off"      // nothing is allocated
	Metadata = "metadata" // the format's metadata maps the range (qcow2)
	Falloc   = "falloc"   // the file's blocks are reserved (fallocate)
	Full     = "full"     // the file's blocks are written with zeros
)

// Active reports whether mode asks for any preallocation.
func Active(mode string) bool { return mode != "" && mode != Off }

// Check accepts "", Off and the given modes; anything else is an option
// error naming them. format, when not empty, is named in the error.
func Check(format, mode string, modes ...string) error {
	if mode == "" || mode == Off {
		return nil
	}
	for _, m := range modes {
		if mode == m {
			return nil
		}
	}
	what := ""
	if format != "" {
		what = " for " + format
	}
	return driver.OptionErrorf("invalid preallocation mode %q%s (%s)", mode, what, strings.Join(append([]string{Off}, modes...), ", "))
}

// Usable checks before anything is changed that f can do mode: Falloc needs
// a storage that can reserve space. name is the image, for the error.
func Usable(f driver.File, name, mode string) error {
	if _, ok := f.(driver.Allocator); !ok && mode == Falloc {
		return unsupported(name)
	}
	return nil
}

// File does the file-level part of mode for [off, off+n) of f: Falloc
// reserves the range, Full writes zeros over it (checking ctx between
// pieces); "", Off and Metadata leave the file alone. Other modes are an
// option error. name is the image, for errors.
func File(ctx context.Context, f driver.File, name, mode string, off, n int64) error {
	switch mode {
	case "", Off, Metadata:
		return nil
	case Falloc:
		a, ok := f.(driver.Allocator)
		if !ok {
			return unsupported(name)
		}
		return a.Allocate(off, n)
	case Full:
		return driver.WriteZerosContext(ctx, f, off, n)
	}
	return Check("", mode, Metadata, Falloc, Full)
}

func unsupported(name string) error {
	return driver.Unsupportedf(name, "the storage cannot preallocate (preallocation=falloc); use full")
}
