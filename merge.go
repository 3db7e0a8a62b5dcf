package vdisk

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"strings"

	"github.com/vdisk/vdisk/driver"
)

// MergeOptions tunes Merge, Commit and Rebase.
type MergeOptions struct {
	Progress Progress
	// Format is the format of the named (top) image; "" probes it.
	Format string
	// Storage and Logger as in OpenOptions.
	Storage            driver.Storage
	Logger             *slog.Logger
	AllowUnsafeBacking bool
	// Parents names parents explicitly, as in OpenOptions.
	Parents []string
}

func (o *MergeOptions) open() *OpenOptions {
	if o == nil {
		return &OpenOptions{}
	}
	return &OpenOptions{Format: o.Format, Storage: o.Storage, Logger: o.Logger, AllowUnsafeBacking: o.AllowUnsafeBacking, Parents: o.Parents}
}

// openWritable opens the chain of name with the layers whose index is in
// writable opened read-write (others read-only), keeping the recorded
// chain.
func openWritable(ctx context.Context, name string, o *OpenOptions, writable map[int]bool) (*Disk, error) {
	probe := *o
	probe.ReadOnly = true
	probe.InfoOnly = true
	d, err := Open(ctx, name, &probe)
	if err != nil {
		return nil, err
	}
	specs := make([]LayerSpec, 0, len(d.layers))
	for _, l := range d.layers {
		specs = append(specs, LayerSpec{Name: l.Name, Format: l.Format.Name})
	}
	d.Close()
	st, log := o.storage(), o.logger()
	var layers []*Layer
	for i, s := range specs {
		l, err := openLayer(ctx, st, log, s.Name, s.Format, nil, layerFlags{writable: writable[i], topLevel: i == 0, unsafePaths: o.AllowUnsafeBacking})
		if err != nil {
			for _, l := range layers {
				l.Image.Close()
			}
			return nil, err
		}
		layers = append(layers, l)
	}
	nd := newDisk(layers, !writable[0], st, log)
	return nd, nil
}

// parentRefFor builds the reference that child should record for parent:
// the parent's name relative to the child's directory when possible.
func parentRefFor(child, parent *Layer) *driver.ParentRef {
	name := parent.Name
	if rel, err := filepath.Rel(filepath.Dir(child.Name), parent.Name); err == nil {
		name = rel
	}
	ref := &driver.ParentRef{Name: name, Format: parent.Format.Name}
	if id, ok := parent.Image.(driver.Identifier); ok {
		ref.UUID, ref.ModUUID = id.UUID(), id.ModificationUUID()
	}
	return ref
}

func canReparent(l *Layer) bool {
	_, ok := l.Image.(driver.Reparenter)
	return ok
}

func reparent(l *Layer, ref *driver.ParentRef) error {
	rp, ok := l.Image.(driver.Reparenter)
	if !ok {
		return driver.Errorf(ErrUnsupported, l.Name, -1, "format %s cannot change its parent reference", l.Format.Name)
	}
	if err := rp.SetParent(ref); err != nil {
		return driver.WithFile(err, "set parent", l.Name)
	}
	return driver.WithFile(l.Image.Flush(), "flush", l.Name)
}

// refreshParentMod records target's modification UUID in child, the image
// right above it, where both record UUIDs: writing into target changed it
// (VDMerge does the same), and a stale one makes every open warn.
func refreshParentMod(child, target *Layer) error {
	cid, ok := child.Image.(driver.Identifier)
	tid, ok2 := target.Image.(driver.Identifier)
	if !ok || !ok2 {
		return nil
	}
	m, old := tid.ModificationUUID(), cid.ParentModificationUUID()
	if m == "" || old == "" || strings.EqualFold(m, old) {
		return nil
	}
	if err := cid.SetParentModificationUUID(m); err != nil {
		return driver.WithFile(err, "set parent modification UUID", child.Name)
	}
	return driver.WithFile(child.Image.Flush(), "flush", child.Name)
}

// copyRuns copies into layer dst every run of [0, size) that the sub-chain
// [from, to) of d holds (status depth within the range), reading the content
// through layer from's view of the chain, then flushes dst. Zero runs are
// written as zeroes so they shadow what lies below.
func (d *Disk) copyRuns(ctx context.Context, dst *Layer, from, to int, size int64, progress Progress) error {
	const step = 64 << 20 // progress granularity
	if progress != nil {
		progress(0, size)
	}
	for off := int64(0); off < size; off += step {
		end := min(size, off+step)
		if err := d.copyRunsRange(ctx, dst, from, to, off, end); err != nil {
			return err
		}
		if progress != nil {
			progress(end, size)
		}
	}
	return driver.WithFile(dst.Image.Flush(), "flush", dst.Name)
}

