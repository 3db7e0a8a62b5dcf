package vdisk

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path"
	"path/filepath"
	"strings"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/vboxcrypt"
	"github.com/vdisk/vdisk/storage/cache"
	"github.com/vdisk/vdisk/storage/osfs"
)

// MaxChainDepth bounds the number of layers a chain may have.
const MaxChainDepth = 256

// OpenOptions configures Open. The zero value opens read-write on the local
// file system, probing the format.
type OpenOptions struct {
	// Format of the top image; "" probes it (raw is the fallback, with a
	// warning on the logger).
	Format string
	// Options are the top format's open options (key=value).
	Options []driver.KV
	// ReadOnly opens every layer read-only.
	ReadOnly bool
	// InfoOnly opens for `info`: read-only, drivers may skip loading data
	// structures.
	InfoOnly bool
	// NoBacking opens only the top image, ignoring its parent reference.
	NoBacking bool
	// Parents, when set, names the parent images explicitly (the parent of
	// the top first); a layer whose parent is not listed is still resolved
	// from its recorded reference.
	Parents []string
	// ParentFormats optionally gives the formats of Parents (same order).
	ParentFormats []string
	// Paths is the policy for every file name an image of the chain
	// records: parent references (backing files, VHD parent locators) and
	// the files a driver opens itself (VMDK extents, a qcow2 external data
	// file). The zero value, driver.PathStrict, follows a name only to a
	// regular file in the referring image's directory or below, checked on
	// the real path; driver.PathTrusted follows names wherever they point,
	// as qemu-img does. See docs/drivers.md.
	Paths driver.PathPolicy
	// AllowUnsafeBacking is Paths = driver.PathTrusted (kept for
	// compatibility).
	AllowUnsafeBacking bool
	// AllowSchemes lists the URL schemes ("s3", "nbd", ...; registered
	// with driver.RegisterScheme) a backing file name recorded in an
	// image may use under driver.PathStrict: such a parent is opened in
	// its scheme's storage (a local overlay on an s3:// base), while
	// every local name stays confined as Strict says. Empty, the default,
	// refuses every URL under Strict; PathTrusted follows every name
	// anyway. Other names an image records (extents, data files) are
	// never URLs under Strict.
	AllowSchemes []string
	// NoRawGuess makes a top image whose Format is "" and that no probe
	// recognises an error instead of opening it as raw: for files of
	// unknown origin (vdisk info --untrusted), where a guess is no answer.
	NoRawGuess bool
	// Direct opens the top image with O_DIRECT where supported.
	Direct bool
	// Snapshot, when set, shows the top image's internal snapshot with this
	// ID (or, when no ID matches, name) instead of its current state; the
	// disk is then read-only (qemu-img convert -l). The top's driver must
	// implement driver.SnapshotOpener.
	Snapshot string
	// Storage holds the images; nil means the local file system.
	Storage driver.Storage
	// Resolver, when set, maps each image name of the chain (the top's,
	// and every parent name as resolved against its child) to the storage
	// holding it and the name inside that storage, so each layer may live
	// on its own storage (a base on object storage, a diff on local disk),
	// chosen by the name's scheme. Names with a scheme ("s3://...") are
	// followed as parent references only under driver.PathTrusted. Nil
	// puts names with a registered scheme (driver.RegisterScheme: nbd://,
	// iscsi://, s3://, ...) in that scheme's storage and every other name
	// in Storage.
	Resolver func(name string) (driver.Storage, string, error)
	// Dialer opens the connections of network storages; nil dials
	// directly.
	Dialer driver.Dialer
	// Secrets unlocks encrypted images and network storages (CHAP, TLS).
	Secrets driver.Secrets
	// StorageOptions are extra settings for network storages (see
	// driver.SchemeEnv.Options).
	StorageOptions map[string]string
	// Cache, when set, is a local VCI cache file put in front of the
	// chain's network layer (the first layer whose name has a registered
	// scheme): blocks read from it are kept there and served from there
	// by later opens while the source is unchanged (storage/cache).
	// CacheInMemory keeps the cache in memory instead. CacheOptions
	// bound it.
	Cache         string
	CacheInMemory bool
	CacheOptions  cache.Options

	// cache is this open's block cache state (set by Open).
	cache *cacheState
	// Logger receives notices and warnings; nil discards them.
	Logger *slog.Logger
}

