package vboxcrypt

import (
	"context"

	"github.com/vdisk/vdisk/driver"
)

// Image is an image seen through VirtualBox's crypt filter: reads decrypt,
// writes encrypt, sector by sector with the virtual sector number as the
// tweak. Status runs are the inner image's (Data runs with Offset -1, so
// nothing copies ciphertext as data). It offers the inner image's
// identity, geometry, comment, parent, resize, check and make-empty; not
// Zeroer or Discarder, so zeroes are written as encrypted zero sectors
// (VirtualBox decrypts every sector it reads).
type Image struct {
	inner driver.Image
	name  string
	c     *Cipher
}

// Wrap puts the filter over inner. The image's size must be whole sectors.
func Wrap(inner driver.Image, name string, c *Cipher) (*Image, error) {
	if inner.Size()%SectorSize != 0 {
		return nil, driver.Unsupportedf(name, "VirtualBox encryption needs a size in whole 512-byte sectors, the image has %d bytes", inner.Size())
	}
	return &Image{inner: inner, name: name, c: c}, nil
}

// Inner is the wrapped image.
func (m *Image) Inner() driver.Image { return m.inner }

// Cipher is the sector cipher.
func (m *Image) Cipher() *Cipher { return m.c }

func (m *Image) Size() int64               { return m.inner.Size() }
func (m *Image) Flush() error              { return m.inner.Flush() }
func (m *Image) Close() error              { return m.inner.Close() }
func (m *Image) Info() driver.Info         { return m.inner.Info() }
func (m *Image) Parent() *driver.ParentRef { return m.inner.Parent() }

func (m *Image) Status(off, n int64) (driver.Extent, error) {
	e, err := m.inner.Status(off, n)
	if err == nil && e.State == driver.Data {
		e.Offset = -1
	}
	return e, err
}

func align(off, end int64) (int64, int64) {
	return off &^ (SectorSize - 1), (end + SectorSize - 1) &^ (SectorSize - 1)
}

func (m *Image) ReadAt(p []byte, off int64) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	a, e := align(off, off+int64(len(p)))
	if a == off && e == off+int64(len(p)) {
		if _, err := m.inner.ReadAt(p, off); err != nil {
			return 0, err
		}
		m.c.Decrypt(p, p, uint64(off/SectorSize))
		return len(p), nil
	}
	buf := make([]byte, e-a)
	if _, err := m.inner.ReadAt(buf, a); err != nil {
		return 0, err
	}
	m.c.Decrypt(buf, buf, uint64(a/SectorSize))
	copy(p, buf[off-a:])
	clear(buf)
	return len(p), nil
}

// unitSize is the inner image's allocation unit (at least a sector).
func (m *Image) unitSize() int64 {
	cs := m.inner.Info().ClusterSize
	if cs < SectorSize || cs%SectorSize != 0 || cs > 64<<20 {
		return SectorSize
	}
	return cs
}

// compose fills buf (which starts at base) over [from, to) with the
// plaintext the image shows there: Data runs are read and decrypted (whole
// sectors), Zero runs and unallocated runs of an image without a parent are
// zeros, and an unallocated run over a parent asks for a fill of
// [fa, fe).
func (m *Image) compose(buf []byte, base, from, to, fa, fe int64) error {
	for pos := from; pos < to; {
		st, err := m.inner.Status(pos, to-pos)
		if err != nil {
			return err
		}
		if st.Length <= 0 || st.Length > to-pos {
			return driver.Corruptf(m.name, pos, "status run of %d bytes for a request of %d", st.Length, to-pos)
		}
		runEnd := pos + st.Length
		switch st.State {
		case driver.Data:
			sa, se := align(pos, runEnd)
			seg := buf[sa-base : se-base]
			if _, err := m.inner.ReadAt(seg, sa); err != nil {
				return err
			}
			m.c.Decrypt(seg, seg, uint64(sa/SectorSize))
		case driver.Unallocated:
			if m.inner.Parent() != nil {
				return driver.NeedFill(m.name, fa, fe)
			}
			clear(buf[pos-base : runEnd-base])
		default:
			clear(buf[pos-base : runEnd-base])
		}
		pos = runEnd
	}
	return nil
}