func writeZeroes(l *Layer, off, n int64) error {
	if z, ok := l.Image.(driver.Zeroer); ok {
		if err := z.WriteZeroes(off, n, false); err == nil {
			return nil
		} else if !errors.Is(err, ErrUnsupported) {
			return driver.WithFile(err, "write zeroes", l.Name)
		}
	}
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		c := min(n, int64(len(buf)))
		if _, err := l.Image.WriteAt(buf[:c], off); err != nil {
			return driver.WithFile(err, "write zeroes", l.Name)
		}
		off += c
		n -= c
	}
	return nil
}

// Merge merges layers from..to (inclusive, top-first indices, 0 = top) of
// the chain of name into one image, as VirtualBox's VDMerge does.
//
// Forward (from < to): the content of layers from..to-1 is written into
// layer to, and those layers leave the chain: the layer above from is
// reparented onto to (when from is the top, to becomes the chain's top).
// Backward (from > to): the content of layers to+1..from is copied into
// the unallocated parts of layer to, which is then reparented onto the
// layer below from (or made standalone when from is the base).
//
// The chain reads the same at every moment of the operation, so an
// interrupted merge loses nothing. Images that leave the chain are not
// deleted; Merge returns their names.
func Merge(ctx context.Context, name string, from, to int, o *MergeOptions) ([]string, error) {
	oo := o.open()
	if from == to {
		return nil, nil
	}
	if from < 0 || to < 0 {
		return nil, driver.OptionErrorf("merge %s: negative layer index", name)
	}
	writable := map[int]bool{to: true}
	if from < to && from > 0 {
		writable[from-1] = true
	}
	if from > to && to > 0 {
		writable[to-1] = true // its parent modification UUID changes
	}
	d, err := openWritable(ctx, name, oo, writable)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	n := len(d.layers)
	if from >= n || to >= n {
		return nil, driver.OptionErrorf("merge %s: the chain has %d layers (0..%d), asked for %d..%d", name, n, n-1, from, to)
	}
	// Refuse before writing anything when a reference cannot be rewritten.
	relink := -1
	if from < to && from > 0 {
		relink = from - 1
	} else if from > to {
		relink = to
	}
	if relink >= 0 {
		if l := d.layers[relink]; !canReparent(l) {
			return nil, driver.Errorf(ErrUnsupported, l.Name, -1, "format %s cannot change its parent reference", l.Format.Name)
		}
	}
	var progress Progress
	if o != nil {
		progress = o.Progress
	}
	var dropped []string
	if from < to {
		target := d.layers[to]
		size := d.layers[from].Image.Size()
		if target.Image.Size() < size {
			r, ok := target.Image.(driver.Resizer)
			if !ok {
				return nil, driver.Errorf(ErrUnsupported, target.Name, -1, "the merge target is smaller than the merged images and format %s cannot grow", target.Format.Name)
			}
			if err := r.Resize(ctx, size, "off"); err != nil {
				return nil, driver.WithFile(err, "resize", target.Name)
			}
		}
		if err := d.copyRuns(ctx, target, from, to, min(size, target.Image.Size()), progress); err != nil {
			return nil, err
		}
		if from > 0 {
			if err := reparent(d.layers[from-1], parentRefFor(d.layers[from-1], target)); err != nil {
				return nil, err
			}
		}
		for _, l := range d.layers[from:to] {
			dropped = append(dropped, l.Name)
		}
		return dropped, nil
	}
	// Backward: fill the unallocated parts of to from the layers below it.
	target := d.layers[to]
	size := target.Image.Size()
	if err := d.copyUnallocated(ctx, target, to, from+1, size, progress); err != nil {
		return nil, err
	}
	var ref *driver.ParentRef
	if from+1 < n {
		ref = parentRefFor(target, d.layers[from+1])
	}
	if err := reparent(target, ref); err != nil {
		return nil, err
	}
	if to > 0 {
		if err := refreshParentMod(d.layers[to-1], target); err != nil {
			return nil, err
		}
	}
	for _, l := range d.layers[to+1 : from+1] {
		dropped = append(dropped, l.Name)
	}
	return dropped, nil
}

