package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/osfs"
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
	output             string
	noOffload          bool
	copyRange          bool
}

func (a *app) newConvertCmd() *cobra.Command {
	var fl convertFlags
	cmd := &cobra.Command{
		Use:   "convert [-f FMT] [-O FMT] [-o OPTIONS] [-B BACKING [-F BFMT]] [-p] [-q] [-m N] [-W] [-S SIZE] [-n] [-c] [-l SNAPSHOT] [-U] [-C] [--no-offload] [--output human|json] SRC DST",
		Short: "Convert an image to another format",
		Long: `Copy the content of SRC (its whole backing chain, flattened) into a new image
DST of format FMT (raw when not given). Holes and zero runs stay sparse.
With -n, DST exists already and is written over. On failure or interrupt,
a DST created by this run is removed.

Copy offload: where a run of SRC is stored byte for byte in a local file
(raw, fixed VHD and VDI data areas and allocated VDI blocks, VHD blocks,
flat and uncompressed sparse VMDK extents, uncompressed unencrypted qcow2
clusters) and DST is a raw file (or a VHD, VHDX, QED or Parallels image) on the
same storage, the kernel copies it: FICLONERANGE reflinks where the file
system shares blocks (XFS, btrfs, OpenZFS, ...) and the run is
block-aligned in both files, else copy_file_range where the file system
copies on the server (NFS, SMB, Ceph): qemu-img's -C, done by default
where it pays. Elsewhere copy_file_range is the kernel's page-cache copy,
which runs each range's read and write in turn: reading and writing on
every core is faster there, so vdisk does that unless -C asks for
copy_file_range anyway.
Unallocated and zero runs and holes of
the source file stay holes; zeros a format stores as data (a block's
padding) are copied as stored. --no-offload reads and writes every byte
instead (zero detection then applies inside data, as -S says).

--output json prints, when the copy is done, one object of statistics in
bytes of virtual size (qemu-img has no equivalent; the names are stable):
  read-bytes             data read from SRC by vdisk
  written-bytes          data written to DST by vdisk
  offloaded-bytes        data the kernel copied (reflinked + copy_file_range)
  reflinked-bytes        part of offloaded-bytes shared by reflink
  copy-file-range-bytes  part of offloaded-bytes copied by copy_file_range
  zero-bytes             runs reading as zeros (left as holes, or zeroed)
  skipped-bytes          runs DST's backing file holds (incremental copy)
  elapsed-seconds        wall-clock time of the copy
written + offloaded + zero + skipped is the virtual size of SRC.`,
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
	f.BoolVarP(&fl.copyRange, "copy-range-offloading", "C", false, "use copy_file_range wherever the kernel takes it, also where it copies through the page cache (ext4, tmpfs)")
	f.BoolVar(&fl.noOffload, "no-offload", false, "never let the kernel copy file to file (copy_file_range, reflinks): read and write every byte")
	f.StringVar(&fl.output, "output", "human", "output format: human (nothing) or json (copy statistics)")
	addForceShareFlag(cmd)
	return cmd
}

// convertJSON is convert's --output json object.
type convertJSON struct {
	vdisk.ConvertStats
	CopyFileRange  int64   `json:"copy-file-range-bytes"`
	ElapsedSeconds float64 `json:"elapsed-seconds"`
}

func (a *app) printConvertStats(st vdisk.ConvertStats) error {
	data, err := json.MarshalIndent(convertJSON{ConvertStats: st, CopyFileRange: st.Offloaded - st.Reflinked,
		ElapsedSeconds: st.Elapsed.Seconds()}, "", "    ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(a.stdout, "%s\n", data)
	return err
}

func (a *app) convert(src, dst string, fl *convertFlags, outGiven bool) (err error) {
	// Check everything that can be checked before touching any file.
	zd, err := checkConvertFlags(fl)
	if err != nil {
		return err
	}
	asJSON, err := outputFormat(fl.output)
	if err != nil {
		return err
	}
	t, help, err := convertTargetOptions(dst, fl, outGiven)
	if err != nil {
		return err
	}
	if help {
		printOptionHelp(a.stdout, t.format)
		return nil
	}
	s, err := a.openConvertSource(src, dst, fl)
	if err != nil {
		return err
	}
	defer s.Close()

	// Incremental copy: when the backing file of the target is an image of
	// the source's chain, only the layers above it are copied.
	above := 0
	if t.backing != "" && !fl.noCreate {
		above = layerAbove(s, dst, t.backing)
	}

	d, created, err := a.openConvertTarget(dst, s.Size(), t, fl.noCreate)
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
			// An upload that failed left nothing to remove.
			if rerr := vdisk.Remove(a.ctx, dst, a.oo(vdisk.OpenOptions{})); rerr != nil && !errors.Is(rerr, driver.ErrNotFound) {
				a.log.Warn("could not remove the incomplete target", "file", dst, "error", rerr)
			}
		}
	}()
	if a.hooks.afterCreate != nil {
		a.hooks.afterCreate()
	}

	if fl.copyRange {
		defer osfs.SetCopyRangePolicy(osfs.SetCopyRangePolicy(osfs.CopyRangeAlways))
	}
	prog := a.newProgress(fl.progress && !fl.quiet)
	var stats vdisk.ConvertStats
	err = vdisk.Convert(a.ctx, d, s, &vdisk.ConvertOptions{
		NoOffload:  fl.noOffload,
		Stats:      &stats,
		Workers:    fl.workers,
		ZeroDetect: zd,
		// An existing target, or a differencing one (whose holes show the
		// backing file), does not read as zeros where the source does.
		TargetNotZero: (fl.noCreate && !fl.targetIsZero) || t.backing != "",
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
	if asJSON {
		return a.printConvertStats(stats)
	}
	return nil
}

// checkConvertFlags checks the flags that need no file and returns the
// zero detection size (-S; -1 for none).
func checkConvertFlags(fl *convertFlags) (int64, error) {
	if fl.workers < 1 || fl.workers > 16 {
		return 0, usageErrorf("invalid number of workers %d: allowed is 1 to 16", fl.workers)
	}
	zd, err := driver.ParseSize(fl.sparse)
	if err != nil || zd%512 != 0 || zd > 16<<20 {
		return 0, usageErrorf("invalid sparse size %q: valid sizes are multiples of 512 up to 16M", fl.sparse)
	}
	if zd == 0 {
		zd = -1 // fully allocated, as qemu-img -S 0
	}
	for _, c := range []string{fl.cache, fl.sourceCache} {
		switch c {
		case "", "none", "writeback", "writethrough", "directsync", "unsafe":
		default:
			return 0, usageErrorf("invalid cache mode %q", c)
		}
	}
	if fl.targetIsZero && !fl.noCreate {
		return 0, usageErrorf("--target-is-zero requires -n")
	}
	if fl.noCreate && fl.backing != "" {
		return 0, usageErrorf("-B cannot be used with -n")
	}
	if fl.backFmt != "" && fl.backing == "" {
		return 0, usageErrorf("-F requires -B")
	}
	return zd, nil
}

// convertTarget is what the flags and options say about convert's target.
type convertTarget struct {
	format           *driver.Format // nil: an existing target's own (-n without -O)
	opts             []driver.KV    // the create options
	backing, backFmt string
}

// convertTargetOptions resolves the target's format, create options and
// backing file from the flags, checking them. help reports that the
// options asked for help (t.format names the format to show).
func convertTargetOptions(dst string, fl *convertFlags, outGiven bool) (t convertTarget, help bool, err error) {
	if t.format, err = driver.Lookup(fl.outFmt); err != nil {
		return t, false, err
	}
	if fl.srcFmt != "" {
		if _, err := driver.Lookup(fl.srcFmt); err != nil {
			return t, false, err
		}
	}
	kvs, err := parseOptionArgs(fl.opts)
	if err != nil {
		return t, false, err
	}
	if wantsHelp(kvs) {
		return t, true, nil
	}
	iopt := splitImageOptions(kvs)
	if iopt.size != "" {
		return t, false, driver.OptionErrorf("option size is not valid for convert: the target takes the source's size")
	}
	if t.backing, err = mergeFlag(fl.backing, iopt.backing, "-B", "backing_file"); err != nil {
		return t, false, err
	}
	if t.backFmt, err = mergeFlag(fl.backFmt, iopt.backingFmt, "-F", "backing_fmt"); err != nil {
		return t, false, err
	}
	if fl.noCreate && len(kvs) > 0 {
		return t, false, driver.OptionErrorf("-o has no effect when skipping image creation (-n)")
	}
	drvOpts, err := vdisk.DriverCreateOptions(t.format.Name, iopt.rest)
	if err != nil {
		return t, false, driver.WithFile(err, "create", dst)
	}
	if _, err := driver.ParseOptions(t.format.Name, t.format.CreateOptions, drvOpts); err != nil {
		return t, false, driver.WithFile(err, "create", dst)
	}
	t.opts = iopt.rest
	if fl.compress {
		if t.format.Caps&driver.CapCompress == 0 {
			return t, false, driver.Unsupportedf(dst, "format %s does not support compression (-c)", t.format.Name)
		}
		if fl.noCreate || t.backing != "" {
			return t, false, driver.Unsupportedf(dst, "compressed output (-c) needs a new target without a backing file")
		}
	}
	if fl.noCreate && !outGiven {
		// The target exists: name its format only when the user did.
		t.format = nil
	}
	return t, false, nil
}

// openConvertSource opens convert's source (or the snapshot -l names),
// refusing a source that is the target file.
func (a *app) openConvertSource(src, dst string, fl *convertFlags) (*vdisk.Disk, error) {
	if si, err := os.Stat(src); err == nil {
		if di, err := os.Stat(dst); err == nil && os.SameFile(si, di) {
			return nil, driver.OptionErrorf("the source and the target are the same file (%s)", dst)
		}
	}
	s, err := a.openRO(src, fl.srcFmt, false)
	if err != nil {
		return nil, err
	}
	if fl.snapshot != "" {
		v, err := a.openSnapshot(s, fl.srcFmt, fl.snapshot)
		if err != nil {
			s.Close()
			return nil, err
		}
		s = v
	}
	return s, nil
}

// openConvertTarget creates the target with size bytes or, with noCreate,
// opens the existing one; created reports a target this run made.
func (a *app) openConvertTarget(dst string, size int64, t convertTarget, noCreate bool) (d *vdisk.Disk, created bool, err error) {
	if noCreate {
		format := ""
		if t.format != nil {
			format = t.format.Name
		}
		d, err = vdisk.Open(a.ctx, dst, a.oo(vdisk.OpenOptions{Format: format, Paths: a.policy(), Storage: a.hooks.storage, Logger: a.log}))
		return d, false, err
	}
	d, err = vdisk.Create(a.ctx, dst, a.co(vdisk.CreateOptions{
		Format:        t.format.Name,
		Size:          size,
		Options:       t.opts,
		Backing:       t.backing,
		BackingFormat: t.backFmt,
		Overwrite:     true,
		Paths:         a.policy(),
		Logger:        a.log,
	}))
	return d, err == nil, err
}

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
	sn, ok := vdisk.As[driver.Snapshotter](top)
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
	v, err := vdisk.Open(a.ctx, top.Name, a.oo(vdisk.OpenOptions{
		Format:   format,
		Snapshot: list[found].ID,
		Paths:    a.policy(),
		Logger:   a.log,
	}))
	if err != nil {
		return nil, err
	}
	s.Close()
	return v, nil
}
