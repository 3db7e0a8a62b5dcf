package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

func (a *app) newCommitCmd() *cobra.Command {
	var format, base, cache string
	var keep, prog, quiet bool
	cmd := &cobra.Command{
		Use:   "commit [-f FMT] [-t CACHE] [-b BASE] [-d] [-p] [-q] FILE",
		Short: "Commit the changes of an image into its backing file",
		Long: `Write the content of FILE into its backing file, then empty FILE (its data
now lives below it), so that the chain reads the same as before.

With -d, FILE keeps its data. With -b, the content of FILE and of every
image between FILE and BASE is written into BASE, an image further down
the backing chain (named as FILE records it, or by any path to the same
file); -b implies -d, as in qemu-img: the chain stays as it was (it
reads the same, BASE now holding the content of the images above it as
well). The chain reads the same content at every moment, so an
interrupted commit loses nothing.`,
		Args: exactArgs(1, "expecting one image file name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkCacheMode(cache); err != nil {
				return err
			}
			return a.commit(args[0], format, base, keep, prog, quiet)
		},
	}
	addFormatFlag(cmd, &format, "image format (probed when not given)")
	cmd.Flags().StringVarP(&cache, "cache", "t", "", "cache mode (accepted for compatibility, ignored)")
	cmd.Flags().StringVarP(&base, "base", "b", "", "commit into this image of the backing chain instead of the direct backing file (implies -d)")
	cmd.Flags().BoolVarP(&keep, "keep", "d", false, "do not empty FILE after the commit")
	addProgressFlag(cmd, &prog)
	addQuietFlag(cmd, &quiet)
	return cmd
}

func (a *app) commit(name, format, base string, keep, showProgress, quiet bool) error {
	if err := checkFormat(format); err != nil {
		return err
	}
	d, err := vdisk.Open(a.ctx, name, &vdisk.OpenOptions{Format: format, InfoOnly: true, AllowUnsafeBacking: true, Logger: a.log})
	if err != nil {
		return err
	}
	layers := d.Layers()
	_, canEmpty := layers[0].Image.(driver.Emptier)
	depth := 1
	if base != "" {
		depth = findLayer(layers, base)
		keep = true
	}
	d.Close()
	if len(layers) < 2 {
		return fmt.Errorf("Image does not have a backing file")
	}
	if depth < 0 {
		return fmt.Errorf("Did not find '%s' in the backing chain of '%s'", base, name)
	}
	prog := a.newProgress(showProgress && !quiet)
	err = vdisk.Commit(a.ctx, name, depth, keep, &vdisk.MergeOptions{
		Format:             format,
		Progress:           prog.update,
		AllowUnsafeBacking: true,
		Logger:             a.log,
	})
	prog.finish(err == nil)
	if err != nil {
		return err
	}
	if !keep && !canEmpty {
		a.log.Warn("the image format cannot empty an image: it keeps its data, which its backing file now holds as well", "format", layers[0].Format.Name)
	}
	a.say(quiet, "Image committed.\n")
	return nil
}
