package main

import (
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/control"
	"github.com/vdisk/vdisk/driver"
)

func (a *app) newSnapshotCmd() *cobra.Command {
	var format, create, apply, del, server, topFormat string
	var list, quiet bool
	cmd := &cobra.Command{
		Use:   "snapshot [-l | -c NAME | -a NAME | -d NAME] [-f FMT] [-q] [-U] FILE | --server SOCKET -c FILE [-F FMT] [EXPORT]",
		Short: "List, create, apply or delete internal snapshots",
		Long: `Manage the internal snapshots of FILE (formats that have them): -l lists
them (the default), -c creates one named NAME, -a reverts the image to
snapshot NAME (an ID or a name), -d deletes it.

With --server, -c takes an external snapshot of export EXPORT (default
"") of a running 'vdisk serve --control SOCKET', while its clients keep
writing: a new, empty image FILE (of format -F, by default the top's)
goes on top of the export's chain and takes every later write. FILE is a
plain file name, created in the directory of the current top. The new
top's name is printed.`,
		Args: imageOrExportArgs(&server, "expecting one image file name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			n := 0
			for _, f := range []string{"list", "create", "apply", "delete"} {
				if cmd.Flags().Changed(f) {
					n++
				}
			}
			if n > 1 {
				return usageErrorf("Cannot mix '-l', '-a', '-c', '-d'")
			}
			if server != "" {
				if !cmd.Flags().Changed("create") || format != "" {
					return usageErrorf("--server takes an external snapshot: it needs -c FILE (and -F FMT rather than -f)")
				}
				return a.snapshotServer(server, exportArg(args), create, topFormat, quiet)
			}
			if topFormat != "" {
				return usageErrorf("-F needs --server")
			}
			if err := checkFormat(format); err != nil {
				return err
			}
			switch {
			case cmd.Flags().Changed("create"):
				return a.snapshotOp(args[0], format, "create", create)
			case cmd.Flags().Changed("apply"):
				return a.snapshotOp(args[0], format, "apply", apply)
			case cmd.Flags().Changed("delete"):
				return a.snapshotOp(args[0], format, "delete", del)
			}
			return a.snapshotList(args[0], format)
		},
	}
	addFormatFlag(cmd, &format, "image format (probed when not given)")
	cmd.Flags().BoolVarP(&list, "list", "l", false, "list the snapshots (the default)")
	cmd.Flags().StringVarP(&create, "create", "c", "", "create a snapshot named NAME")
	cmd.Flags().StringVarP(&apply, "apply", "a", "", "revert the image to snapshot NAME")
	cmd.Flags().StringVarP(&del, "delete", "d", "", "delete snapshot NAME")
	addQuietFlag(cmd, &quiet) // nothing is printed on success anyway (but with --server)
	addForceShareFlag(cmd)
	addServerFlag(cmd, &server)
	cmd.Flags().StringVarP(&topFormat, "snapshot-format", "F", "", "with --server: format of the new top (the current top's when not given)")
	return cmd
}

// snapshotServer takes an external snapshot of an export of a control
// server and prints the new top.
func (a *app) snapshotServer(sock, export, file, format string, quiet bool) error {
	if format != "" {
		if err := checkFormat(format); err != nil {
			return err
		}
	}
	c, err := a.dialControl(sock)
	if err != nil {
		return err
	}
	defer c.Close()
	var res control.SnapshotResult
	if err := c.Call(a.ctx, "snapshot", control.SnapshotArgs{Export: export, File: file, Format: format}, &res); err != nil {
		return err
	}
	a.say(quiet, "%s\n", res.File)
	return nil
}

// snapshotList prints qemu-img snapshot -l's table; like qemu-img it prints
// nothing for an image without snapshots, also when its format has none.
func (a *app) snapshotList(name, format string) error {
	d, err := a.openTopInfo(name, format)
	if err != nil {
		return err
	}
	defer d.Close()
	list, err := d.Snapshots()
	if err != nil {
		return err
	}
	if len(list) > 0 {
		writeSnapshotTable(a.stdout, list)
	}
	return nil
}

// writeSnapshotTable prints snapshots as qemu's bdrv_snapshot_dump does,
// under the "Snapshot list:" header (the same table info shows).
func writeSnapshotTable(w io.Writer, list []driver.Snapshot) {
	fmt.Fprintf(w, "Snapshot list:\n")
	fmt.Fprintf(w, "%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")
	for _, s := range list {
		date := time.Unix(s.DateSec, 0).Format("2006-01-02 15:04:05")
		clock := s.VMClockSec*1e9 + s.VMClockNsec
		secs := clock / 1e9
		clockStr := fmt.Sprintf("%02d:%02d:%02d.%03d", secs/3600, (secs/60)%60, secs%60, (clock/1e6)%1000)
		icount := ""
		if s.ICount != 0 {
			icount = fmt.Sprint(s.ICount)
		}
		fmt.Fprintf(w, "%-9s %-16s %8s%20s%13s%11s\n", s.ID, s.Name, driver.FormatSize(s.VMStateSize), date, clockStr, icount)
	}
}

func (a *app) snapshotOp(name, format, op, snap string) error {
	d, err := a.openRW(name, format, true)
	if err != nil {
		return err
	}
	defer d.Close()
	top := d.Top()
	if _, ok := vdisk.As[driver.Snapshotter](top); !ok {
		return driver.Unsupportedf(top.Name, "Could not %s snapshot '%s': format %s does not support internal snapshots", op, snap, top.Format.Name)
	}
	switch op {
	case "create":
		err = d.CreateSnapshot(snap)
	case "apply":
		err = d.ApplySnapshot(snap)
	case "delete":
		err = d.DeleteSnapshot(snap)
	}
	if err != nil {
		return fmt.Errorf("Could not %s snapshot '%s': %w", op, snap, err)
	}
	return d.Close()
}
