package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk"
)

func (a *app) newCompareCmd() *cobra.Command {
	var fmtA, fmtB string
	var strict, prog, quiet bool
	cmd := &cobra.Command{
		Use:   "compare [-f FMT] [-F FMT] [-s] [-p] [-q] [-U] A B",
		Short: "Check whether two images have the same content",
		Long: `Compare the content of images A and B (their whole chains). Images of
different sizes are identical when the extra part of the larger one reads
as zeros, unless -s (strict) is given.

Exit status: 0 identical, 1 different, 2 error.`,
		Args: exactArgs(2, "expecting two image file names"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.compare(args[0], args[1], fmtA, fmtB, strict, prog && !quiet, quiet)
		},
	}
	addFormatFlag(cmd, &fmtA, "format of the first image (probed when not given)")
	cmd.Flags().StringVarP(&fmtB, "second-format", "F", "", "format of the second image (probed when not given)")
	cmd.Flags().BoolVarP(&strict, "strict", "s", false, "strict mode: images of different sizes differ")
	cmd.Flags().BoolVarP(&prog, "progress", "p", false, "show progress")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "print nothing but errors")
	addForceShareFlag(cmd)
	return cmd
}

func (a *app) compare(nameA, nameB, fmtA, fmtB string, strict, showProgress, quiet bool) error {
	da, err := a.openRO(nameA, fmtA, false)
	if err != nil {
		return err
	}
	defer da.Close()
	db, err := a.openRO(nameB, fmtB, false)
	if err != nil {
		return err
	}
	defer db.Close()
	say := func(format string, args ...any) {
		if !quiet {
			fmt.Fprintf(a.stdout, format, args...)
		}
	}
	prog := a.newProgress(showProgress)
	res, err := vdisk.Compare(a.ctx, da, db, &vdisk.CompareOptions{Strict: strict, Progress: prog.update})
	prog.finish(err == nil)
	if err != nil {
		return err
	}
	switch {
	case res.SizeMismatch:
		say("Strict mode: Image size mismatch!\n")
		return &exitError{code: 1}
	case !res.Identical:
		// qemu warns about the sizes once the common part matched.
		if da.Size() != db.Size() && res.Offset >= min(da.Size(), db.Size()) {
			say("Warning: Image size mismatch!\n")
		}
		say("Content mismatch at offset %d!\n", res.Offset)
		return &exitError{code: 1}
	}
	if da.Size() != db.Size() {
		say("Warning: Image size mismatch!\n")
	}
	say("Images are identical.\n")
	return nil
}
