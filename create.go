package vdisk

import (
	"context"
	"log/slog"
	"path/filepath"

	"github.com/vdisk/vdisk/driver"
)

// CreateOptions configures Create.
type CreateOptions struct {
	// Format is the new image's format (required).
	Format string
	// Size is the virtual size; 0 with a Backing takes the backing's size.
	Size int64
	// Options are the format's create options (key=value), validated
	// against its declared options.
	Options []driver.KV
	// Backing makes a differencing image on top of this image (and its
	// chain). It is recorded as given; relative names resolve against the
	// new image's directory.
	Backing string
	// BackingFormat is the backing image's format; "" probes it (never
	// guessing raw).
	BackingFormat string
	// Overwrite replaces an existing file.
	Overwrite bool
	// Paths is the policy for the file names the backing chain records
	// (see OpenOptions.Paths). Backing itself is the caller's name: an
	// absolute one is always accepted, one climbing out with ".." only
	// under driver.PathTrusted.
	Paths driver.PathPolicy
	// AllowUnsafeBacking is Paths = driver.PathTrusted (kept for
	// compatibility).
	AllowUnsafeBacking bool
	// AllowSchemes are the URL schemes a backing file name may use under
	// the strict policy, here and in the backing chain (see
	// OpenOptions.AllowSchemes).
	AllowSchemes []string
	// NoBackingOpen records Backing without opening it (qemu-img create
	// -u): Size and BackingFormat are then required, and no parent UUIDs
	// are recorded.
	NoBackingOpen bool
	Storage       driver.Storage
	// Dialer, Secrets and StorageOptions are as in OpenOptions: for a new
	// image or a backing image on a network storage (a registered scheme),
	// and for the keys of an encrypted image.
	Dialer         driver.Dialer
	Secrets        driver.Secrets
	StorageOptions map[string]string
	Logger         *slog.Logger
}

// Create makes a new image and returns it open read-write (with its backing
// chain, for a differencing image). The caller closes it. On failure no file
// is left behind.
func Create(ctx context.Context, name string, o *CreateOptions) (*Disk, error) {
	if o == nil || o.Format == "" {
		return nil, driver.OptionErrorf("create %s: no format given", name)
	}
	oo := &OpenOptions{Storage: o.Storage, Logger: o.Logger, Dialer: o.Dialer, Secrets: o.Secrets, StorageOptions: o.StorageOptions}
	log := oo.logger()
	st, inner, own, err := oo.resolve(ctx, name)
	if err != nil {
		return nil, driver.WithFile(err, "create", name)
	}
	// The storage built for a URL name is the new top layer's; closed
	// here when no layer takes it.
	defer func() {
		if own != nil {
			driver.CloseStorage(own)
		}
	}()
	if o.Size < 0 {
		return nil, driver.Errorf(ErrInvalidOption, name, -1, "negative size %d", o.Size)
	}
	// Like qemu, virtual sizes are whole 512-byte sectors.
	size := (o.Size + 511) &^ 511
	f, err := driver.Lookup(o.Format)
	if err != nil {
		return nil, driver.WithFile(err, "create", name)
	}

	var parent *Disk
	var ref *driver.ParentRef
	var pinfo *driver.ParentInfo
	if o.Backing != "" && o.NoBackingOpen {
		if size == 0 || o.BackingFormat == "" {
			return nil, driver.Errorf(ErrInvalidOption, name, -1, "creating without opening the backing file needs a size and the backing format")
		}
		if f.Caps&driver.CapDiff == 0 {
			return nil, driver.Errorf(ErrUnsupported, name, -1, "format %s does not support backing files", f.Name)
		}
		ref = &driver.ParentRef{Name: o.Backing, Format: o.BackingFormat}
	} else if o.Backing != "" {
		if f.Caps&driver.CapDiff == 0 {
			return nil, driver.Errorf(ErrUnsupported, name, -1, "format %s does not support backing files", f.Name)
		}
		trusted := o.AllowUnsafeBacking || o.Paths == driver.PathTrusted
		bpath, err := resolveParentAllow(name, o.Backing, trusted || filepath.IsAbs(o.Backing), knownScheme(o.Backing), o.AllowSchemes)
		if err != nil {
			return nil, err
		}
		po := *oo
		po.Format, po.ReadOnly, po.AllowUnsafeBacking, po.NoRawGuess, po.AllowSchemes = o.BackingFormat, true, trusted, true, o.AllowSchemes
		parent, err = Open(ctx, bpath, &po)
		if err != nil {
			return nil, err
		}
		pt := parent.Top()
		ref = &driver.ParentRef{Name: o.Backing, Format: pt.Format.Name}
		pinfo = &driver.ParentInfo{Format: pt.Format.Name, Size: parent.Size(), Path: bpath}
		if id, ok := pt.img.(driver.Identifier); ok {
			ref.UUID, ref.ModUUID = id.UUID(), id.ModificationUUID()
			pinfo.UUID, pinfo.ModUUID = ref.UUID, ref.ModUUID
		}
		if size == 0 {
			size = parent.Size()
		}
	}
	top, err := createLayer(ctx, st, log, inner, o.Format, o.Options, size, o.Overwrite, ref, pinfo, o.Secrets)
	if err != nil {
		if parent != nil {
			parent.Close()
		}
		return nil, err
	}
	top.Name, top.owned, own = name, own, nil
	layers := []*Layer{top}
	if parent != nil {
		layers = append(layers, parent.layers...)
	}
	return newDisk(layers, false, st, log), nil
}

