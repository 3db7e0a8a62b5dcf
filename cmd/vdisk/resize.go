package main

import (
	"fmt"
	"math"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk/driver"
)

func (a *app) newResizeCmd() *cobra.Command {
	var format, prealloc string
	var shrink, quiet bool
	cmd := &cobra.Command{
		Use:   "resize [-f FMT] [--shrink] [--preallocation=off|metadata|falloc|full] [-q] FILE [+|-]SIZE",
		Short: "Change the virtual size of an image",
		Long: `Set the virtual size of FILE to SIZE, or grow (+SIZE) or shrink (-SIZE) it by
SIZE (with optional k, M, G, T, P or E suffix, powers of 1024). As in
qemu-img, SIZE is the last argument, so "-1G" needs no "--".

Shrinking deletes the data past the new end and needs --shrink. The
grown part reads as zeros; --preallocation allocates it (growing only;
which modes a format supports is the format's choice).`,
		// qemu-img takes SIZE off the end of the command line before it
		// parses options, so that "-1G" is a size and not an option.
		DisableFlagParsing: true,
		Args:               cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			var size string
			if n := len(args); n > 0 && (!strings.HasPrefix(args[n-1], "-") || looksLikeNumber(args[n-1][1:])) {
				size, args = args[n-1], args[:n-1]
			}
			cmd.DisableFlagParsing = false
			if err := cmd.ParseFlags(args); err != nil {
				return cmd.FlagErrorFunc()(cmd, err)
			}
			a.resetLogger()
			if help, _ := cmd.Flags().GetBool("help"); help {
				return cmd.Help()
			}
			rest := cmd.Flags().Args()
			if len(rest) != 1 || size == "" {
				return usageErrorf("expecting image file name and size")
			}
			return a.resize(rest[0], size, format, prealloc, shrink, quiet)
		},
	}
	addFormatFlag(cmd, &format, "image format (probed when not given)")
	cmd.Flags().BoolVar(&shrink, "shrink", false, "allow shrinking the image (data past the new end is lost)")
	cmd.Flags().StringVar(&prealloc, "preallocation", "", "preallocation of the grown part: off, metadata, falloc or full")
	addQuietFlag(cmd, &quiet)
	return cmd
}

// looksLikeNumber reports whether s starts like a size ("1G", ".5M").
func looksLikeNumber(s string) bool {
	return s != "" && (s[0] >= '0' && s[0] <= '9' || s[0] == '.')
}

func (a *app) resize(name, sizeArg, format, prealloc string, shrink, quiet bool) error {
	relative := int64(0)
	s := sizeArg
	switch {
	case strings.HasPrefix(s, "+"):
		relative, s = 1, s[1:]
	case strings.HasPrefix(s, "-"):
		relative, s = -1, s[1:]
	}
	n, err := driver.ParseSize(s)
	if err != nil {
		return fmt.Errorf("Parameter 'size' expects a non-negative number below 2^64. Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- and exabytes, respectively.")
	}
	switch prealloc {
	case "", "off", "metadata", "falloc", "full":
	default:
		return fmt.Errorf("Invalid preallocation mode '%s'", prealloc)
	}
	if prealloc == "" {
		prealloc = "off"
	}
	if err := checkFormat(format); err != nil {
		return err
	}
	d, err := a.openRW(name, format, false)
	if err != nil {
		return err
	}
	defer d.Close()
	cur := d.Size()
	total := n
	switch relative {
	case 1:
		if n > math.MaxInt64-cur {
			return fmt.Errorf("New image size is too large")
		}
		total = cur + n
	case -1:
		total = cur - n
	}
	if total <= 0 {
		return fmt.Errorf("New image size must be positive")
	}
	if total <= cur && prealloc != "off" {
		return fmt.Errorf("Preallocation can only be used for growing images")
	}
	if total < cur && !shrink {
		fmt.Fprintf(a.stderr, "%s: Use the --shrink option to perform a shrink operation.\n", a.name)
		a.log.Warn("Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.")
		return &exitError{code: 1}
	}
	if err := d.Resize(a.ctx, total, prealloc); err != nil {
		// A driver may fail after changing the size (raw truncates before
		// it preallocates): a failed grow leaves the old size.
		if total > cur && d.Top().Size() != cur {
			if rerr := d.Resize(a.ctx, cur, "off"); rerr != nil {
				a.log.Warn("could not restore the old size after the failed resize", "size", cur, "error", rerr)
			}
		}
		return err
	}
	if err := d.Close(); err != nil {
		return err
	}
	a.say(quiet, "Image resized.\n")
	return nil
}
