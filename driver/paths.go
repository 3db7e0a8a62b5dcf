package driver

import (
	"errors"
	"fmt"
	"path"
	"path/filepath"
	"strings"
	"sync"
)

// PathPolicy says which file names recorded inside an image (a backing
// file, a VHD parent locator, a VMDK extent, a qcow2 external data file)
// may be followed. The zero value is PathStrict.
type PathPolicy int

const (
	// PathStrict, the library's default, follows a recorded name only when
	// the file it leads to lies in the referring image's directory or
	// below, checked on the real path (no symbolic link may lead out, see
	// BeneathOpener), and is a regular file (no device, FIFO, socket or
	// directory). Absolute names, names that climb out with "..", and
	// network names (URLs) are refused. It is the policy for images that
	// come from someone else: uploads, network clients.
	PathStrict PathPolicy = iota
	// PathTrusted follows recorded names wherever they point, as qemu-img
	// does: for images the user made or vouches for.
	PathTrusted
)

func (p PathPolicy) String() string {
	switch p {
	case PathStrict:
		return "strict"
	case PathTrusted:
		return "trusted"
	}
	return fmt.Sprintf("PathPolicy(%d)", int(p))
}

// BeneathOpener is an optional Storage capability: OpenBeneath opens rel (a
// relative, clean, slash-separated name) inside directory dir such that
// every component is resolved inside dir on the real file system (a
// symbolic link that leads out of dir, an absolute symbolic link and a
// "magic" /proc link are refused), and the result must be a regular file.
// Opening never blocks on a FIFO. Refusals are *PathError values (Image and
// Field left empty); a missing file is an ordinary not-found error.
//
// Storages without the capability (memfs, which has no links) are confined
// by the name checks of OpenReferenced alone.
type BeneathOpener interface {
	OpenBeneath(dir, rel string, flag OpenFlag) (File, error)
}

// PathError is a name refused by the strict path policy. It unwraps to
// ErrInvalidOption (and to the OS error behind the refusal, if any).
type PathError struct {
	Image  string // the image that records the name ("" when not known)
	Field  string // what the name is: "backing file", "extent file", "data file"
	Name   string // the name as recorded
	Reason string // "is an absolute path", "leads outside ... through a symbolic link", ...
	Err    error  // the OS error behind the refusal; may be nil
}

func (e *PathError) Error() string {
	field := e.Field
	if field == "" {
		field = "file"
	}
	return fmt.Sprintf("%s %q %s; refusing to follow it under the strict path policy (only a trusted image may name files outside its directory)", field, e.Name, e.Reason)
}

func (e *PathError) Unwrap() []error {
	if e.Err == nil {
		return []error{ErrInvalidOption}
	}
	return []error{ErrInvalidOption, e.Err}
}

// refusal wraps pe in the *Error every open failure is: the image's name
// first, then the field, the name and why.
func refusal(pe *PathError) error {
	return &Error{Op: "open", File: pe.Image, Offset: -1, Err: pe}
}

// Reference is one file name an image records, as its driver met it.
type Reference struct {
	Field string `json:"field"`
	Name  string `json:"name"`           // as recorded in the image
	Path  string `json:"path,omitempty"` // as resolved against the image's directory
	// Refused says why the path policy refused to open it; empty when the
	// file was followed.
	Refused string `json:"refused,omitempty"`
}

// ReferenceLog collects the references an image's driver opened or was
// refused through OpenReferenced; the container shows them (vdisk info
// --untrusted lists them so a service can reject images that have any).
// Safe for concurrent use; the zero value is ready.
type ReferenceLog struct {
	mu   sync.Mutex
	list []Reference
}

// Add records r.
func (l *ReferenceLog) Add(r Reference) {
	if l == nil {
		return
	}
	l.mu.Lock()
	l.list = append(l.list, r)
	l.mu.Unlock()
}

// List returns the recorded references in the order they were met.
func (l *ReferenceLog) List() []Reference {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]Reference(nil), l.list...)
}

// Policy is the path policy the driver must apply (Paths).
func (p *OpenParams) Policy() PathPolicy { return p.Paths }

// OpenReferenced opens a file that the image p.Name names inside itself (a
// VMDK extent, a qcow2 external data file, a Parallels bundle's .hds file):
// the one place a driver turns a recorded name into an open file, so the
// path policy holds for every format. ref is resolved against the image's
// directory; the resolved name is returned with the file. field says what
// the name is ("extent file", "data file") for error messages.
//
// Under PathStrict (p.Policy()) an absolute name, a name that climbs out of
// the image's directory, and a URL are refused, and the file is opened with
// the storage's BeneathOpener where it has one (so a symbolic link leading
// out, a device or a FIFO is refused too). A refusal is a *PathError
// naming the image, the field and the name.
//
// When the image is opened InfoOnly, a refused reference does not fail the
// open: it is recorded (p.References) and a stand-in file is returned
// whose every operation fails with the refusal, so `info` can still show
// the image and every name it refers to without touching those files.
func (p OpenParams) OpenReferenced(field, ref string, flag OpenFlag) (File, string, error) {
	trusted := p.Policy() == PathTrusted
	full, err := ResolveReferenced(p.Name, field, ref, trusted)
	if err != nil {
		return p.refused(field, ref, full, err)
	}
	var f File
	if trusted {
		f, err = p.Storage.Open(full, flag)
	} else {
		rel := path.Clean(ref)
		if path.IsAbs(rel) {
			rel, _ = AbsWithin(p.Name, ref)
		}
		f, err = OpenBeneath(p.Storage, path.Dir(p.Name), rel, flag)
	}
	if err != nil {
		var pe *PathError
		if errors.As(err, &pe) {
			pe.Image, pe.Field, pe.Name = p.Name, field, ref
			return p.refused(field, ref, full, refusal(pe))
		}
		return nil, "", err
	}
	p.References.Add(Reference{Field: field, Name: ref, Path: full})
	return f, full, nil
}

