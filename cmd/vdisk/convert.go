package main

import (
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

type convertFlags struct {
	srcFmt, outFmt     string
	opts               []string
	backing, backFmt   string
	progress, quiet    bool
	workers            int
	outOfOrder         bool
	sparse             string
	noCreate           bool
	targetIsZero       bool
	compress           bool
	snapshot           string
	cache, sourceCache string
}

func (a *app) newConvertCmd() *cobra.Command {
	var fl convertFlags
	cmd := &cobra.Command{
		Use:   "convert [-f FMT] [-O FMT] [-o OPTIONS] [-B BACKING [-F BFMT]] [-p] [-q] [-m N] [-W] [-S SIZE] [-n] [-c] [-l SNAPSHOT] [-U] SRC DST",
		Short: "Convert an image to another format",
		Long: `Copy the content of SRC (its whole backing chain, flattened) into a new image
DST of format FMT (raw when not given). Holes and zero runs stay sparse.
With -n, DST exists already and is written over. On failure or interrupt,
a DST created by this run is removed.`,
		Args: helpArgs(&fl.opts, exactArgs(2, "expecting a source and a target image file name")),
		RunE: func(cmd *cobra.Command, args []string) error {
			for len(args) < 2 {
				args = append(args, "")
			}
			return a.convert(args[0], args[1], &fl, cmd.Flags().Changed("output-format"))
		},
	}
	f := cmd.Flags()
	addFormatFlag(cmd, &fl.srcFmt, "source image format (probed when not given)")
	f.StringVarP(&fl.outFmt, "output-format", "O", "raw", "target image format")
	f.StringArrayVarP(&fl.opts, "options", "o", nil, "target format options, comma-separated key=value list ('-o help' lists them)")
	f.StringVarP(&fl.backing, "backing", "B", "", "create the target as a differencing image on top of this backing file")
	f.StringVarP(&fl.backFmt, "backing-format", "F", "", "format of the -B backing file")
	f.BoolVarP(&fl.progress, "progress", "p", false, "show progress")
	f.BoolVarP(&fl.quiet, "quiet", "q", false, "print nothing but errors")
	f.IntVarP(&fl.workers, "num-coroutines", "m", 8, "number of parallel workers (1 to 16)")
	f.BoolVarP(&fl.outOfOrder, "out-of-order", "W", false, "allow writes to reach the target out of order")
	f.StringVarP(&fl.sparse, "sparse-size", "S", "4k", "zero runs of at least this size (multiple of 512) stay holes; 0 allocates everything")
	f.BoolVarP(&fl.noCreate, "no-create", "n", false, "do not create the target: write over an existing image")
	f.BoolVar(&fl.targetIsZero, "target-is-zero", false, "with -n: the existing target already reads as zeros")
	f.BoolVarP(&fl.compress, "compress", "c", false, "compress the target's data (formats with compression only)")
	f.StringVarP(&fl.snapshot, "snapshot", "l", "", "convert an internal snapshot: snapshot.name=NAME, snapshot.id=ID or ID_OR_NAME")
	f.StringVarP(&fl.cache, "cache", "t", "unsafe", "target cache mode: unsafe (qemu-img's default: no final sync, the kernel writes back) or writeback, writethrough, none, directsync (sync the target before exiting)")
	f.StringVarP(&fl.sourceCache, "source-cache", "T", "", "source cache mode (accepted for compatibility, ignored)")
	addForceShareFlag(cmd)
	return cmd
}

func (a *app) convert(src, dst string, fl *convertFlags, outGiven bool) (err error) {
	// Check everything that can be checked before touching any file.
	if fl.workers < 1 || fl.workers > 16 {
		return usageErrorf("invalid number of workers %d: allowed is 1 to 16", fl.workers)
	}
	zd, err := driver.ParseSize(fl.sparse)
	if err != nil || zd%512 != 0 || zd > 16<<20 {
		return usageErrorf("invalid sparse size %q: valid sizes are multiples of 512 up to 16M", fl.sparse)
	}
	if zd == 0 {
		zd = -1 // fully allocated, as qemu-img -S 0
	}
	for _, c := range []string{fl.cache, fl.sourceCache} {
		switch c {
		case "", "none", "writeback", "writethrough", "directsync", "unsafe":
		default:
			return usageErrorf("invalid cache mode %q", c)
		}
	}
	if fl.targetIsZero && !fl.noCreate {
		return usageErrorf("--target-is-zero requires -n")
	}
	if fl.noCreate && fl.backing != "" {
		return usageErrorf("-B cannot be used with -n")
	}
	if fl.backFmt != "" && fl.backing == "" {
		return usageErrorf("-F requires -B")
	}
	outFmt, err := driver.Lookup(fl.outFmt)
	if err != nil {
		return err
	}
	if fl.srcFmt != "" {
		if _, err := driver.Lookup(fl.srcFmt); err != nil {
			return err
		}
	}
	kvs, err := parseOptionArgs(fl.opts)
	if err != nil {
		return err
	}
	if wantsHelp(kvs) {
		printOptionHelp(a.stdout, outFmt)
		return nil
	}
	iopt := splitImageOptions(kvs)
	if iopt.size != "" {
		return driver.OptionErrorf("option size is not valid for convert: the target takes the source's size")
	}
	backing, err := mergeFlag(fl.backing, iopt.backing, "-B", "backing_file")
	if err != nil {
		return err
	}
	backFmt, err := mergeFlag(fl.backFmt, iopt.backingFmt, "-F", "backing_fmt")
	if err != nil {
		return err
	}
	if fl.noCreate && len(kvs) > 0 {
		return driver.OptionErrorf("-o has no effect when skipping image creation (-n)")
	}
	if _, err := driver.ParseOptions(outFmt.Name, outFmt.CreateOptions, iopt.rest); err != nil {
		return driver.WithFile(err, "create", dst)
	}
	if fl.compress {
		if outFmt.Caps&driver.CapCompress == 0 {
			return driver.Unsupportedf(dst, "format %s does not support compression (-c)", outFmt.Name)
		}
		if fl.noCreate || backing != "" {
			return driver.Unsupportedf(dst, "compressed output (-c) needs a new target without a backing file")
		}
	}
	if fl.noCreate && !outGiven {
		// The target exists: name its format only when the user did.
		outFmt = nil
	}

	if si, err := os.Stat(src); err == nil {
		if di, err := os.Stat(dst); err == nil && os.SameFile(si, di) {
			return driver.OptionErrorf("the source and the target are the same file (%s)", dst)
		}
	}

	s, err := a.openRO(src, fl.srcFmt, false)
	if err != nil {
		return err
	}
	if fl.snapshot != "" {
		v, err := a.openSnapshot(s, fl.srcFmt, fl.snapshot)
		if err != nil {
			s.Close()
			return err
		}
		s = v
	}
	defer s.Close()

	// Incremental copy: when the backing file of the target is an image of
	// the source's chain, only the layers above it are copied.
	above := 0
	if backing != "" && !fl.noCreate {
		above = layerAbove(s, dst, backing)
	}

	var d *vdisk.Disk
	created := false
	if fl.noCreate {
		format := ""
		if outFmt != nil {
			format = outFmt.Name
		}
		d, err = vdisk.Open(a.ctx, dst, &vdisk.OpenOptions{Format: format, Logger: a.log})
	} else {
		d, err = vdisk.Create(a.ctx, dst, &vdisk.CreateOptions{
			Format:             outFmt.Name,
			Size:               s.Size(),
			Options:            iopt.rest,
			Backing:            backing,
			BackingFormat:      backFmt,
			Overwrite:          true,
			AllowUnsafeBacking: true,
			Logger:             a.log,
		})
		created = err == nil
	}
	if err != nil {
		return err
	}
	closed := false
	defer func() {
		if !closed {
			if cerr := d.Close(); cerr != nil && err == nil {
				err = cerr
			}
		}
		if err != nil && created {
			if rerr := d.Storage().Remove(dst); rerr != nil {
				a.log.Warn("could not remove the incomplete target", "file", dst, "error", rerr)
			}
		}
	}()
	if a.hooks.afterCreate != nil {
		a.hooks.afterCreate()
	}

	prog := a.newProgress(fl.progress && !fl.quiet)
	err = vdisk.Convert(a.ctx, d, s, &vdisk.ConvertOptions{
		Workers:    fl.workers,
		ZeroDetect: zd,
		// An existing target, or a differencing one (whose holes show the
		// backing file), does not read as zeros where the source does.
		TargetNotZero: (fl.noCreate && !fl.targetIsZero) || backing != "",
		Sequential:    !fl.outOfOrder,
		Progress:      prog.update,
		Above:         above,
		Compress:      fl.compress,
	})
	if err == nil {
		err = a.ctx.Err()
	}
	if err != nil {
		prog.finish(false)
		return err
	}
	closed = true
	if fl.cache == "unsafe" {
		err = d.CloseUnsynced()
	} else {
		err = d.Close()
	}
	if err != nil {
		prog.finish(false)
		return err
	}
	prog.finish(true)
	return nil
}

// layerAbove returns the depth of the layer of src's chain that backing
// (a backing file name as the target dst records it: relative names are
// relative to dst's directory) names, or 0 when it names none of the
// layers below the top.
func layerAbove(src *vdisk.Disk, dst, backing string) int {
	path := backing
	if !filepath.IsAbs(path) {
		path = filepath.Join(filepath.Dir(dst), backing)
	}
	for i, l := range src.Layers() {
		if i > 0 && sameFile(path, l.Name) {
			return i
		}
	}
	return 0
}

// openSnapshot handles -l: it finds the snapshot named by param
// (snapshot.name=NAME, snapshot.id=ID or ID_OR_NAME, as qemu-img) in the
// top image of s and returns the chain opened at that snapshot, read-only.
// s is closed on success.
func (a *app) openSnapshot(s *vdisk.Disk, format, param string) (*vdisk.Disk, error) {
	top := s.Top()
	sn, ok := top.Image.(driver.Snapshotter)
	if !ok {
		return nil, driver.Unsupportedf(top.Name, "format %s has no internal snapshots (-l)", top.Format.Name)
	}
	var id, name string
	if strings.Contains(param, "=") {
		kvs, err := driver.SplitOptions(param)
		if err != nil {
			return nil, err
		}
		for _, kv := range kvs {
			switch kv.Key {
			case "snapshot.name":
				name = kv.Value
			case "snapshot.id":
				id = kv.Value
			default:
				return nil, driver.OptionErrorf("invalid snapshot parameter %q (use snapshot.name=NAME or snapshot.id=ID)", kv.Key)
			}
		}
	} else {
		id, name = param, param
	}
	list, err := sn.Snapshots()
	if err != nil {
		return nil, driver.WithFile(err, "list snapshots", top.Name)
	}
	// An ID matches before a name, as in qemu.
	found := -1
	for i, x := range list {
		if id != "" && x.ID == id && (name == "" || name == id || x.Name == name) {
			found = i
			break
		}
	}
	if found < 0 && name != "" {
		for i, x := range list {
			if x.Name == name && (id == "" || id == name) {
				found = i
				break
			}
		}
	}
	if found < 0 {
		return nil, driver.Errorf(vdisk.ErrNotFound, top.Name, -1, "no snapshot %q", param)
	}
	v, err := vdisk.Open(a.ctx, top.Name, &vdisk.OpenOptions{
		Format:             format,
		Snapshot:           list[found].ID,
		AllowUnsafeBacking: true,
		Logger:             a.log,
	})
	if err != nil {
		return nil, err
	}
	s.Close()
	return v, nil
}
