package main

import (
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

func (a *app) newMeasureCmd() *cobra.Command {
	var format, outFmt, output, size, snapshot string
	var opts []string
	cmd := &cobra.Command{
		Use:   "measure [--output human|json] [-O FMT] [-o OPTIONS] [--size SIZE | [-f FMT] [-l SNAPSHOT] [-U] FILE]",
		Short: "Compute the file size an image needs",
		Long: `Compute how large a new image of format FMT (raw when not given) with the
options OPTIONS would be: holding the content of FILE ("required size"),
and fully allocated ("fully allocated size"); or, with --size, for an
empty image of that virtual size.`,
		Args: helpArgs(&opts, rangeArgs(0, 1, "expecting at most one image file name")),
		RunE: func(cmd *cobra.Command, args []string) error {
			asJSON, err := outputFormat(output)
			if err != nil {
				return err
			}
			name := ""
			if len(args) == 1 {
				name = args[0]
			}
			return a.measure(name, format, outFmt, opts, size, cmd.Flags().Changed("size"), snapshot, asJSON)
		},
	}
	addFormatFlag(cmd, &format, "format of FILE (probed when not given)")
	cmd.Flags().StringVarP(&outFmt, "output-format", "O", "raw", "format of the image to measure for")
	cmd.Flags().StringArrayVarP(&opts, "options", "o", nil, "create options of that format, comma-separated key=value list ('-o help' lists them)")
	cmd.Flags().StringVar(&output, "output", "human", "output format: human or json")
	cmd.Flags().StringVar(&size, "size", "", "measure an empty image of this virtual size instead of FILE")
	cmd.Flags().StringVarP(&snapshot, "snapshot", "l", "", "measure an internal snapshot of FILE")
	addForceShareFlag(cmd)
	return cmd
}

func (a *app) measure(name, format, outFmt string, optArgs []string, sizeArg string, sizeGiven bool, snapshot string, asJSON bool) error {
	f, err := driver.Lookup(outFmt)
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
	switch {
	case name == "" && !sizeGiven:
		return usageErrorf("Either --size N or one filename must be specified.")
	case name != "" && sizeGiven:
		return usageErrorf("--size N cannot be used together with a filename.")
	case sizeGiven && snapshot != "":
		return usageErrorf("--size N cannot be used together with -l.")
	}
	if err := checkFormat(format); err != nil {
		return err
	}
	if f.Measure == nil {
		return driver.Unsupportedf("", "Format driver '%s' does not support size measurement", f.Name)
	}
	if _, err := driver.ParseOptions(f.Name, f.CreateOptions, kvs); err != nil {
		return err
	}
	var res driver.MeasureResult
	if sizeGiven {
		size, err := driver.ParseSize(sizeArg)
		if err != nil {
			return fmt.Errorf("Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
		}
		res, err = vdisk.Measure(a.ctx, f.Name, &vdisk.MeasureOptions{Options: kvs, Size: size})
		if err != nil {
			return err
		}
	} else {
		src, err := a.openRO(name, format, false)
		if err != nil {
			return err
		}
		if snapshot != "" {
			v, err := a.openSnapshot(src, format, snapshot)
			if err != nil {
				src.Close()
				return err
			}
			src = v
		}
		defer src.Close()
		res, err = vdisk.Measure(a.ctx, f.Name, &vdisk.MeasureOptions{Options: kvs, Source: src})
		if err != nil {
			return err
		}
	}
	if asJSON {
		n := jobj()
		if res.Bitmaps != nil {
			n.set("bitmaps", jint(*res.Bitmaps))
		}
		n.set("required", jint(res.Required))
		n.set("fully-allocated", jint(res.FullyAllocated))
		var b strings.Builder
		writeQJSON(&b, n, 0)
		b.WriteByte('\n')
		_, err = io.WriteString(a.stdout, b.String())
		return err
	}
	_, err = fmt.Fprintf(a.stdout, "required size: %d\nfully allocated size: %d\n", res.Required, res.FullyAllocated)
	if err == nil && res.Bitmaps != nil {
		_, err = fmt.Fprintf(a.stdout, "bitmaps size: %d\n", *res.Bitmaps)
	}
	return err
}
