package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

func (a *app) newInfoCmd() *cobra.Command {
	var format, output string
	var chain, list bool
	cmd := &cobra.Command{
		Use:   "info [-f FMT] [--output human|json] [--backing-chain] [-U] FILE | --list URL",
		Short: "Show information about an image",
		Long: `Show information about the image FILE: its format, virtual size, the space
it takes on disk, its backing file and format-specific details. With
--backing-chain, the whole chain of backing files is shown, top first.

With the global --untrusted (for a file someone uploaded) the format is
the one -f gives, else a probe must recognise it (no raw guess); no file
the image names is opened unless it is a regular file in the image's
directory or below; and "external-references" lists every file name the
image records (backing file, extent files, data file) with the reason a
name was refused, so a service can reject images that name any.

With --list, URL is a server (nbd://HOST[:PORT], iscsi://HOST[:PORT]) and
the exports or targets it offers are listed, each with the URL that opens
it.`,
		Args: exactArgs(1, "expecting one image file name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			asJSON, err := outputFormat(output)
			if err != nil {
				return err
			}
			if list {
				return a.listExports(args[0], asJSON)
			}
			return a.info(args[0], format, chain, asJSON)
		},
	}
	addFormatFlag(cmd, &format, "image format (probed when not given)")
	cmd.Flags().StringVar(&output, "output", "human", "output format: human or json")
	cmd.Flags().BoolVar(&chain, "backing-chain", false, "show the whole backing chain")
	cmd.Flags().BoolVar(&list, "list", false, "list the exports (NBD) or targets (iSCSI) the server at URL offers")
	addForceShareFlag(cmd)
	return cmd
}

func (a *app) info(name, format string, chain, asJSON bool) error {
	d, err := a.open(name, vdisk.OpenOptions{
		Format:     format,
		InfoOnly:   true,
		NoBacking:  !chain, // like qemu-img info: a missing backing file is no error
		Paths:      a.policy(),
		NoRawGuess: a.untrusted,
	})
	if err != nil {
		return err
	}
	defer d.Close()
	layers := d.Layers()
	if !chain {
		layers = layers[:1]
	}
	var infos []*jnode
	display := name
	if a.imageOpts {
		display = layers[0].Name
	}
	for i, l := range layers {
		if i > 0 && display == "" {
			display = l.Name
		}
		n, err := imageInfo(d.Storage(), l, display)
		if err != nil {
			return err
		}
		if a.untrusted {
			n.set("external-references", externalRefs(l))
		}
		infos = append(infos, n)
		// qemu names a backing image by the path it combined from its
		// child's name and the recorded reference.
		display = ""
		if f := n.get("full-backing-filename"); f != nil {
			display = f.str
		}
	}
	w := bufio.NewWriter(a.stdout)
	if asJSON {
		var b strings.Builder
		if chain {
			arr := jarr()
			for _, n := range infos {
				arr.add(n)
			}
			writeQJSON(&b, arr, 0)
		} else {
			writeQJSON(&b, infos[0], 0)
		}
		b.WriteByte('\n')
		w.WriteString(b.String())
	} else {
		for i, n := range infos {
			if i > 0 {
				w.WriteString("\n")
			}
			dumpHumanInfo(w, n)
		}
	}
	return w.Flush()
}

// imageInfo collects qemu's ImageInfo for one layer. Keys are set in the
// order of QEMU's QAPI ImageInfo visitor, which decides the order among
// keys sharing a QDict bucket.
func imageInfo(st driver.Storage, l *vdisk.Layer, display string) (*jnode, error) {
	inf := l.Info()
	n := jobj()
	n.set("filename", jstr(display))
	n.set("format", jstr(l.Format.Name))
	n.set("dirty-flag", jbool(inf.Dirty))
	if fi, err := st.Stat(l.Name); err == nil && fi.Allocated >= 0 {
		n.set("actual-size", jint(fi.Allocated))
	}
	n.set("virtual-size", jint(l.Size()))
	if inf.ClusterSize > 0 {
		n.set("cluster-size", jint(inf.ClusterSize))
	}
	if inf.Encrypted {
		n.set("encrypted", jbool(true))
	}
	if ref := l.ParentRef(); ref != nil && ref.Name != "" {
		n.set("backing-filename", jstr(ref.Name))
		n.set("full-backing-filename", jstr(combinePath(display, ref.Name)))
		if ref.Format != "" {
			n.set("backing-filename-format", jstr(ref.Format))
		}
	}
	if sn, ok := vdisk.As[driver.Snapshotter](l); ok {
		list, err := sn.Snapshots()
		if err != nil {
			return nil, driver.WithFile(err, "list snapshots", l.Name)
		}
		if len(list) > 0 {
			arr := jarr()
			for _, s := range list {
				o := jobj()
				o.set("id", jstr(s.ID))
				o.set("name", jstr(s.Name))
				o.set("vm-state-size", jint(s.VMStateSize))
				o.set("date-sec", jint(s.DateSec))
				o.set("date-nsec", jint(s.DateNsec))
				o.set("vm-clock-sec", jint(s.VMClockSec))
				o.set("vm-clock-nsec", jint(s.VMClockNsec))
				if s.ICount != 0 {
					o.set("icount", jint(s.ICount))
				}
				arr.add(o)
			}
			n.set("snapshots", arr)
		}
	}
	if inf.Specific != nil {
		data, err := toJNode(inf.Specific)
		if err != nil {
			return nil, fmt.Errorf("%s: format-specific information: %w", l.Name, err)
		}
		if data.kind != jNull {
			fs := jobj()
			fs.set("type", jstr(l.Format.Name))
			fs.set("data", data)
			n.set("format-specific", fs)
		}
	}
	return n, nil
}