func (o *OpenOptions) storage() driver.Storage {
	if o.Storage != nil {
		return o.Storage
	}
	return osfs.New()
}

// resolve finds the storage of name and the name inside it. own is the
// storage resolve built for name alone (a URL's scheme storage), which the
// caller closes (driver.CloseStorage) when it is done with it, usually by
// handing it to the layer opened on it (Layer.owned); nil when the storage
// is shared (Storage, a Resolver's).
func (o *OpenOptions) resolve(ctx context.Context, name string) (st driver.Storage, inner string, own driver.Storage, err error) {
	if o.Resolver == nil {
		st, inner, err := resolveScheme(ctx, name, o.storage(), &driver.SchemeEnv{Dialer: o.Dialer, Secrets: o.Secrets, Options: o.StorageOptions, Logger: o.Logger})
		if err != nil {
			return nil, "", nil, err
		}
		if driver.SchemeOf(name) != "" {
			own = st
		}
		return o.cached(name, st), inner, own, nil
	}
	st, inner, err = o.Resolver(name)
	if err != nil {
		return nil, "", nil, driver.WithFile(err, "open", name)
	}
	if st == nil {
		return nil, "", nil, driver.Errorf(ErrNotFound, name, -1, "no storage holds this name")
	}
	return st, inner, nil, nil
}

// openNamed opens image name where o's resolver puts it.
func (o *OpenOptions) openNamed(ctx context.Context, log *slog.Logger, name, format string, kvs []driver.KV, fl layerFlags) (*Layer, error) {
	st, inner, own, err := o.resolve(ctx, name)
	if err != nil {
		return nil, err
	}
	l, err := openLayer(ctx, st, log, inner, format, kvs, fl)
	if err != nil {
		driver.CloseStorage(own)
		return nil, err
	}
	l.Name, l.owned = name, own
	return l, nil
}

// policy is the path policy o asks for.
func (o *OpenOptions) policy() driver.PathPolicy {
	if o.AllowUnsafeBacking {
		return driver.PathTrusted
	}
	return o.Paths
}

func (o *OpenOptions) logger() *slog.Logger {
	if o.Logger != nil {
		return o.Logger
	}
	return slog.New(slog.DiscardHandler)
}

// Open opens the image name and the chain of parents it records.
func Open(ctx context.Context, name string, o *OpenOptions) (*Disk, error) {
	if o == nil {
		o = &OpenOptions{}
	}
	if err := o.checkCache(); err != nil {
		return nil, err
	}
	oc := *o
	oc.cache = &cacheState{}
	o = &oc
	st, log := o.storage(), o.logger()
	ro := o.ReadOnly || o.InfoOnly || o.Snapshot != ""
	top, err := o.openNamed(ctx, log, name, o.Format, o.Options, layerFlags{writable: !ro, infoOnly: o.InfoOnly, direct: o.Direct, topLevel: true, noRawGuess: o.NoRawGuess, paths: o.policy(), secrets: o.Secrets})
	if err != nil {
		return nil, err
	}
	layers := []*Layer{top}
	cleanup := func() {
		for _, l := range layers {
			l.closeImage()
		}
	}
	if !o.NoBacking {
		seen := map[string]bool{canonical(name): true}
		for i := 0; ; i++ {
			child := layers[len(layers)-1]
			ref := child.img.Parent()
			if ref == nil {
				break
			}
			if len(layers) >= MaxChainDepth {
				cleanup()
				return nil, driver.Errorf(ErrUnsupported, name, -1, "backing chain is deeper than %d images", MaxChainDepth)
			}
			var explicit, explicitFmt string
			if i < len(o.Parents) {
				explicit = o.Parents[i]
				if i < len(o.ParentFormats) {
					explicitFmt = o.ParentFormats[i]
				}
			}
			pname, pformat, err := parentName(ctx, o, log, child, ref, explicit, explicitFmt)
			if err != nil {
				cleanup()
				return nil, err
			}
			if seen[canonical(pname)] {
				cleanup()
				return nil, driver.Corruptf(child.Name, -1, "backing chain loops back to %s", pname)
			}
			seen[canonical(pname)] = true
			// A name the image records (not one the caller gave) is
			// opened beneath the child's directory under the strict
			// policy.
			// A URL (of a scheme AllowSchemes admits) is not a local
			// name: its own storage holds it.
			confined := explicit == "" && o.policy() == driver.PathStrict && !driver.IsURL(pname)
			p, err := openParent(ctx, o, log, child, ref, pname, pformat, confined, layerFlags{infoOnly: o.InfoOnly, paths: o.policy(), secrets: o.Secrets, vbox: child.fl.vbox})
			if err != nil {
				cleanup()
				return nil, err
			}
			layers = append(layers, p)
		}
	}
	if err := showSnapshot(top, o.Snapshot); err != nil {
		cleanup()
		return nil, err
	}
	d := newDisk(layers, ro, st, log)
	d.caches = o.cache
	return d, nil
}

