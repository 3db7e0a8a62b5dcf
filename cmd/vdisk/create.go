package main

import (
	"errors"
	"fmt"
	"math"

	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

func (a *app) newCreateCmd() *cobra.Command {
	var format, backing, backingFmt string
	var opts []string
	var unsafe, quiet bool
	cmd := &cobra.Command{
		Use:   "create [-f FMT] [-o OPTIONS] [-b BACKING [-F BFMT]] [-u] [-q] FILE [SIZE]",
		Short: "Create a new image",
		Long: `Create the image FILE of format FMT (raw when not given) and virtual size SIZE
(with optional k, M, G, T, P or E suffix, powers of 1024). An existing FILE
is overwritten. With -b, FILE is a differencing image on top of BACKING and
SIZE defaults to the backing image's. '-o help' lists the format's options.`,
		Args: helpArgs(&opts, rangeArgs(1, 2, "expecting an image file name and an optional size")),
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				args = []string{""}
			}
			size := ""
			if len(args) == 2 {
				size = args[1]
			}
			return a.create(args[0], size, format, backing, backingFmt, opts, unsafe, quiet)
		},
	}
	addFormatFlag(cmd, &format, "image format (default raw)")
	cmd.Flags().StringArrayVarP(&opts, "options", "o", nil, "format options, comma-separated key=value list ('-o help' lists them)")
	cmd.Flags().StringVarP(&backing, "backing", "b", "", "create a differencing image on top of this backing file")
	cmd.Flags().StringVarP(&backingFmt, "backing-format", "F", "", "format of the backing file")
	cmd.Flags().BoolVarP(&unsafe, "unsafe", "u", false, "accepted for compatibility: the backing file is still opened to check it")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "print nothing but errors")
	return cmd
}

func roundSector(n int64) int64 {
	if n > math.MaxInt64-511 {
		return n
	}
	return (n + 511) &^ 511
}

func (a *app) create(name, sizeArg, format, backing, backingFmt string, optArgs []string, unsafe, quiet bool) error {
	if format == "" {
		format = "raw"
	}
	f, err := driver.Lookup(format)
	if err != nil {
		return err
	}
	kvs, err := parseOptionArgs(optArgs)
	if err != nil {
		return err
	}
	if wantsHelp(kvs) {
		printOptionHelp(a.stdout, f)
		return nil
	}
	iopt := splitImageOptions(kvs)
	if backing, err = mergeFlag(backing, iopt.backing, "-b", "backing_file"); err != nil {
		return err
	}
	if backingFmt, err = mergeFlag(backingFmt, iopt.backingFmt, "-F", "backing_fmt"); err != nil {
		return err
	}
	if sizeArg == "" {
		sizeArg = iopt.size
	}
	var size int64
	if sizeArg != "" {
		if size, err = parseImageSize(sizeArg); err != nil {
			return err
		}
	} else if backing == "" {
		return driver.Errorf(vdisk.ErrInvalidOption, name, -1, "image creation needs a size parameter")
	}
	if backingFmt != "" {
		if _, err := driver.Lookup(backingFmt); err != nil {
			return err
		}
	}
	// Validate the options before printing anything, as qemu-img does.
	drvOpts, err := vdisk.DriverCreateOptions(f.Name, iopt.rest)
	if err != nil {
		return driver.WithFile(err, "create", name)
	}
	vals, err := driver.ParseOptions(f.Name, f.CreateOptions, drvOpts)
	if err != nil {
		return driver.WithFile(err, "create", name)
	}
	if unsafe {
		a.log.Debug("-u: the library opens the backing file anyway to record its format and size")
	}
	if !quiet && sizeArg != "" {
		fmt.Fprintln(a.stdout, formattingLine(name, f, size, backing, backingFmt, iopt.rest, vals))
	}
	d, err := vdisk.Create(a.ctx, name, a.co(vdisk.CreateOptions{
		Format: f.Name,
		// qemu rounds every new image up to whole 512-byte sectors (and
		// still prints the size as given).
		Size:          roundSector(size),
		Options:       iopt.rest,
		Backing:       backing,
		BackingFormat: backingFmt,
		Overwrite:     true, // qemu-img create replaces an existing file
		Paths:         a.policy(),
		Logger:        a.log,
	}))
	if err != nil {
		return err
	}
	if !quiet && sizeArg == "" {
		bf := backingFmt
		if ls := d.Layers(); bf == "" && len(ls) > 1 {
			bf = ls[1].Format.Name
		}
		fmt.Fprintln(a.stdout, formattingLine(name, f, d.Size(), backing, bf, iopt.rest, vals))
	}
	if err := d.Close(); err != nil {
		// The image may be incomplete: do not leave it behind.
		if rerr := vdisk.Remove(a.ctx, name, a.oo(vdisk.OpenOptions{})); rerr != nil {
			err = errors.Join(err, rerr)
		}
		return err
	}
	return nil
}
