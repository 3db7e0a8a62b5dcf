package main

import (
	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

func (a *app) newRebaseCmd() *cobra.Command {
	var format, backing, backingFmt, cache, srcCache string
	var unsafe, prog, quiet bool
	cmd := &cobra.Command{
		Use:   "rebase [-f FMT] [-t CACHE] [-T SRC_CACHE] [-p] [-q] [-u] -b BACKING [-F BFMT] FILE",
		Short: "Change the backing file of an image",
		Long: `Make BACKING the backing file of FILE. A relative BACKING is relative to the
directory of FILE (it is recorded as given). '-b ""' removes the backing
file: FILE becomes standalone.

Safe mode (the default) first copies into FILE every range where FILE
holds nothing itself and the old and the new backing chains differ, so the
content of FILE stays the same. With -u (unsafe) only the reference is
rewritten: use it when the backing file was moved or renamed, or when the
new backing file is known to hold the same content. With -u and no -b the
reference is removed.`,
		Args: exactArgs(1, "expecting one image file name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			for _, c := range []string{cache, srcCache} {
				if err := checkCacheMode(c); err != nil {
					return err
				}
			}
			if !cmd.Flags().Changed("backing") && !unsafe {
				return usageErrorf("Must specify backing file (-b) or use unsafe mode (-u)")
			}
			return a.rebase(args[0], format, backing, backingFmt, unsafe, prog, quiet)
		},
	}
	addFormatFlag(cmd, &format, "image format of FILE (probed when not given)")
	cmd.Flags().StringVarP(&backing, "backing", "b", "", `new backing file ("" makes FILE standalone)`)
	cmd.Flags().StringVarP(&backingFmt, "backing-format", "F", "", "format of the new backing file (probed when not given; never guessed raw)")
	cmd.Flags().BoolVarP(&unsafe, "unsafe", "u", false, "only rewrite the reference; do not copy data")
	cmd.Flags().StringVarP(&cache, "cache", "t", "", "cache mode (accepted for compatibility, ignored)")
	cmd.Flags().StringVarP(&srcCache, "source-cache", "T", "", "cache mode of the backing files (accepted for compatibility, ignored)")
	addProgressFlag(cmd, &prog)
	addQuietFlag(cmd, &quiet)
	return cmd
}

func (a *app) rebase(name, format, backing, backingFmt string, unsafe, showProgress, quiet bool) error {
	if err := checkFormat(format); err != nil {
		return err
	}
	if err := checkFormat(backingFmt); err != nil {
		return err
	}
	// Refuse before copying anything when the format cannot record a
	// backing file.
	d, err := a.openTopInfo(name, format)
	if err != nil {
		return err
	}
	top := d.Top()
	_, ok := vdisk.As[driver.Reparenter](top)
	d.Close()
	if !ok {
		return driver.Unsupportedf(name, "format %s cannot record a backing file", top.Format.Name)
	}
	prog := a.newProgress(showProgress && !quiet)
	err = vdisk.Rebase(a.ctx, name, backing, &vdisk.RebaseOptions{
		Format:   backingFmt,
		Unsafe:   unsafe,
		Progress: prog.update,
		Open:     a.oo(vdisk.OpenOptions{Format: format, Paths: a.policy(), Logger: a.log}),
	})
	prog.finish(err == nil)
	return err
}
