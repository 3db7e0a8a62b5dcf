package main

import (
	"bufio"
	"fmt"
	"io"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

func (a *app) newMapCmd() *cobra.Command {
	var format, output, start, maxLen string
	cmd := &cobra.Command{
		Use:   "map [-f FMT] [--output human|json] [--start-offset N] [--max-length N] [-U] FILE",
		Short: "Show where the data of an image lives",
		Long: `Dump the metadata of the image FILE and its backing chain: for each run of
the virtual disk, which layer holds it, whether it reads as zeros or data,
and where in which file the data is stored. Human output lists only the
data runs.`,
		Args: exactArgs(1, "expecting one image file name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			asJSON, err := outputFormat(output)
			if err != nil {
				return err
			}
			off, err := parseOffsetFlag("start offset", start, 0)
			if err != nil {
				return err
			}
			n, err := parseOffsetFlag("max length", maxLen, -1)
			if err != nil {
				return err
			}
			return a.mapImage(args[0], format, off, n, asJSON)
		},
	}
	addFormatFlag(cmd, &format, "image format (probed when not given)")
	cmd.Flags().StringVar(&output, "output", "human", "output format: human or json")
	cmd.Flags().StringVar(&start, "start-offset", "", "first byte to map (k, M, G, ... suffixes allowed)")
	cmd.Flags().StringVar(&maxLen, "max-length", "", "map at most this many bytes")
	addForceShareFlag(cmd)
	return cmd
}

func parseOffsetFlag(what, s string, def int64) (int64, error) {
	if s == "" {
		return def, nil
	}
	n, err := driver.ParseSize(s)
	if err != nil {
		return 0, usageErrorf("invalid %s %q: you may use k, M, G, T, P or E suffixes", what, s)
	}
	return n, nil
}

// mapEntry is qemu-img's MapEntry.
type mapEntry struct {
	start, length              int64
	depth                      int
	present, zero, data, compr bool
	offset                     int64 // -1: none
	file                       string
}

// mergeable is qemu-img's entry_mergeable.
func (c *mapEntry) mergeable(n *mapEntry) bool {
	if c.length == 0 {
		return false
	}
	if c.zero != n.zero || c.data != n.data || c.compr != n.compr || c.depth != n.depth ||
		c.present != n.present || (c.file != "") != (n.file != "") || (c.offset >= 0) != (n.offset >= 0) {
		return false
	}
	if c.file != "" && c.file != n.file {
		return false
	}
	if c.offset >= 0 && c.offset+c.length != n.offset {
		return false
	}
	return true
}

func hexq(v int64) string {
	if v == 0 {
		return "0" // C's %#x prints no prefix for zero
	}
	return "0x" + strconv.FormatInt(v, 16)
}

// dumpMapEntry prints e as qemu-img map does; next is the following entry
// (nil for the last), adjusted for human output as qemu does.
func dumpMapEntry(w io.Writer, asJSON bool, e, next *mapEntry) error {
	if !asJSON {
		if e.data && e.offset < 0 {
			return fmt.Errorf("file contains external, encrypted or compressed clusters; use --output json")
		}
		if e.data && !e.zero {
			fmt.Fprintf(w, "%-16s%-16s%-16s%s\n", hexq(e.start), hexq(e.length), hexq(max(e.offset, 0)), e.file)
		}
		// Human output ignores the difference between holes and zeros:
		// let them coalesce.
		if next != nil && (!next.data || next.zero) {
			next.data = false
			next.zero = true
		}
		return nil
	}
	fmt.Fprintf(w, `{ "start": %d, "length": %d, "depth": %d, "present": %t, "zero": %t, "data": %t`,
		e.start, e.length, e.depth, e.present, e.zero, e.data)
	if e.compr {
		fmt.Fprint(w, `, "compressed": true`)
	}
	if e.offset >= 0 {
		fmt.Fprintf(w, `, "offset": %d`, e.offset)
	}
	fmt.Fprint(w, "}")
	if next != nil {
		fmt.Fprint(w, ",\n")
	}
	return nil
}

func (a *app) mapImage(name, format string, start, maxLen int64, asJSON bool) error {
	d, err := a.openRO(name, format, false)
	if err != nil {
		return err
	}
	defer d.Close()
	nlayers := len(d.Layers())
	length := d.Size()
	if maxLen >= 0 && start <= length-maxLen {
		length = start + maxLen
	}
	w := bufio.NewWriter(a.stdout)
	if asJSON {
		w.WriteString("[")
	} else {
		fmt.Fprintf(w, "%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File")
	}
	curr := &mapEntry{start: start, offset: -1}
	var err2 error
	if start < length {
		err2 = d.Map(a.ctx, start, length-start, func(x vdisk.Extent) error {
			e := &mapEntry{start: x.Start, length: x.Length, depth: x.Depth, present: x.Present(),
				zero: x.ReadsZero(), data: x.IsData(), compr: x.Compressed, offset: x.Offset, file: x.File}
			if e.offset < 0 {
				e.offset = -1
			}
			// qemu counts the depth of a run no layer holds as the
			// index of the bottom layer, not the chain length.
			if !e.present && e.depth > nlayers-1 {
				e.depth = nlayers - 1
			}
			if curr.mergeable(e) {
				curr.length += e.length
				return nil
			}
			if curr.length > 0 {
				if err := dumpMapEntry(w, asJSON, curr, e); err != nil {
					return err
				}
			}
			curr = e
			return nil
		})
	}
	if err2 == nil {
		err2 = dumpMapEntry(w, asJSON, curr, nil)
		if asJSON {
			w.WriteString("]\n")
		}
	}
	if err := w.Flush(); err2 == nil {
		err2 = err
	}
	return err2
}