// WriteAt encrypts whole sectors. A partial sector is completed with what
// the image shows there. A write that starts or ends in an allocation unit
// the image does not hold as data is widened to the whole unit, the rest
// of it written as encrypted zeros (or, over a parent, filled from the
// chain by the container): the inner image would otherwise fill it with
// plain zeros, which read back as noise through the filter.
func (m *Image) WriteAt(p []byte, off int64) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	end := off + int64(len(p))
	a, e := align(off, end)
	us := m.unitSize()
	if us > SectorSize {
		if st, err := m.inner.Status(a, SectorSize); err != nil {
			return 0, err
		} else if st.State != driver.Data {
			a = a / us * us
		}
		if st, err := m.inner.Status(e-SectorSize, SectorSize); err != nil {
			return 0, err
		} else if st.State != driver.Data {
			e = min((e+us-1)/us*us, m.inner.Size())
		}
	}
	buf := make([]byte, e-a)
	defer clear(buf)
	if a != off {
		if err := m.compose(buf, a, a, off, a, e); err != nil {
			return 0, err
		}
	}
	if e != end {
		if err := m.compose(buf, a, end, e, a, e); err != nil {
			return 0, err
		}
	}
	copy(buf[off-a:], p)
	m.c.Encrypt(buf, buf, uint64(a/SectorSize))
	if _, err := m.inner.WriteAt(buf, a); err != nil {
		return 0, err
	}
	return len(p), nil
}

// The inner image's optional interfaces, forwarded.

func unsupported(name, what string) error {
	return driver.Unsupportedf(name, "%s is not supported by this format", what)
}

func (m *Image) Resize(ctx context.Context, size int64, prealloc string) error {
	if size%SectorSize != 0 {
		return driver.Errorf(driver.ErrInvalidOption, m.name, -1, "an encrypted image's size must be whole 512-byte sectors")
	}
	if r, ok := m.inner.(driver.Resizer); ok {
		return r.Resize(ctx, size, prealloc)
	}
	return unsupported(m.name, "resize")
}

func (m *Image) Check(ctx context.Context, mode driver.RepairMode) (*driver.CheckResult, error) {
	if c, ok := m.inner.(driver.Checker); ok {
		return c.Check(ctx, mode)
	}
	return nil, unsupported(m.name, "check")
}

func (m *Image) MakeEmpty() error {
	if x, ok := m.inner.(driver.Emptier); ok {
		return x.MakeEmpty()
	}
	return unsupported(m.name, "make-empty")
}

func (m *Image) SetParent(ref *driver.ParentRef) error {
	if x, ok := m.inner.(driver.Reparenter); ok {
		return x.SetParent(ref)
	}
	return unsupported(m.name, "changing the parent")
}

func (m *Image) ident() (driver.Identifier, error) {
	if x, ok := m.inner.(driver.Identifier); ok {
		return x, nil
	}
	return nil, unsupported(m.name, "UUIDs")
}

func (m *Image) UUID() string {
	if x, err := m.ident(); err == nil {
		return x.UUID()
	}
	return ""
}

func (m *Image) ModificationUUID() string {
	if x, err := m.ident(); err == nil {
		return x.ModificationUUID()
	}
	return ""
}

func (m *Image) ParentUUID() string {
	if x, err := m.ident(); err == nil {
		return x.ParentUUID()
	}
	return ""
}

func (m *Image) ParentModificationUUID() string {
	if x, err := m.ident(); err == nil {
		return x.ParentModificationUUID()
	}
	return ""
}

func (m *Image) SetUUID(u string) error {
	x, err := m.ident()
	if err != nil {
		return err
	}
	return x.SetUUID(u)
}

func (m *Image) SetModificationUUID(u string) error {
	x, err := m.ident()
	if err != nil {
		return err
	}
	return x.SetModificationUUID(u)
}

func (m *Image) SetParentUUID(u string) error {
	x, err := m.ident()
	if err != nil {
		return err
	}
	return x.SetParentUUID(u)
}

func (m *Image) SetParentModificationUUID(u string) error {
	x, err := m.ident()
	if err != nil {
		return err
	}
	return x.SetParentModificationUUID(u)
}

func (m *Image) PCHS() (driver.CHS, bool) {
	if g, ok := m.inner.(driver.Geometry); ok {
		return g.PCHS()
	}
	return driver.CHS{}, false
}

func (m *Image) LCHS() (driver.CHS, bool) {
	if g, ok := m.inner.(driver.Geometry); ok {
		return g.LCHS()
	}
	return driver.CHS{}, false
}

func (m *Image) SetPCHS(c driver.CHS) error {
	if g, ok := m.inner.(driver.Geometry); ok {
		return g.SetPCHS(c)
	}
	return unsupported(m.name, "geometry")
}

func (m *Image) SetLCHS(c driver.CHS) error {
	if g, ok := m.inner.(driver.Geometry); ok {
		return g.SetLCHS(c)
	}
	return unsupported(m.name, "geometry")
}

func (m *Image) Comment() string {
	if c, ok := m.inner.(driver.Commenter); ok {
		return c.Comment()
	}
	return ""
}

func (m *Image) SetComment(s string) error {
	if c, ok := m.inner.(driver.Commenter); ok {
		return c.SetComment(s)
	}
	return unsupported(m.name, "comments")
}
