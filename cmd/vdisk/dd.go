package main

import (
	"fmt"
	"math"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

type ddArgs struct {
	in, out       string
	bs            int64
	count, skip   int64
	hasCount      bool
	hasSkip       bool
	hasIn, hasOut bool
}

func (a *app) newDDCmd() *cobra.Command {
	var format, outFmt string
	cmd := &cobra.Command{
		Use:   "dd [-f FMT] [-O FMT] [-U] [bs=BYTES] [count=BLOCKS] [skip=BLOCKS] if=INPUT of=OUTPUT",
		Short: "Copy part of an image into a new image, dd style",
		Long: `Copy the content of INPUT (its whole chain) into a new image OUTPUT of
format FMT (raw when not given), dd style: bs is the block size (512 when
not given), skip the number of input blocks to skip, count the number of
blocks to copy (all when not given). OUTPUT is created (replaced when it
exists) with the size of the copied range, rounded up to 512 bytes.
Numbers take k, M, G, T, P or E suffixes.

As in dd(1) and qemu-img's documentation, count counts the blocks after
the skipped ones (qemu-img 7.2 counts them from the start of INPUT when
skip is also given).`,
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			d, err := parseDDArgs(args)
			if err != nil {
				return err
			}
			return a.dd(d, format, outFmt)
		},
	}
	addFormatFlag(cmd, &format, "input image format (probed when not given)")
	cmd.Flags().StringVarP(&outFmt, "output-format", "O", "raw", "output image format")
	addForceShareFlag(cmd)
	return cmd
}

func parseDDArgs(args []string) (*ddArgs, error) {
	d := &ddArgs{bs: 512}
	num := func(what, v string) (int64, error) {
		n, err := driver.ParseSize(v)
		if err != nil {
			return 0, fmt.Errorf("Invalid %s specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.", what)
		}
		return n, nil
	}
	for _, arg := range args {
		k, v, ok := strings.Cut(arg, "=")
		if !ok {
			return nil, fmt.Errorf("unrecognized operand %s", arg)
		}
		var err error
		switch k {
		case "bs":
			d.bs, err = driver.ParseSize(v)
			if err != nil || d.bs < 1 || d.bs > math.MaxInt32 {
				return nil, fmt.Errorf("Invalid bs specified. Must be between 1 and %d.", math.MaxInt32)
			}
		case "count":
			d.count, err = num("count", v)
			d.hasCount = true
		case "skip":
			d.skip, err = num("skip", v)
			d.hasSkip = true
		case "if":
			d.in, d.hasIn = v, true
		case "of":
			d.out, d.hasOut = v, true
		default:
			return nil, fmt.Errorf("unrecognized operand %s", k)
		}
		if err != nil {
			return nil, err
		}
	}
	if !d.hasIn || !d.hasOut || d.in == "" || d.out == "" {
		return nil, fmt.Errorf("Must specify both input and output files")
	}
	return d, nil
}

func (a *app) dd(args *ddArgs, format, outFmt string) (err error) {
	if err := checkFormat(format); err != nil {
		return err
	}
	f, err := driver.Lookup(outFmt)
	if err != nil {
		return err
	}
	if sameFile(args.in, args.out) {
		return fmt.Errorf("the input and the output are the same file (%s)", args.out)
	}
	src, err := a.openRO(args.in, format, false)
	if err != nil {
		return err
	}
	defer src.Close()
	size := src.Size()
	// The input range [start, end): bytes, overflow-safe.
	start := int64(math.MaxInt64)
	if args.skip <= math.MaxInt64/args.bs {
		start = args.skip * args.bs
	}
	skipPast := start > size
	if skipPast {
		start = size
	}
	end := size
	if args.hasCount && args.count <= (math.MaxInt64-start)/args.bs {
		end = min(size, start+args.count*args.bs)
	}
	if skipPast {
		// qemu-img and dd(1) warn and write an empty output.
		fmt.Fprintf(a.stderr, "%s: %s: cannot skip to specified offset\n", a.name, args.in)
	}
	dst, err := vdisk.Create(a.ctx, args.out, a.co(vdisk.CreateOptions{
		Format:    f.Name,
		Size:      end - start,
		Overwrite: true,
		Logger:    a.log,
	}))
	if err != nil {
		return fmt.Errorf("%s: error while creating output image: %w", args.out, err)
	}
	defer func() {
		if cerr := dst.Close(); cerr != nil && err == nil {
			err = cerr
		}
		if err != nil {
			if rerr := vdisk.Remove(a.ctx, args.out, a.oo(vdisk.OpenOptions{})); rerr != nil {
				a.log.Warn("could not remove the incomplete output", "file", args.out, "error", rerr)
			}
		}
	}()
	return a.ddCopy(dst, src, start, end)
}

// ddCopy copies src's [start, end) to dst at 0. Only data runs are read,
// and all-zero chunks are not written: the new image reads zeros already.
func (a *app) ddCopy(dst, src *vdisk.Disk, start, end int64) error {
	buf := make([]byte, 1<<20)
	for pos := start; pos < end; {
		if err := a.ctx.Err(); err != nil {
			return err
		}
		e, err := src.Status(pos, end-pos)
		if err != nil {
			return fmt.Errorf("error while reading from input image file: %w", err)
		}
		runEnd := pos + e.Length
		if !e.IsData() {
			pos = runEnd
			continue
		}
		for pos < runEnd {
			n := min(int64(len(buf)), runEnd-pos)
			p := buf[:n]
			if _, err := src.ReadAt(p, pos); err != nil {
				return fmt.Errorf("error while reading from input image file: %w", err)
			}
			if !driver.IsZero(p) {
				if _, err := dst.WriteAt(p, pos-start); err != nil {
					return fmt.Errorf("error while writing to output image file: %w", err)
				}
			}
			pos += n
		}
	}
	return nil
}