// showSnapshot replaces the top layer's image by a read-only view of its
// internal snapshot key ("" leaves it alone).
func showSnapshot(top *Layer, key string) error {
	if key == "" {
		return nil
	}
	so, ok := top.img.(driver.SnapshotOpener)
	if !ok {
		return driver.Unsupportedf(top.Name, "format %s cannot read an internal snapshot", top.Format.Name)
	}
	v, err := so.OpenSnapshot(key)
	if err != nil {
		return driver.WithFile(err, "open snapshot", top.Name)
	}
	top.img = &snapshotImage{Image: v, owner: top.img}
	return nil
}

// snapshotImage is an internal snapshot shown as a layer: closing it also
// closes the image it belongs to. Only the plain Image methods show
// through (a snapshot is read-only).
type snapshotImage struct {
	driver.Image
	owner driver.Image
}

func (s *snapshotImage) Close() error {
	err := s.Image.Close()
	if oerr := s.owner.Close(); err == nil {
		err = oerr
	}
	return err
}

func canonical(name string) string {
	if a, err := filepath.Abs(name); err == nil {
		return a
	}
	return path.Clean(name)
}

// LayerSpec names one image of an explicitly assembled chain.
type LayerSpec struct {
	Name   string
	Format string // "" probes
}

// OpenChain assembles a chain from explicit layers, top first, ignoring the
// parent references the images record. Only the top is opened writable
// (unless o.ReadOnly).
func OpenChain(ctx context.Context, specs []LayerSpec, o *OpenOptions) (*Disk, error) {
	if o == nil {
		o = &OpenOptions{}
	}
	if len(specs) == 0 {
		return nil, driver.OptionErrorf("an empty chain")
	}
	if len(specs) > MaxChainDepth {
		return nil, driver.OptionErrorf("a chain of %d layers exceeds the limit of %d", len(specs), MaxChainDepth)
	}
	if err := o.checkCache(); err != nil {
		return nil, err
	}
	st, log := o.storage(), o.logger()
	ro := o.ReadOnly || o.InfoOnly || o.Snapshot != ""
	var layers []*Layer
	for i, s := range specs {
		l, err := o.openNamed(ctx, log, s.Name, s.Format, nil, layerFlags{writable: i == 0 && !ro, infoOnly: o.InfoOnly, direct: o.Direct && i == 0, topLevel: i == 0, noRawGuess: o.NoRawGuess, paths: o.policy(), secrets: o.Secrets})
		if err != nil {
			for _, l := range layers {
				l.closeImage()
			}
			return nil, err
		}
		layers = append(layers, l)
	}
	if err := showSnapshot(layers[0], o.Snapshot); err != nil {
		for _, l := range layers {
			l.closeImage()
		}
		return nil, err
	}
	return newDisk(layers, ro, st, log), nil
}

// layerFlags say how openLayer opens an image.
type layerFlags struct {
	writable, infoOnly, direct bool
	// topLevel allows the raw fallback when probing, unless noRawGuess.
	topLevel, noRawGuess bool
	// paths is the policy for the file names the image records.
	paths driver.PathPolicy
	// secrets unlock encrypted images.
	secrets driver.Secrets
	// vbox is VirtualBox's crypt filter of the chain (vboxcrypt.go), handed
	// from a child to its parents.
	vbox *vboxcrypt.Cipher
}

