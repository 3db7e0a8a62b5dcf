package main

import (
	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

func (a *app) newAmendCmd() *cobra.Command {
	var format, cache string
	var opts []string
	var prog, quiet, force bool
	cmd := &cobra.Command{
		Use:   "amend [-f FMT] -o OPTIONS [-p] [-q] [-t CACHE] [--force] FILE",
		Short: "Change the format options of an existing image",
		Long: `Change creation options of FILE in place (e.g. qcow2's compat level), for
formats whose driver supports it; '-o help' lists the format's options.`,
		Args: helpArgs(&opts, exactArgs(1, "expecting one image file name")),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkCacheMode(cache); err != nil {
				return err
			}
			kvs, err := parseOptionArgs(opts)
			if err != nil {
				return err
			}
			if wantsHelp(kvs) {
				return a.amendHelp(args, format)
			}
			if len(kvs) == 0 {
				return usageErrorf("Must specify options (-o)")
			}
			return a.amend(args[0], format, kvs, prog && !quiet)
		},
	}
	addFormatFlag(cmd, &format, "image format (probed when not given)")
	cmd.Flags().StringArrayVarP(&opts, "options", "o", nil, "options to change, comma-separated key=value list ('-o help' lists them)")
	cmd.Flags().StringVarP(&cache, "cache", "t", "", "cache mode (accepted for compatibility, ignored)")
	cmd.Flags().BoolVar(&force, "force", false, "accepted for compatibility")
	addProgressFlag(cmd, &prog)
	addQuietFlag(cmd, &quiet)
	return cmd
}

// amendHelp lists the options of -f FMT, or of FILE's format.
func (a *app) amendHelp(args []string, format string) error {
	if format == "" {
		if len(args) == 0 {
			return usageErrorf("'-o help' needs -f FMT or an image file name")
		}
		d, err := a.openTopInfo(args[0], "")
		if err != nil {
			return err
		}
		format = d.Top().Format.Name
		d.Close()
	}
	f, err := driver.Lookup(format)
	if err != nil {
		return err
	}
	printOptionHelp(a.stdout, f)
	return nil
}

func (a *app) amend(name, format string, kvs []driver.KV, showProgress bool) error {
	if err := checkFormat(format); err != nil {
		return err
	}
	d, err := a.openRW(name, format, false)
	if err != nil {
		return err
	}
	defer d.Close()
	top := d.Top()
	if _, ok := vdisk.As[driver.Amender](top); !ok {
		return driver.Unsupportedf(top.Name, "Format driver '%s' does not support option amendment", top.Format.Name)
	}
	prog := a.newProgress(showProgress)
	prog.update(0, 1)
	err = d.Amend(a.ctx, kvs)
	if err == nil {
		err = d.Close()
	}
	prog.finish(err == nil)
	if err != nil {
		return driver.WithFile(err, "amend", top.Name)
	}
	return nil
}
