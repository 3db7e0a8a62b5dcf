package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/control"
	"github.com/vdisk/vdisk/driver"
)

func (a *app) newCommitCmd() *cobra.Command {
	var format, base, cache, server string
	var keep, prog, quiet, detach bool
	var rateStr string
	cmd := &cobra.Command{
		Use:   "commit [-f FMT] [-t CACHE] [-b BASE] [-d] [-r RATE] [-p] [-q] FILE | --server SOCKET [-b BASE] [-d] [-r RATE] [-p] [-q] [--detach] [EXPORT]",
		Short: "Commit the changes of an image into its backing file",
		Long: `Write the content of FILE into its backing file, then empty FILE (its data
now lives below it), so that the chain reads the same as before.

With -d, FILE keeps its data. With -b, the content of FILE and of every
image between FILE and BASE is written into BASE, an image further down
the backing chain (named as FILE records it, or by any path to the same
file); -b implies -d, as in qemu-img: the chain stays as it was (it
reads the same, BASE now holding the content of the images above it as
well). The chain reads the same content at every moment, so an
interrupted commit loses nothing. -r limits the copy to RATE bytes per
second (K, M, G suffixes), as qemu-img commit -r does.

With --server, the commit runs live in a 'vdisk serve --control SOCKET'
on export EXPORT (default "") while its clients keep reading and
writing. BASE may also be a layer index (1 is the top's backing file,
as the control protocol's query-exports lists the chain).
The command waits for the job's end and exits 1 if it failed or was
cancelled; interrupting it cancels the job. With --detach it prints the
job's ID and returns at once ('vdisk jobs' follows it).`,
		Args: imageOrExportArgs(&server, "expecting one image file name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkCacheMode(cache); err != nil {
				return err
			}
			rate, err := rateArg(rateStr)
			if err != nil {
				return err
			}
			if server != "" {
				if format != "" || cache != "" {
					return usageErrorf("-f and -t cannot be used with --server")
				}
				return a.commitServer(server, exportArg(args), base, keep, rate, prog, quiet, detach)
			}
			if detach {
				return usageErrorf("--detach needs --server")
			}
			return a.commit(args[0], format, base, keep, rate, prog, quiet)
		},
	}
	addFormatFlag(cmd, &format, "image format (probed when not given)")
	cmd.Flags().StringVarP(&cache, "cache", "t", "", "cache mode (accepted for compatibility, ignored)")
	cmd.Flags().StringVarP(&base, "base", "b", "", "commit into this image of the backing chain instead of the direct backing file (implies -d)")
	cmd.Flags().BoolVarP(&keep, "keep", "d", false, "do not empty FILE after the commit")
	cmd.Flags().StringVarP(&rateStr, "rate-limit", "r", "", "copy at most this many bytes per second (K, M, G suffixes)")
	addProgressFlag(cmd, &prog)
	addQuietFlag(cmd, &quiet)
	addServerFlag(cmd, &server)
	cmd.Flags().BoolVar(&detach, "detach", false, "with --server: print the job's ID and return without waiting")
	return cmd
}

// commitServer runs a live commit on an export of a control server.
func (a *app) commitServer(sock, export, base string, keep bool, rate int64, showProgress, quiet, detach bool) error {
	args := control.CommitArgs{Export: export, Keep: keep, Speed: rate}
	if base != "" {
		c, err := a.dialControl(sock)
		if err != nil {
			return err
		}
		e, err := a.queryExport(c, export)
		c.Close()
		if err != nil {
			return err
		}
		depth := layerIndex(e.Layers, base)
		if depth < 0 {
			return fmt.Errorf("Did not find '%s' in the backing chain of export '%s'", base, export)
		}
		args.Base, args.Keep = &depth, true // -b implies -d, as offline
	}
	return a.startJob(sock, "commit", args, detach, showProgress, quiet, "Image committed.\n")
}

func (a *app) commit(name, format, base string, keep bool, rate int64, showProgress, quiet bool) error {
	if err := checkFormat(format); err != nil {
		return err
	}
	d, err := vdisk.Open(a.ctx, name, a.oo(vdisk.OpenOptions{Format: format, InfoOnly: true, Paths: a.policy(), Logger: a.log}))
	if err != nil {
		return err
	}
	layers := d.Layers()
	_, canEmpty := vdisk.As[driver.Emptier](layers[0])
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
	err = vdisk.Commit(a.ctx, name, &vdisk.CommitOptions{
		Base:     depth,
		Keep:     keep,
		Rate:     rate,
		Progress: prog.update,
		Open:     a.oo(vdisk.OpenOptions{Format: format, Paths: a.policy(), Logger: a.log}),
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

// rateArg parses a -r rate limit in bytes per second ("" or 0: none).
func rateArg(s string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	n, err := driver.ParseSize(s)
	if err != nil || n < 0 {
		return 0, usageErrorf("invalid rate limit %q: a number of bytes per second, with K, M, G suffixes", s)
	}
	return n, nil
}