// openLayer opens one image.
func openLayer(ctx context.Context, st driver.Storage, log *slog.Logger, name, format string, kvs []driver.KV, fl layerFlags) (*Layer, error) {
	writable := fl.writable
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var f *driver.Format
	var err error
	if format != "" {
		f, err = driver.Lookup(format)
		if err != nil {
			return nil, driver.WithFile(err, "open", name)
		}
	} else {
		if fl.topLevel && fl.noRawGuess {
			f, err = probeKnown(st, name)
		} else {
			f, err = probe(st, log, name, fl.topLevel, writable)
		}
		if err != nil {
			return nil, err
		}
	}
	fkvs, vo := vboxOpenOptions(f.Name, kvs)
	vals, err := driver.ParseOptions(f.Name, f.OpenOptions, fkvs)
	if err != nil {
		return nil, driver.WithFile(err, "open", name)
	}
	refs := &driver.ReferenceLog{}
	img, err := f.Open(ctx, &driver.OpenParams{
		Storage:    st,
		Name:       name,
		ReadOnly:   !writable,
		InfoOnly:   fl.infoOnly,
		Direct:     fl.direct,
		Options:    vals,
		Paths:      fl.paths,
		References: refs,
		Secrets:    fl.secrets,
		Logger:     log.With("image", name),
	})
	if err != nil {
		return nil, driver.WithFile(err, "open", name)
	}
	if wimg, err := vboxWrapOpen(img, name, f.Name, vo, &fl); err != nil {
		img.Close()
		return nil, driver.WithFile(err, "open", name)
	} else {
		img = wimg
	}
	return &Layer{Name: name, Format: f, img: img, ReadOnly: !writable, Storage: st, path: name, kvs: kvs, fl: fl, refs: refs}, nil
}

// probeKnown finds the format of a top image without guessing raw.
func probeKnown(st driver.Storage, name string) (*driver.Format, error) {
	f, err := probeFormat(st, name)
	if err == nil && f == nil {
		err = driver.Errorf(ErrUnsupported, name, -1, "no known image format recognises this file and it is not opened as raw by guessing; give the format (-f)")
	}
	return f, err
}

// probe finds the format of name. For a top-level image raw is the fallback
// (with a warning); for a parent whose format is not recorded it is an error.
func probe(st driver.Storage, log *slog.Logger, name string, topLevel, writable bool) (*driver.Format, error) {
	f, err := probeFormat(st, name)
	if err != nil || f != nil {
		return f, err
	}
	if !topLevel {
		return nil, driver.Errorf(ErrUnsupported, name, -1,
			"backing file has no recorded format and is not a known image format; it is not opened as raw by guessing (record its format with 'vdisk rebase -u -F raw -b NAME IMAGE')")
	}
	raw, err := driver.Lookup("raw")
	if err != nil {
		return nil, driver.WithFile(err, "open", name)
	}
	if writable {
		log.Warn("image format was not specified and probing guessed raw; writes to block 0 could turn it into another format's image: pass the format (-f raw)", "file", name)
	} else {
		log.Debug("image format was not specified; probing guessed raw", "file", name)
	}
	return raw, nil
}

// probeFormat returns the best-scoring format for the file name, nil when
// no probe recognises it.
func probeFormat(st driver.Storage, name string) (*driver.Format, error) {
	fi, err := st.Stat(name)
	if err != nil {
		return nil, driver.WithFile(err, "open", name)
	}
	if fi.IsDir {
		return nil, &Error{Op: "open", File: name, Offset: -1, Err: ErrUnsupported, Reason: "is a directory, not an image file"}
	}
	file, err := st.Open(name, driver.ReadOnly|driver.NoLock)
	if err != nil {
		return nil, driver.WithFile(err, "open", name)
	}
	size, err := file.Size()
	if err != nil {
		file.Close()
		return nil, driver.WithFile(err, "open", name)
	}
	res := driver.ProbeAll(file, size)
	file.Close()
	if len(res) > 0 {
		return res[0].Format, nil
	}
	return nil, nil
}

// resolveParent turns a recorded parent name into a name relative to the
// child's directory, refusing escapes unless allowed. Names with a scheme
// are followed only when allowed and a resolver can place them.
func resolveParent(childName, ref string, allowUnsafe bool) (string, error) {
	return resolveParentWith(childName, ref, allowUnsafe, false)
}

func resolveParentWith(childName, ref string, allowUnsafe, schemes bool) (string, error) {
	return resolveParentAllow(childName, ref, allowUnsafe, schemes, nil)
}