// externalRefs lists the file names l's image records: its backing file
// (refused by the strict policy's name check, or not, as the chain was
// not opened) and every name its driver met, followed or refused.
func externalRefs(l *vdisk.Layer) *jnode {
	arr := jarr()
	add := func(r driver.Reference) {
		o := jobj()
		o.set("field", jstr(r.Field))
		o.set("name", jstr(r.Name))
		if r.Path != "" {
			o.set("path", jstr(r.Path))
		}
		if r.Refused != "" {
			o.set("refused", jstr(r.Refused))
		}
		arr.add(o)
	}
	if ref := l.ParentRef(); ref != nil && ref.Name != "" {
		r := driver.Reference{Field: "backing file", Name: ref.Name}
		var pe *driver.PathError
		full, err := driver.ResolveReferenced(l.Name, r.Field, ref.Name, false)
		r.Path = full
		if errors.As(err, &pe) {
			r.Refused = pe.Reason
		}
		add(r)
	}
	for _, r := range l.References() {
		add(r)
	}
	return arr
}

// combinePath resolves a backing reference against its child's name as
// QEMU's path_combine does: absolute references stay, relative ones get the
// child's directory prefix (verbatim, not cleaned).
func combinePath(child, ref string) string {
	if filepath.IsAbs(ref) {
		return ref
	}
	i := strings.LastIndexByte(child, '/')
	if i < 0 {
		return ref
	}
	return child[:i+1] + ref
}

// dumpHumanInfo prints one ImageInfo as qemu-img 7.2's bdrv_image_info_dump.
func dumpHumanInfo(w io.Writer, n *jnode) {
	str := func(k string) string {
		if v := n.get(k); v != nil {
			return v.str
		}
		return ""
	}
	num := func(k string) int64 {
		var x int64
		if v := n.get(k); v != nil {
			fmt.Sscan(v.str, &x)
		}
		return x
	}
	vsize := num("virtual-size")
	dsize := "unavailable"
	if n.get("actual-size") != nil {
		dsize = driver.FormatSize(num("actual-size"))
	}
	fmt.Fprintf(w, "image: %s\nfile format: %s\nvirtual size: %s (%d bytes)\ndisk size: %s\n",
		str("filename"), str("format"), driver.FormatSize(vsize), vsize, dsize)
	if str("encrypted") == "true" {
		fmt.Fprintf(w, "encrypted: yes\n")
	}
	if n.get("cluster-size") != nil {
		fmt.Fprintf(w, "cluster_size: %d\n", num("cluster-size"))
	}
	if str("dirty-flag") == "true" {
		fmt.Fprintf(w, "cleanly shut down: no\n")
	}
	if n.get("backing-filename") != nil {
		fmt.Fprintf(w, "backing file: %s", str("backing-filename"))
		if full := n.get("full-backing-filename"); full == nil {
			fmt.Fprint(w, " (cannot determine actual path)")
		} else if full.str != str("backing-filename") {
			fmt.Fprintf(w, " (actual path: %s)", full.str)
		}
		fmt.Fprintln(w)
		if f := n.get("backing-filename-format"); f != nil {
			fmt.Fprintf(w, "backing file format: %s\n", f.str)
		}
	}
	if refs := n.get("external-references"); refs != nil {
		for _, r := range refs.vals {
			fmt.Fprintf(w, "external reference: %s %q", r.get("field").str, r.get("name").str)
			if why := r.get("refused"); why != nil {
				fmt.Fprintf(w, " (refused: %s)", why.str)
			}
			fmt.Fprintln(w)
		}
	}
	if sn := n.get("snapshots"); sn != nil {
		fmt.Fprintf(w, "Snapshot list:\n")
		fmt.Fprintf(w, "%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")
		for _, s := range sn.vals {
			get := func(k string) int64 {
				var x int64
				if v := s.get(k); v != nil {
					fmt.Sscan(v.str, &x)
				}
				return x
			}
			date := time.Unix(get("date-sec"), 0).Format("2006-01-02 15:04:05")
			clock := get("vm-clock-sec")*1e9 + get("vm-clock-nsec")
			secs := clock / 1e9
			clockStr := fmt.Sprintf("%02d:%02d:%02d.%03d", secs/3600, (secs/60)%60, secs%60, (clock/1e6)%1000)
			icount := ""
			if v := s.get("icount"); v != nil {
				icount = v.str
			}
			fmt.Fprintf(w, "%-9s %-16s %8s%20s%13s%11s\n", s.get("id").str, s.get("name").str,
				driver.FormatSize(get("vm-state-size")), date, clockStr, icount)
		}
	}
	if fs := n.get("format-specific"); fs != nil {
		fmt.Fprintf(w, "Format specific information:\n")
		data := fs.get("data")
		dumpQObject(w, 1, data)
		if data.kind != jObject && data.kind != jArray {
			fmt.Fprintln(w)
		}
	}
}
