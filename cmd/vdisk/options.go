package main

import (
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk/driver"
)

// parseOptionArgs splits every -o argument (qemu merges repeated -o).
func parseOptionArgs(args []string) ([]driver.KV, error) {
	var out []driver.KV
	for _, s := range args {
		kvs, err := driver.SplitOptions(s)
		if err != nil {
			return nil, err
		}
		out = append(out, kvs...)
	}
	return out, nil
}

// helpArgs wraps a positional-argument check: with "-o help" no
// argument is needed (qemu-img create -o help lists the options).
func helpArgs(opts *[]string, check cobra.PositionalArgs) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if kvs, err := parseOptionArgs(*opts); err == nil && wantsHelp(kvs) {
			return nil
		}
		return check(cmd, args)
	}
}

// wantsHelp reports whether -o asked for the option list ("help" or "?").
func wantsHelp(kvs []driver.KV) bool {
	for _, kv := range kvs {
		if kv.Key == "help" || kv.Key == "?" {
			return true
		}
	}
	return false
}

// imageOptions are the -o keys every create accepts on top of the format's
// declared ones, as qemu-img does.
type imageOptions struct {
	size       string
	backing    string
	backingFmt string
	rest       []driver.KV
}

// splitImageOptions takes size, backing_file and backing_fmt out of kvs.
func splitImageOptions(kvs []driver.KV) imageOptions {
	var o imageOptions
	for _, kv := range kvs {
		switch kv.Key {
		case "size":
			o.size = kv.Value
		case "backing_file":
			o.backing = kv.Value
		case "backing_fmt":
			o.backingFmt = kv.Value
		default:
			o.rest = append(o.rest, kv)
		}
	}
	return o
}

// mergeFlag combines a flag with the same setting given through -o; both
// given and different is an error, as in qemu-img.
func mergeFlag(flagVal, optVal, flagName, optName string) (string, error) {
	switch {
	case optVal == "":
		return flagVal, nil
	case flagVal == "" || flagVal == optVal:
		return optVal, nil
	}
	return "", driver.OptionErrorf("%s and -o %s=%s disagree (%q)", flagName, optName, optVal, flagVal)
}

// parseImageSize parses a size argument with qemu's suffixes.
func parseImageSize(s string) (int64, error) {
	n, err := driver.ParseSize(s)
	if err != nil {
		return 0, driver.OptionErrorf("invalid image size specified: %v", err)
	}
	return n, nil
}

func typeName(t driver.OptionType) string {
	switch t {
	case driver.TypeString, driver.TypeEnum:
		return "str"
	case driver.TypeBool:
		return "bool (on/off)"
	case driver.TypeInt:
		return "num"
	case driver.TypeSize:
		return "size"
	}
	return t.String()
}

// printOptionHelp lists the create options of f as qemu-img's "-o help"
// does, sorted by name, with the default and allowed values added.
func printOptionHelp(w io.Writer, f *driver.Format) {
	opts := append([]driver.Option(nil), f.CreateOptions...)
	opts = append(opts, driver.Option{Name: "size", Type: driver.TypeSize, Doc: "Virtual disk size"})
	if f.Caps&driver.CapDiff != 0 {
		opts = append(opts,
			driver.Option{Name: "backing_file", Type: driver.TypeString, Doc: "File name of a base image"},
			driver.Option{Name: "backing_fmt", Type: driver.TypeString, Doc: "Image format of the base image"})
	}
	sort.Slice(opts, func(i, j int) bool { return opts[i].Name < opts[j].Name })
	fmt.Fprintf(w, "Supported %s options:\n", f.Name)
	for _, o := range opts {
		line := fmt.Sprintf("  %s=<%s>", o.Name, typeName(o.Type))
		if len(line) < 24 {
			line += strings.Repeat(" ", 24-len(line))
		}
		fmt.Fprintf(w, "%s - %s\n", line, optionDoc(o))
	}
}

// optionDoc is the option's doc with its constraints and default.
func optionDoc(o driver.Option) string {
	doc := o.Doc
	var extra []string
	if len(o.Values) > 0 {
		extra = append(extra, "allowed values: "+strings.Join(o.Values, ", "))
	}
	if o.Max > o.Min {
		extra = append(extra, fmt.Sprintf("range: %d to %d", o.Min, o.Max))
	}
	if o.PowerOf2 {
		extra = append(extra, "power of two")
	}
	if o.Default != "" {
		extra = append(extra, "default: "+o.Default)
	}
	if len(extra) > 0 {
		if doc != "" {
			doc += " "
		}
		doc += "(" + strings.Join(extra, "; ") + ")"
	}
	return doc
}

// optionValueString prints a parsed option value as qemu_opts_print does.
func optionValueString(v any) string {
	switch x := v.(type) {
	case bool:
		if x {
			return "on"
		}
		return "off"
	case int64:
		return strconv.FormatInt(x, 10)
	case string:
		return strings.ReplaceAll(x, ",", ",,")
	}
	return fmt.Sprint(v)
}

// formattingLine is qemu-img create's "Formatting 'FILE', fmt=..." line:
// the format, size, backing file and the options given, in the format's
// declared order.
func formattingLine(name string, f *driver.Format, size int64, backing, backingFmt string, given []driver.KV, vals driver.Values) string {
	var b strings.Builder
	fmt.Fprintf(&b, "Formatting '%s', fmt=%s size=%d", name, f.Name, size)
	if backing != "" {
		fmt.Fprintf(&b, " backing_file=%s", strings.ReplaceAll(backing, ",", ",,"))
		if backingFmt != "" {
			fmt.Fprintf(&b, " backing_fmt=%s", backingFmt)
		}
	}
	set := map[string]bool{}
	for _, kv := range given {
		set[kv.Key] = true
	}
	for _, o := range f.CreateOptions {
		if set[o.Name] && vals.Has(o.Name) {
			fmt.Fprintf(&b, " %s=%s", o.Name, optionValueString(vals[o.Name]))
		}
	}
	return b.String()
}