// resolveParentAllow is resolveParentWith where, under the strict policy,
// a URL whose scheme is in allowed is followed (OpenOptions.AllowSchemes).
func resolveParentAllow(childName, ref string, allowUnsafe, schemes bool, allowed []string) (string, error) {
	if strings.Contains(ref, "://") {
		if !allowUnsafe && !schemeAllowed(allowed, ref) {
			return "", refuseParent(childName, ref, urlRefusal(ref, allowed))
		}
		if !schemes {
			return "", driver.Errorf(ErrUnsupported, childName, -1, "backing file %q is a URL; network backing files are not supported without a storage resolver", ref)
		}
		return ref, nil
	}
	if filepath.IsAbs(ref) {
		if !allowUnsafe {
			if rel, ok := driver.AbsWithin(childName, ref); ok && !driver.IsURL(childName) {
				return joinDir(childName, rel), nil
			}
			return "", refuseParent(childName, ref, "is an absolute path outside the image's directory")
		}
		return ref, nil
	}
	clean := filepath.Clean(ref)
	if (clean == ".." || strings.HasPrefix(clean, "../")) && !allowUnsafe {
		return "", refuseParent(childName, ref, "leaves the image's directory")
	}
	return joinDir(childName, clean), nil
}

// schemeAllowed reports whether name is a URL whose scheme allowed lists.
func schemeAllowed(allowed []string, name string) bool {
	s := driver.SchemeOf(name)
	if s == "" {
		return false
	}
	for _, a := range allowed {
		if strings.EqualFold(strings.TrimSpace(a), s) {
			return true
		}
	}
	return false
}

// urlRefusal says why the strict policy refuses the URL name.
func urlRefusal(name string, allowed []string) string {
	s := driver.SchemeOf(name)
	if s == "" {
		return "is a URL"
	}
	list := "none are"
	if len(allowed) > 0 {
		list = "only " + strings.Join(allowed, ", ") + " are"
	}
	return fmt.Sprintf("is a URL of scheme %s, and %s allowed for backing files (OpenOptions.AllowSchemes; vdisk --allow-backing-scheme %s)", s, list, s)
}

// knownScheme reports whether name is a URL of a registered scheme.
func knownScheme(name string) bool {
	s := driver.SchemeOf(name)
	if s == "" {
		return false
	}
	_, ok := driver.LookupScheme(s)
	return ok
}

// resolveScheme puts a URL name of a registered scheme in its storage and
// any other name in def.
func resolveScheme(ctx context.Context, name string, def driver.Storage, env *driver.SchemeEnv) (driver.Storage, string, error) {
	scheme := driver.SchemeOf(name)
	if scheme == "" {
		return def, name, nil
	}
	open, ok := driver.LookupScheme(scheme)
	if !ok {
		return nil, "", driver.Errorf(ErrUnsupported, name, -1, "no storage handles %s:// names (known: %s)", scheme, strings.Join(driver.Schemes(), ", "))
	}
	st, inner, err := open(ctx, name, env)
	if err != nil {
		return nil, "", driver.WithFile(err, "open", name)
	}
	return st, inner, nil
}

func refuseParent(child, ref, reason string) error {
	return &Error{Op: "open", File: child, Offset: -1, Err: &driver.PathError{Image: child, Field: "backing file", Name: ref, Reason: reason}}
}

// joinDir joins rel to the directory of name, keeping a scheme's "//"
// ("s3://bucket/dir/top" and "base" give "s3://bucket/dir/base").
func joinDir(name, rel string) string {
	if i := strings.Index(name, "://"); i >= 0 {
		scheme, rest := name[:i+3], name[i+3:]
		dir := path.Dir(rest)
		if !strings.Contains(rest, "/") {
			dir = rest
		}
		return scheme + path.Join(dir, rel)
	}
	return filepath.Join(filepath.Dir(name), rel)
}

// parentName finds the name and format of child's parent.
func parentName(ctx context.Context, o *OpenOptions, log *slog.Logger, child *Layer, ref *driver.ParentRef, explicit, explicitFmt string) (string, string, error) {
	format := ref.Format
	var name string
	switch {
	case explicit != "":
		name = explicit
		if explicitFmt != "" {
			format = explicitFmt
		}
	case ref.Name != "":
		var err error
		name, err = resolveParentAllow(child.Name, ref.Name, o.policy() == driver.PathTrusted, o.Resolver != nil || knownScheme(ref.Name), o.AllowSchemes)
		if err != nil {
			return "", "", err
		}
	case ref.UUID != "":
		var err error
		name, format, err = findByUUID(ctx, child.Storage, log, child, ref.UUID, format, o.policy())
		if err != nil {
			return "", "", err
		}
	default:
		return "", "", driver.Corruptf(child.Name, -1, "the image records a parent but neither its name nor its UUID")
	}
	return name, format, nil
}

