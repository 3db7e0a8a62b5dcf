package qcow2

import (
	"github.com/vdisk/vdisk/driver"
)

// Specific is the qcow2 part of `info`, with qemu-img's field names.
type Specific struct {
	Compat          string       `json:"compat"`
	CompressionType string       `json:"compression-type"`
	LazyRefcounts   *bool        `json:"lazy-refcounts,omitempty"`
	Bitmaps         []BitmapInfo `json:"bitmaps,omitempty"`
	RefcountBits    int          `json:"refcount-bits"`
	DataFile        string       `json:"data-file,omitempty"`
	DataFileRaw     *bool        `json:"data-file-raw,omitempty"`
	Corrupt         *bool        `json:"corrupt,omitempty"`
	ExtendedL2      *bool        `json:"extended-l2,omitempty"`
	// Encrypt is qemu's "encrypt" object (encrypt.go).
	Encrypt map[string]any `json:"encrypt,omitempty"`
}

// BitmapInfo describes a persistent dirty bitmap.
type BitmapInfo struct {
	Flags       []string `json:"flags"`
	Name        string   `json:"name"`
	Granularity int64    `json:"granularity"`
}

// Info describes the image.
func (im *image) Info() driver.Info {
	im.mu.Lock()
	defer im.mu.Unlock()
	h := im.hdr
	s := &Specific{
		Compat:          "1.1",
		CompressionType: "zlib",
		RefcountBits:    1 << h.refcountOrder,
	}
	if h.compressionType == compressionZstd {
		s.CompressionType = "zstd"
	}
	if h.version == 2 {
		s.Compat = "0.10"
	} else {
		t, f := true, false
		bp := func(b bool) *bool {
			if b {
				return &t
			}
			return &f
		}
		s.LazyRefcounts = bp(h.compat&compatLazyRefcounts != 0)
		s.Corrupt = bp(im.corrupt)
		s.ExtendedL2 = bp(im.ext)
		if im.extData {
			s.DataFile = im.dfName
			s.DataFileRaw = bp(im.rawData)
		}
	}
	s.Encrypt = im.encryptInfo()
	if h.bitmaps != nil {
		s.Bitmaps = []BitmapInfo{}
		for _, b := range im.bitmaps {
			bi := BitmapInfo{Flags: []string{}, Name: b.name, Granularity: int64(1) << b.granBits}
			if b.flags&bitmapInUse != 0 {
				bi.Flags = append(bi.Flags, "in-use")
			}
			if b.flags&bitmapAuto != 0 {
				bi.Flags = append(bi.Flags, "auto")
			}
			s.Bitmaps = append(s.Bitmaps, bi)
		}
	}
	inf := driver.Info{
		Format:      "qcow2",
		VirtualSize: im.size,
		ClusterSize: im.cs,
		Dirty:       im.hdrDirty,
		Specific:    s,
	}
	switch h.cryptMethod {
	case cryptLUKS:
		inf.Encrypted, inf.EncryptFormat = true, "luks"
	case cryptAES:
		inf.Encrypted, inf.EncryptFormat = true, "aes"
	}
	return inf
}

// SetParent rewrites the recorded backing file (rebase -u, commit); nil
// makes the image standalone.
func (im *image) SetParent(ref *driver.ParentRef) error {
	if err := im.beginOp(); err != nil {
		return err
	}
	defer im.unlockOps()
	h := im.hdr
	old := *h
	if ref == nil || ref.Name == "" {
		h.backingFile, h.backingFmt, h.hasBackingFmt = "", "", false
	} else {
		if len(ref.Name) > maxBackingNameLen {
			return driver.OptionErrorf("backing file name too long (%d bytes, at most %d)", len(ref.Name), maxBackingNameLen)
		}
		if im.rawData {
			return driver.Unsupportedf(im.name, "an image with a raw external data file cannot have a backing file")
		}
		h.backingFile = ref.Name
		h.backingFmt, h.hasBackingFmt = ref.Format, ref.Format != ""
	}
	if _, err := h.encode(im.cs); err != nil {
		*h = old
		return err
	}
	if err := im.flushLocked(false); err != nil {
		*h = old
		return err
	}
	if err := im.writeHeaderSync(false, false); err != nil {
		*h = old
		return err
	}
	return nil
}

var (
	_ driver.Reparenter  = (*image)(nil)
	_ driver.Snapshotter = (*image)(nil)
	_ driver.Checker     = (*image)(nil)
	_ driver.Resizer     = (*image)(nil)
	_ driver.Zeroer      = (*image)(nil)
	_ driver.Discarder   = (*image)(nil)
)