// copyUnallocated writes into layer (index at) the content that layers
// at+1..below-1 provide where layer at itself is unallocated.
func (d *Disk) copyUnallocated(ctx context.Context, dst *Layer, at, below int, size int64, progress Progress) error {
	off := int64(0)
	for off < size {
		if err := ctx.Err(); err != nil {
			return err
		}
		e, err := dst.Image.Status(off, size-off)
		if err != nil {
			return driver.WithFile(err, "status", dst.Name)
		}
		if e.Length <= 0 || e.Length > size-off {
			return driver.Corruptf(dst.Name, off, "bad status run length %d", e.Length)
		}
		if e.State == driver.Unallocated {
			// Copy what the layers between at+1 and below-1 hold here.
			if err := d.copyRunsRange(ctx, dst, at+1, below, off, off+e.Length); err != nil {
				return err
			}
		}
		off += e.Length
		if progress != nil {
			progress(off, size)
		}
	}
	return driver.WithFile(dst.Image.Flush(), "flush", dst.Name)
}

// copyRunsRange is copyRuns over [off, end) without the final flush.
func (d *Disk) copyRunsRange(ctx context.Context, dst *Layer, from, to int, off, end int64) error {
	buf := make([]byte, min(end-off, 2<<20))
	for off < end {
		if err := ctx.Err(); err != nil {
			return err
		}
		e, err := d.statusFrom(from, off, end-off)
		if err != nil {
			return err
		}
		if !e.Present || e.Depth >= to {
			off += e.Length
			continue
		}
		runEnd := off + e.Length
		for off < runEnd {
			n := min(int64(len(buf)), runEnd-off)
			p := buf[:n]
			if e.Data {
				if err := d.readFrom(from, p, off); err != nil {
					return err
				}
			}
			if !e.Data || driver.IsZero(p) {
				if err := writeZeroes(dst, off, n); err != nil {
					return err
				}
			} else if _, err := dst.Image.WriteAt(p, off); err != nil {
				return driver.WithFile(err, "write", dst.Name)
			}
			off += n
		}
	}
	return nil
}

// Commit writes the content of the top image of name (and of the layers
// between it and base) into base, as qemu-img commit does. base is the
// layer index (1 = the direct backing file, the default when 0). Unless
// keep is set, the top is then emptied and reparented onto base, so the
// chain reads the same with the committed layers gone from it.
func Commit(ctx context.Context, name string, base int, keep bool, o *MergeOptions) error {
	if base <= 0 {
		base = 1
	}
	oo := o.open()
	// base-1 stays right above base: its parent modification UUID changes.
	d, err := openWritable(ctx, name, oo, map[int]bool{0: true, base - 1: true, base: true})
	if err != nil {
		return err
	}
	defer d.Close()
	if base >= len(d.layers) {
		return driver.OptionErrorf("commit %s: the image has no backing file at depth %d", name, base)
	}
	var progress Progress
	if o != nil {
		progress = o.Progress
	}
	top, target := d.layers[0], d.layers[base]
	size := top.Image.Size()
	if target.Image.Size() < size {
		r, ok := target.Image.(driver.Resizer)
		if !ok {
			return driver.Errorf(ErrUnsupported, target.Name, -1, "the backing file is smaller than the image and format %s cannot grow", target.Format.Name)
		}
		if err := r.Resize(ctx, size, "off"); err != nil {
			return driver.WithFile(err, "resize", target.Name)
		}
	}
	if err := d.copyRuns(ctx, target, 0, base, size, progress); err != nil {
		return err
	}
	if keep {
		// As documented (and as qemu-img commit -d/-b): the chain stays as
		// it was; it reads the same, base now holding the data as well.
		return refreshParentMod(d.layers[base-1], target)
	}
	if base == 1 {
		if err := refreshParentMod(top, target); err != nil {
			return err
		}
	}
	// Point the top at base first (its data equals base's now), then empty it.
	if base > 1 {
		if err := reparent(top, parentRefFor(top, target)); err != nil {
			return err
		}
	}
	if em, ok := top.Image.(driver.Emptier); ok {
		if err := em.MakeEmpty(); err != nil {
			return driver.WithFile(err, "empty", top.Name)
		}
		return driver.WithFile(top.Image.Flush(), "flush", top.Name)
	}
	d.log.Info("the image format cannot be emptied; its data stays (it equals the backing file's now)", "image", top.Name)
	return nil
}

