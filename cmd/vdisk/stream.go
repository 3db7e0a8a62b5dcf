package main

import (
	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/control"
)

func (a *app) newStreamCmd() *cobra.Command {
	var format, server string
	var base int
	var rate int64
	var rateStr string
	var prog, quiet, detach bool
	cmd := &cobra.Command{
		Use:   "stream [-f FMT] [--base N] [-p] [-q] FILE | --server SOCKET [--base N] [-p] [-q] [--detach] [EXPORT]",
		Short: "Pull the content of the backing chain into the top image (qemu's block-stream)",
		Long: `Copy into FILE, wherever it holds nothing itself, the content of the images
of its backing chain above image N (numbered from the top: 1 is FILE's
backing file; 'vdisk info --backing-chain FILE' lists them in that
order), then make image N FILE's backing file. With --base 0 (the
default) the whole chain is pulled in and FILE becomes standalone.
Images that leave the chain are not deleted. The chain reads the same
content at every moment, so an interrupted stream loses nothing.

With --server, the stream runs live in a 'vdisk serve --control SOCKET'
on export EXPORT (default "") while its clients keep reading and
writing. The command waits for the job's end and exits 1 if it failed
or was cancelled; interrupting it cancels the job. With --detach it
prints the job's ID and returns at once ('vdisk jobs' follows it).`,
		Args: imageOrExportArgs(&server, "expecting one image file name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if base < 0 {
				return usageErrorf("--base must not be negative")
			}
			var err error
			if rate, err = rateArg(rateStr); err != nil {
				return err
			}
			if server != "" {
				if format != "" {
					return usageErrorf("-f cannot be used with --server")
				}
				return a.startJob(server, "stream", control.StreamArgs{Export: exportArg(args), Base: base, Speed: rate}, detach, prog, quiet, "Image streamed.\n")
			}
			if detach {
				return usageErrorf("--detach needs --server")
			}
			return a.stream(args[0], format, base, rate, prog, quiet)
		},
	}
	addFormatFlag(cmd, &format, "image format of FILE (probed when not given)")
	cmd.Flags().IntVar(&base, "base", 0, "index of the image that stays below the top (0: pull in the whole chain)")
	cmd.Flags().StringVarP(&rateStr, "rate-limit", "r", "", "copy at most this many bytes per second (K, M, G suffixes; the speed of qemu's block-stream)")
	addProgressFlag(cmd, &prog)
	addQuietFlag(cmd, &quiet)
	addServerFlag(cmd, &server)
	cmd.Flags().BoolVar(&detach, "detach", false, "with --server: print the job's ID and return without waiting")
	return cmd
}

func (a *app) stream(name, format string, base int, rate int64, showProgress, quiet bool) error {
	if err := checkFormat(format); err != nil {
		return err
	}
	prog := a.newProgress(showProgress && !quiet)
	dropped, err := vdisk.Stream(a.ctx, name, &vdisk.StreamOptions{
		Base:     base,
		Rate:     rate,
		Progress: prog.update,
		Open:     a.oo(vdisk.OpenOptions{Format: format, Paths: a.policy(), Logger: a.log}),
	})
	prog.finish(err == nil)
	if err != nil {
		return err
	}
	a.say(quiet, "Image streamed.\n")
	for _, n := range dropped {
		a.say(quiet, "'%s' left the chain (not deleted).\n", n)
	}
	return nil
}
