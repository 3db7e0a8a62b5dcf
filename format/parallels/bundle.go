package parallels

import (
	"bytes"
	"context"
	"encoding/xml"
	"io"
	"math"
	"path"
	"strings"

	"github.com/vdisk/vdisk/driver"
)

const (
	descriptorName = "DiskDescriptor.xml"
	// maxDescriptor bounds the descriptor read into memory; real ones are a
	// few KiB.
	maxDescriptor = 1 << 20
	zeroGUID      = "{00000000-0000-0000-0000-000000000000}"
)

// isDescriptor reports whether r starts like a DiskDescriptor.xml.
func isDescriptor(r io.ReaderAt, size int64) bool {
	b := make([]byte, min(size, 1024))
	n, _ := r.ReadAt(b, 0)
	b = bytes.TrimPrefix(b[:n], []byte("\xef\xbb\xbf"))
	b = bytes.TrimLeft(b, " \t\r\n")
	if !bytes.HasPrefix(b, []byte("<?xml")) && !bytes.HasPrefix(b, []byte("<Parallels_disk_image")) {
		return false
	}
	return bytes.Contains(b, []byte("<Parallels_disk_image"))
}

// descriptor is the part of DiskDescriptor.xml we use.
type descriptor struct {
	XMLName  xml.Name `xml:"Parallels_disk_image"`
	DiskSize int64    `xml:"Disk_Parameters>Disk_size"`
	Storages []struct {
		Start  int64 `xml:"Start"`
		End    int64 `xml:"End"`
		Images []struct {
			GUID string `xml:"GUID"`
			Type string `xml:"Type"`
			File string `xml:"File"`
		} `xml:"Image"`
	} `xml:"StorageData>Storage"`
	Shots []struct {
		GUID       string `xml:"GUID"`
		ParentGUID string `xml:"ParentGUID"`
	} `xml:"Snapshots>Shot"`
}

// openBundle opens the image a DiskDescriptor.xml describes: its single
// image, or the base of its snapshot chain. Bundles open read-only.
func openBundle(ctx context.Context, p *driver.OpenParams, desc string) (driver.Image, error) {
	if !p.ReadOnly {
		return nil, driver.Errorf(driver.ErrReadOnly, desc, -1,
			"a Parallels bundle opens read-only (open it read-only, or write the .hds image inside it)")
	}
	df, err := p.Storage.Open(desc, driver.ReadOnly)
	if err != nil {
		return nil, err
	}
	size, err := df.Size()
	if err != nil {
		df.Close()
		return nil, driver.WithFile(err, "open", desc)
	}
	if size > maxDescriptor {
		df.Close()
		return nil, driver.Corruptf(desc, 0, "descriptor of %d bytes is too large (at most %d)", size, maxDescriptor)
	}
	b := make([]byte, size)
	err = driver.ReadFullAt(df, b, 0)
	df.Close()
	if err != nil {
		return nil, driver.WithFile(err, "read descriptor", desc)
	}
	var d descriptor
	dec := xml.NewDecoder(bytes.NewReader(b))
	dec.Strict = true
	if err := dec.Decode(&d); err != nil {
		return nil, driver.Corruptf(desc, dec.InputOffset(), "bad descriptor XML: %v", err)
	}
	if len(d.Storages) == 0 {
		return nil, driver.Corruptf(desc, -1, "descriptor lists no storage")
	}
	if len(d.Storages) > 1 {
		return nil, driver.Unsupportedf(desc, "descriptor splits the disk into %d storages", len(d.Storages))
	}
	imgs := d.Storages[0].Images
	if len(imgs) == 0 {
		return nil, driver.Corruptf(desc, -1, "descriptor lists no image")
	}
	pick := 0
	if len(imgs) > 1 {
		base := ""
		for _, s := range d.Shots {
			if strings.TrimSpace(s.ParentGUID) == zeroGUID {
				base = strings.TrimSpace(s.GUID)
			}
		}
		pick = -1
		for i, im := range imgs {
			if base != "" && strings.EqualFold(strings.TrimSpace(im.GUID), base) {
				pick = i
			}
		}
		if pick < 0 {
			return nil, driver.Corruptf(desc, -1, "descriptor lists %d images but no snapshot names the base", len(imgs))
		}
	}
	im := imgs[pick]
	q := *p
	q.Name = desc
	f, full, err := q.OpenReferenced("image file", strings.TrimSpace(im.File), driver.ReadOnly)
	if err != nil {
		return nil, err
	}
	switch t := strings.TrimSpace(im.Type); t {
	case "Compressed":
		img, err := load(ctx, f, full, true, p.Options, p.Logger)
		if err != nil {
			f.Close()
			return nil, err
		}
		img.bundle = desc
		return img, nil
	case "Plain":
		fs, err := f.Size()
		if err != nil {
			f.Close()
			return nil, driver.WithFile(err, "open", full)
		}
		vs := fs
		if d.DiskSize > 0 && d.DiskSize <= math.MaxInt64/sectorSize {
			vs = d.DiskSize * sectorSize
		}
		return &plain{f: f, name: full, desc: desc, size: vs, fileSize: fs}, nil
	default:
		f.Close()
		return nil, driver.Unsupportedf(desc, "image type %q of %s", t, path.Base(full))
	}
}

// plain is a bundle's flat image file, read-only.
type plain struct {
	f              driver.File
	name, desc     string
	size, fileSize int64
}

func (p *plain) Size() int64 { return p.size }

func (p *plain) Status(off, n int64) (driver.Extent, error) {
	if err := driver.CheckRange(p.name, off, n, p.size); err != nil {
		return driver.Extent{}, err
	}
	if off >= p.fileSize {
		return driver.Extent{State: driver.Unallocated, Length: n, Offset: -1}, nil
	}
	return driver.Extent{State: driver.Data, Length: min(n, p.fileSize-off), Offset: off}, nil
}

func (p *plain) ReadAt(b []byte, off int64) (int, error) {
	if err := driver.CheckRange(p.name, off, int64(len(b)), p.size); err != nil {
		return 0, err
	}
	n, err := p.f.ReadAt(b, off)
	if n < len(b) {
		if err != nil && err != io.EOF {
			return n, driver.WithFile(err, "read", p.name)
		}
		clear(b[n:])
	}
	return len(b), nil
}

func (p *plain) WriteAt(b []byte, off int64) (int, error) {
	return 0, driver.Errorf(driver.ErrReadOnly, p.name, off, "image opened read-only")
}

func (p *plain) Flush() error { return nil }
func (p *plain) Close() error { return p.f.Close() }

func (p *plain) Info() driver.Info {
	return driver.Info{Format: "parallels", VirtualSize: p.size,
		Specific: &Info{Magic: "plain", Descriptor: p.desc}}
}

func (p *plain) Parent() *driver.ParentRef { return nil }