func openParent(ctx context.Context, o *OpenOptions, log *slog.Logger, child *Layer, ref *driver.ParentRef, name, format string, confined bool, fl layerFlags) (*Layer, error) {
	st, inner, own, err := o.resolve(ctx, name)
	if err != nil {
		return nil, err
	}
	if confined {
		st = confine(st, child.Name, child.path, inner)
	}
	p, err := openLayer(ctx, st, log, inner, format, nil, fl)
	if err == nil {
		p.Name, p.owned = name, own
	}
	if err != nil {
		driver.CloseStorage(own)
		if errors.Is(err, ErrNotFound) {
			return nil, driver.Errorf(ErrNotFound, child.Name, -1, "cannot open backing file %s: %v", name, err)
		}
		return nil, err
	}
	if err := checkParentIdentity(log, child, p, ref); err != nil {
		p.closeImage()
		return nil, err
	}
	return p, nil
}

func checkParentIdentity(log *slog.Logger, child, p *Layer, ref *driver.ParentRef) error {
	id, ok := p.img.(driver.Identifier)
	if !ok {
		return nil
	}
	if ref.UUID != "" && id.UUID() != "" && !strings.EqualFold(ref.UUID, id.UUID()) {
		return driver.Corruptf(child.Name, -1, "parent %s has UUID %s but the image expects parent UUID %s", p.Name, id.UUID(), ref.UUID)
	}
	if ref.ModUUID != "" && id.ModificationUUID() != "" && !strings.EqualFold(ref.ModUUID, id.ModificationUUID()) {
		log.Warn("the parent was modified after the differencing image was created; its content may no longer match",
			"image", child.Name, "parent", p.Name, "expected-modification-uuid", ref.ModUUID, "parent-modification-uuid", id.ModificationUUID())
	}
	return nil
}

// findByUUID looks in the child's directory for an image whose UUID is u.
func findByUUID(ctx context.Context, st driver.Storage, log *slog.Logger, child *Layer, u, format string, paths driver.PathPolicy) (string, string, error) {
	dir := filepath.Dir(child.path)
	names, err := st.List(dir)
	if err != nil {
		return "", "", driver.WithFile(err, "find parent", child.Name)
	}
	var candidates []*driver.Format
	if format != "" {
		f, err := driver.Lookup(format)
		if err != nil {
			return "", "", driver.WithFile(err, "find parent", child.Name)
		}
		candidates = []*driver.Format{f}
	} else {
		candidates = []*driver.Format{child.Format}
	}
	const maxTried = 4096
	tried := 0
	for _, n := range names {
		full := filepath.Join(dir, n)
		if canonical(full) == canonical(child.path) {
			continue
		}
		for _, f := range candidates {
			if !hasExt(n, f.Extensions) {
				continue
			}
			tried++
			if tried > maxTried {
				break
			}
			lst := st
			if paths == driver.PathStrict {
				// A directory entry may be a link out of it, or a FIFO.
				lst = confine(st, child.Name, child.path, full)
			}
			l, err := openLayer(ctx, lst, log, full, f.Name, nil, layerFlags{infoOnly: true, paths: paths})
			if err != nil {
				continue
			}
			id, ok := l.img.(driver.Identifier)
			match := ok && strings.EqualFold(id.UUID(), u)
			l.img.Close()
			if match {
				return joinDir(child.Name, n), f.Name, nil
			}
		}
	}
	return "", "", driver.Errorf(ErrNotFound, child.Name, -1, "no image with the parent UUID %s found in %s; name the parent explicitly", u, dir)
}

func hasExt(name string, exts []string) bool {
	ext := strings.TrimPrefix(strings.ToLower(filepath.Ext(name)), ".")
	for _, e := range exts {
		if ext == strings.ToLower(e) {
			return true
		}
	}
	return false
}

// Remove deletes the image file name from the storage that holds it (the
// scheme's storage for a URL name, as Open resolves it), so a failed create
// or convert leaves nothing behind on network storages too. It removes
// that one file, not the files an image names.
func Remove(ctx context.Context, name string, o *OpenOptions) error {
	if o == nil {
		o = &OpenOptions{}
	}
	st, inner, own, err := o.resolve(ctx, name)
	if err != nil {
		return err
	}
	defer driver.CloseStorage(own)
	return st.Remove(inner)
}