// Rebase changes the backing file of name to backing (with format
// backingFmt; "" probes, never guessing raw). In safe mode every range the
// image does not hold itself and where the old and new backing chains
// differ is first copied into the image, so its content stays the same;
// unsafe only rewrites the reference. backing "" makes the image
// standalone.
func Rebase(ctx context.Context, name, backing, backingFmt string, unsafe bool, o *MergeOptions) error {
	oo := o.open()
	var d *Disk
	var err error
	if unsafe {
		// The old backing may be missing: open the top alone.
		top, err := openLayer(ctx, oo.storage(), oo.logger(), name, oo.Format, nil, layerFlags{writable: true, topLevel: true, unsafePaths: oo.AllowUnsafeBacking})
		if err != nil {
			return err
		}
		d = newDisk([]*Layer{top}, false, oo.storage(), oo.logger())
	} else {
		d, err = openWritable(ctx, name, oo, map[int]bool{0: true})
		if err != nil {
			return err
		}
	}
	defer d.Close()
	top := d.layers[0]
	var nb *Disk
	var ref *driver.ParentRef
	if backing != "" {
		bpath, err := resolveParent(name, backing, oo.AllowUnsafeBacking || filepath.IsAbs(backing))
		if err != nil {
			return err
		}
		nb, err = openParentDisk(ctx, bpath, backingFmt, oo.storage(), oo.logger(), oo.AllowUnsafeBacking)
		switch {
		case err == nil:
			defer nb.Close()
			bt := nb.layers[0]
			ref = &driver.ParentRef{Name: backing, Format: bt.Format.Name}
			if id, ok := bt.Image.(driver.Identifier); ok {
				ref.UUID, ref.ModUUID = id.UUID(), id.ModificationUUID()
			}
		case unsafe && backingFmt != "" && errors.Is(err, ErrNotFound) && knownFormat(backingFmt):
			// Like qemu-img rebase -u -F: the reference is only rewritten,
			// so the new backing file need not exist (yet).
			oo.logger().Warn("the new backing file does not exist; recording the reference anyway", "image", name, "backing", backing, "error", err)
			ref = &driver.ParentRef{Name: backing, Format: backingFmt}
		default:
			return err
		}
	}
	if !unsafe {
		var progress Progress
		if o != nil {
			progress = o.Progress
		}
		if err := d.rebaseCopy(ctx, top, nb, progress); err != nil {
			return err
		}
	}
	return reparent(top, ref)
}

// rebaseCopy copies into top, where top is unallocated, the old backing
// content wherever it differs from the new backing's (nil: zeros).
func (d *Disk) rebaseCopy(ctx context.Context, top *Layer, nb *Disk, progress Progress) error {
	size := top.Image.Size()
	g := d.gran
	if g < 4096 {
		g = 4096
	}
	chunk := max(g, 1<<20/g*g)
	oldBuf := make([]byte, chunk)
	newBuf := make([]byte, chunk)
	off := int64(0)
	for off < size {
		if err := ctx.Err(); err != nil {
			return err
		}
		e, err := top.Image.Status(off, size-off)
		if err != nil {
			return driver.WithFile(err, "status", top.Name)
		}
		if e.Length <= 0 || e.Length > size-off {
			return driver.Corruptf(top.Name, off, "bad status run length %d", e.Length)
		}
		end := off + e.Length
		if e.State != driver.Unallocated {
			off = end
			continue
		}
		for off < end {
			// Whole granules so a differing piece is written once.
			n := min(chunk-(off%g), end-off)
			op, np := oldBuf[:n], newBuf[:n]
			if err := d.readFrom(1, op, off); err != nil {
				return err
			}
			if err := readPadded(nb, np, off); err != nil {
				return err
			}
			for i := int64(0); i < n; {
				j := min(n, i+g-(off+i)%g)
				if !bytes.Equal(op[i:j], np[i:j]) {
					if _, err := top.Image.WriteAt(op[i:j], off+i); err != nil {
						return driver.WithFile(err, "write", top.Name)
					}
				}
				i = j
			}
			off += n
			if progress != nil {
				progress(off, size)
			}
		}
	}
	return driver.WithFile(top.Image.Flush(), "flush", top.Name)
}

func knownFormat(name string) bool {
	_, err := driver.Lookup(name)
	return err == nil
}

// readPadded reads from d (nil: nothing) with zeros past its end.
func readPadded(d *Disk, p []byte, off int64) error {
	clear(p)
	if d == nil || off >= d.size {
		return nil
	}
	n := min(int64(len(p)), d.size-off)
	return d.readFrom(0, p[:n], off)
}
