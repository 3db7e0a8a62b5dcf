package main

import (
	"github.com/spf13/cobra"
)

func (a *app) newCompactCmd() *cobra.Command {
	var format string
	var prog, quiet bool
	cmd := &cobra.Command{
		Use:   "compact [-f FMT] [-p] [-q] FILE",
		Short: "Free the blocks of an image that hold nothing of value (VirtualBox's compact)",
		Long: `Free the blocks of FILE (its top image) that are all zeros or equal to the
content of its backing chain, and shrink the file where the format
supports it, as VirtualBox's VDCompact does. The content of the chain does
not change; an interrupted compact loses nothing.`,
		Args: exactArgs(1, "expecting one image file name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.compact(args[0], format, prog && !quiet)
		},
	}
	addFormatFlag(cmd, &format, "image format (probed when not given)")
	addProgressFlag(cmd, &prog)
	addQuietFlag(cmd, &quiet)
	return cmd
}

func (a *app) compact(name, format string, showProgress bool) error {
	if err := checkFormat(format); err != nil {
		return err
	}
	d, err := a.openRW(name, format, false)
	if err != nil {
		return err
	}
	defer d.Close()
	prog := a.newProgress(showProgress)
	err = d.Compact(a.ctx, prog.update)
	if err == nil {
		err = d.Close()
	}
	prog.finish(err == nil)
	return err
}