// refused records a refusal and, for an InfoOnly open, returns the stand-in
// file instead of failing.
func (p OpenParams) refused(field, ref, full string, err error) (File, string, error) {
	var pe *PathError
	if !errors.As(err, &pe) {
		return nil, "", err
	}
	p.References.Add(Reference{Field: field, Name: ref, Path: full, Refused: pe.Reason})
	if !p.InfoOnly {
		return nil, "", err
	}
	if p.Logger != nil {
		p.Logger.Warn("not following a file name the image records", "field", field, "name", ref, "reason", pe.Reason)
	}
	return refusedFile{name: ref, err: err}, full, nil
}

// OpenBeneath opens rel inside dir with st's BeneathOpener, or, for a
// storage without one, opens the joined name (the caller has checked the
// name lexically).
func OpenBeneath(st Storage, dir, rel string, flag OpenFlag) (File, error) {
	if bo, ok := st.(BeneathOpener); ok {
		return bo.OpenBeneath(dir, rel, flag)
	}
	return st.Open(path.Join(dir, rel), flag)
}

// ResolveReferenced resolves ref, recorded in image, against image's
// directory under the path policy (unsafe: trusted). It checks names only;
// OpenReferenced also checks what the name leads to. A refusal is a
// *PathError (inside an *Error naming image); the joined name is returned
// with it when there is one.
func ResolveReferenced(image, field, ref string, unsafe bool) (string, error) {
	refuse := func(full, reason string) (string, error) {
		return full, refusal(&PathError{Image: image, Field: field, Name: ref, Reason: reason})
	}
	if ref == "" {
		return "", Errorf(ErrInvalidOption, image, -1, "%s name is empty", field)
	}
	if strings.Contains(ref, "\x00") {
		return "", Errorf(ErrInvalidOption, image, -1, "%s %q contains a NUL byte", field, ref)
	}
	if IsURL(ref) {
		if !unsafe {
			return refuse(ref, "is a URL")
		}
		return ref, nil
	}
	if path.IsAbs(ref) || strings.HasPrefix(ref, `\`) || (len(ref) > 1 && ref[1] == ':') {
		if !unsafe {
			// qemu-img create -b /abs/dir/base records absolute names;
			// one that leads into the image's own directory is as safe
			// as the relative name it stands for.
			if rel, ok := AbsWithin(image, ref); ok {
				return path.Join(path.Dir(image), rel), nil
			}
			return refuse(path.Clean(ref), "is an absolute path outside the image's directory")
		}
		return path.Clean(ref), nil
	}
	clean := path.Clean(ref)
	full := path.Join(path.Dir(image), clean)
	if (clean == ".." || strings.HasPrefix(clean, "../")) && !unsafe {
		return refuse(full, "leaves the image's directory")
	}
	return full, nil
}

// AbsWithin reports whether the absolute name ref (a local path) lies in
// the directory of image or below, lexically, and returns it relative to
// that directory. A relative image name is taken against the working
// directory. What the name leads to (links, devices) is checked when it
// is opened beneath the directory.
func AbsWithin(image, ref string) (string, bool) {
	if !filepath.IsAbs(ref) {
		return "", false
	}
	dir, err := filepath.Abs(filepath.Dir(image))
	if err != nil {
		return "", false
	}
	rel, err := filepath.Rel(dir, filepath.Clean(ref))
	if err != nil || rel == "." || rel == ".." || strings.HasPrefix(rel, "../") || filepath.IsAbs(rel) {
		return "", false
	}
	return filepath.ToSlash(rel), true
}

// IsURL reports whether name has a URL scheme ("nbd://", "https://").
func IsURL(name string) bool {
	i := strings.Index(name, "://")
	return i > 0 && !strings.ContainsAny(name[:i], "/\\")
}

// refusedFile stands in for a file the path policy refused to open in an
// InfoOnly image: every operation fails with the refusal.
type refusedFile struct {
	name string
	err  error
}

func (f refusedFile) ReadAt([]byte, int64) (int, error)  { return 0, f.err }
func (f refusedFile) WriteAt([]byte, int64) (int, error) { return 0, f.err }
func (f refusedFile) Name() string                       { return f.name }
func (f refusedFile) Size() (int64, error)               { return 0, f.err }
func (f refusedFile) Truncate(int64) error               { return f.err }
func (f refusedFile) Sync() error                        { return nil } // nothing was written
func (f refusedFile) PunchHole(int64, int64) error       { return f.err }
func (f refusedFile) Close() error                       { return nil }
