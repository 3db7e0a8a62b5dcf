package vdisk

import (
	"context"
)

// The file-name forms of the live jobs: each opens the chain of name (top
// read-write; the job reopens the layers it writes), runs the Disk's
// method and closes the disk.

func openForJob(ctx context.Context, name string, o *OpenOptions, topOnly bool) (*Disk, error) {
	oo := OpenOptions{}
	if o != nil {
		oo = *o
	}
	oo.ReadOnly, oo.InfoOnly, oo.Snapshot = false, false, ""
	if topOnly {
		oo.NoBacking = true
	}
	return Open(ctx, name, &oo)
}

// closeAfter closes d, keeping err when there is one.
func closeAfter(d *Disk, err error) error {
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// Commit writes the content of the top image of name (and of the layers
// between it and o.Base) into o.Base, as qemu-img commit does; see
// Disk.Commit.
func Commit(ctx context.Context, name string, o *CommitOptions) error {
	if o == nil {
		o = &CommitOptions{}
	}
	d, err := openForJob(ctx, name, o.Open, false)
	if err != nil {
		return err
	}
	return closeAfter(d, d.Commit(ctx, o))
}

// Merge merges layers from..to of the chain of name, as VirtualBox's
// VDMerge does; see Disk.Merge. It returns the names of the images that
// left the chain (they are not deleted).
func Merge(ctx context.Context, name string, from, to int, o *MergeOptions) ([]string, error) {
	var oo *OpenOptions
	if o != nil {
		oo = o.Open
	}
	d, err := openForJob(ctx, name, oo, false)
	if err != nil {
		return nil, err
	}
	dropped, err := d.Merge(ctx, from, to, o)
	return dropped, closeAfter(d, err)
}

// Stream pulls the chain of name into its top image; see Disk.Stream.
func Stream(ctx context.Context, name string, o *StreamOptions) ([]string, error) {
	var oo *OpenOptions
	if o != nil {
		oo = o.Open
	}
	d, err := openForJob(ctx, name, oo, false)
	if err != nil {
		return nil, err
	}
	dropped, err := d.Stream(ctx, o)
	return dropped, closeAfter(d, err)
}

// Rebase changes the backing file of name to backing (with o.Format; ""
// probes, never guessing raw); see Disk.Rebase. With o.Unsafe the old
// backing chain is not opened (it may be missing).
func Rebase(ctx context.Context, name, backing string, o *RebaseOptions) error {
	if o == nil {
		o = &RebaseOptions{}
	}
	d, err := openForJob(ctx, name, o.Open, o.Unsafe)
	if err != nil {
		return err
	}
	return closeAfter(d, d.Rebase(ctx, backing, o))
}
