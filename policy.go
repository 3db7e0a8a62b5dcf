package vdisk

import (
	"errors"
	"path/filepath"
	"strings"

	"github.com/vdisk/vdisk/driver"
)

// confined is the storage a layer opened through a recorded name sees under
// the strict path policy: its own file (name) is opened beneath the
// referring image's directory dir as rel, so a symbolic link leading out
// of dir, a device or a FIFO is refused on the real path, not just by the
// name's text. Every later open of the layer (a reopen for a live job)
// goes through it too. Other names pass through to the storage.
type confined struct {
	driver.Storage
	name, dir, rel string
	child          string // the referring image, for messages
}

var _ driver.BeneathOpener = (*confined)(nil)

// confine wraps st so that inner, the name a parent reference of the image
// child (at childPath in its storage) resolved to, is opened beneath
// childPath's directory.
func confine(st driver.Storage, child, childPath, inner string) driver.Storage {
	if c, ok := st.(*confined); ok {
		st = c.Storage
	}
	dir := filepath.Dir(childPath)
	rel, err := filepath.Rel(dir, inner)
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") || filepath.IsAbs(rel) {
		// A resolver placed the name elsewhere: confine it to its own
		// directory.
		dir, rel = filepath.Dir(inner), filepath.Base(inner)
	}
	return &confined{Storage: st, name: inner, dir: dir, rel: filepath.ToSlash(rel), child: child}
}

func (c *confined) Open(name string, flag driver.OpenFlag) (driver.File, error) {
	if name != c.name {
		return c.Storage.Open(name, flag)
	}
	f, err := driver.OpenBeneath(c.Storage, c.dir, c.rel, flag)
	var pe *driver.PathError
	if errors.As(err, &pe) && pe.Image == "" {
		pe.Image, pe.Field, pe.Name = c.child, "backing file", name
		return nil, &Error{Op: "open", File: c.child, Offset: -1, Err: pe}
	}
	return f, err
}

// OpenBeneath passes the drivers' own references (checked against the
// layer's directory by driver.OpenParams.OpenReferenced) to the storage.
func (c *confined) OpenBeneath(dir, rel string, flag driver.OpenFlag) (driver.File, error) {
	return driver.OpenBeneath(c.Storage, dir, rel, flag)
}

// References lists the file names the layer's image records and its driver
// opened itself (extent files, a data file), with the ones the path policy
// refused (an image opened InfoOnly still opens then; the refused files
// are never touched). The parent reference is ParentRef.
func (l *Layer) References() []driver.Reference { return l.refs.List() }