// createLayer creates image name and returns it as a writable layer. On
// failure no new file is left behind.
func createLayer(ctx context.Context, st driver.Storage, log *slog.Logger, name, format string, kvs []driver.KV, size int64, overwrite bool, ref *driver.ParentRef, pinfo *driver.ParentInfo, secrets driver.Secrets) (*Layer, error) {
	f, err := driver.Lookup(format)
	if err != nil {
		return nil, driver.WithFile(err, "create", name)
	}
	if f.Create == nil {
		return nil, driver.Errorf(ErrUnsupported, name, -1, "format %s cannot create images", f.Name)
	}
	if ref != nil && f.Caps&driver.CapDiff == 0 {
		return nil, driver.Errorf(ErrUnsupported, name, -1, "format %s does not support backing files", f.Name)
	}
	kvs, vc, err := vboxCreateOptions(f.Name, kvs)
	if err != nil {
		return nil, driver.WithFile(err, "create", name)
	}
	if vc != nil && ref != nil {
		return nil, driver.Errorf(ErrUnsupported, name, -1, "vbox-encrypt makes a new DEK, but a differencing image shares its chain's: create the diff plain and open it with the chain's keystore= and key-secret=")
	}
	vals, err := driver.ParseOptions(f.Name, f.CreateOptions, kvs)
	if err != nil {
		return nil, driver.WithFile(err, "create", name)
	}
	existed := false
	if fi, err := st.Stat(name); err == nil {
		existed = true
		if fi.IsDir {
			return nil, driver.Errorf(ErrInvalidOption, name, -1, "is a directory")
		}
		if !overwrite {
			// qemu-img create overwrites; the library does so only when asked.
			return nil, driver.Errorf(ErrInvalidOption, name, -1, "file exists")
		}
	}
	img, err := f.Create(ctx, &driver.CreateParams{
		Storage:    st,
		Name:       name,
		Size:       size,
		Options:    vals,
		Logger:     log.With("image", name),
		Overwrite:  overwrite,
		ParentRef:  ref,
		ParentInfo: pinfo,
		Secrets:    secrets,
	})
	if err != nil {
		if !existed {
			if _, serr := st.Stat(name); serr == nil {
				st.Remove(name)
			}
		}
		return nil, driver.WithFile(err, "create", name)
	}
	// Every name the new image records is the caller's (a data file, a
	// backing file), so reopening it (live jobs) follows them as given.
	fl := layerFlags{writable: true, topLevel: true, paths: driver.PathTrusted, secrets: secrets}
	if vc != nil {
		w, err := vboxWrapCreate(img, name, f.Name, vc, &fl)
		if err != nil {
			img.Close()
			if !existed {
				st.Remove(name)
			}
			return nil, driver.WithFile(err, "create", name)
		}
		img = w
	}
	return &Layer{Name: name, Format: f, img: img, Storage: st, path: name, kvs: kvs, fl: fl}, nil
}

// openParentDisk opens a backing chain read-only for a rebase, never
// guessing raw for a backing file whose format is not given.
func openParentDisk(ctx context.Context, name, format string, st driver.Storage, log *slog.Logger, allowUnsafe bool) (*Disk, error) {
	return Open(ctx, name, &OpenOptions{Format: format, ReadOnly: true, NoRawGuess: true, Storage: st, Logger: log, AllowUnsafeBacking: allowUnsafe})
}
