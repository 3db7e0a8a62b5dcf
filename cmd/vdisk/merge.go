package main

import (
	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk"
)

func (a *app) newMergeCmd() *cobra.Command {
	var format string
	var from, to int
	var prog, quiet bool
	cmd := &cobra.Command{
		Use:   "merge [-f FMT] --from I --to J [-p] [-q] FILE",
		Short: "Merge a range of images of a backing chain into one (VirtualBox's VDMerge)",
		Long: `Merge the images I..J of the backing chain of FILE into one, as VirtualBox's
VDMerge does. Images are numbered from the top: 0 is FILE itself, 1 its
backing file, and so on ('vdisk info --backing-chain FILE' lists them in
that order).

Forward (I < J): the content of images I..J-1 is written into image J and
they leave the chain; the image above I is reparented onto J. With I = 0,
image J becomes the top of the chain: use it instead of FILE from now on.
Backward (I > J): the content of images J+1..I is copied into image J
where J holds nothing itself, and J is reparented onto the image below I
(or becomes standalone when I is the base).

Images that leave the chain are not deleted; merge lists them. The chain
reads the same content at every moment, so an interrupted merge loses
nothing.`,
		Args: exactArgs(1, "expecting one image file name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !cmd.Flags().Changed("from") || !cmd.Flags().Changed("to") {
				return usageErrorf("--from and --to are required")
			}
			if from < 0 || to < 0 {
				return usageErrorf("--from and --to must not be negative")
			}
			if from == to {
				return usageErrorf("--from and --to name the same image: nothing to merge")
			}
			return a.merge(args[0], format, from, to, prog, quiet)
		},
	}
	addFormatFlag(cmd, &format, "image format of FILE (probed when not given)")
	cmd.Flags().IntVar(&from, "from", 0, "first image to merge (0 = FILE, 1 = its backing file, ...)")
	cmd.Flags().IntVar(&to, "to", 0, "image to merge into")
	addProgressFlag(cmd, &prog)
	addQuietFlag(cmd, &quiet)
	return cmd
}

func (a *app) merge(name, format string, from, to int, showProgress, quiet bool) error {
	if err := checkFormat(format); err != nil {
		return err
	}
	d, err := vdisk.Open(a.ctx, name, a.oo(vdisk.OpenOptions{Format: format, InfoOnly: true, Paths: a.policy(), Logger: a.log}))
	if err != nil {
		return err
	}
	layers := d.Layers()
	d.Close()
	if n := len(layers); from >= n || to >= n {
		return usageErrorf("the backing chain of %s has %d images (0..%d); --from %d --to %d is out of range", name, n, n-1, from, to)
	}
	prog := a.newProgress(showProgress && !quiet)
	dropped, err := vdisk.Merge(a.ctx, name, from, to, &vdisk.MergeOptions{
		Progress: prog.update,
		Open:     a.oo(vdisk.OpenOptions{Format: format, Paths: a.policy(), Logger: a.log}),
	})
	prog.finish(err == nil)
	if err != nil {
		return err
	}
	a.say(quiet, "Images merged into '%s'.\n", layers[to].Name)
	for _, n := range dropped {
		a.say(quiet, "'%s' left the chain (not deleted).\n", n)
	}
	if from == 0 && to > 0 {
		a.say(quiet, "The top of the chain is now '%s'.\n", layers[to].Name)
	}
	return nil
}
