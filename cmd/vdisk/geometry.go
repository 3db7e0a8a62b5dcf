package main

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

func (a *app) newGeometryCmd() *cobra.Command {
	var format, pchs, lchs string
	cmd := &cobra.Command{
		Use:   "geometry [-f FMT] [--pchs C/H/S] [--lchs C/H/S] FILE",
		Short: "Show or set the CHS geometry an image records",
		Long: `Without flags, show the physical (PCHS) and logical (LCHS) cylinder/head/
sector geometry FILE records ("none" when it records none). --pchs and
--lchs set them (formats that record a geometry, such as VDI and VHD).`,
		Args: exactArgs(1, "expecting one image file name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			var p, l *driver.CHS
			var err error
			if cmd.Flags().Changed("pchs") {
				if p, err = parseCHS(pchs, "--pchs"); err != nil {
					return err
				}
			}
			if cmd.Flags().Changed("lchs") {
				if l, err = parseCHS(lchs, "--lchs"); err != nil {
					return err
				}
			}
			return a.geometry(args[0], format, p, l)
		},
	}
	addFormatFlag(cmd, &format, "image format (probed when not given)")
	cmd.Flags().StringVar(&pchs, "pchs", "", "set the physical geometry, CYLINDERS/HEADS/SECTORS")
	cmd.Flags().StringVar(&lchs, "lchs", "", "set the logical geometry, CYLINDERS/HEADS/SECTORS")
	return cmd
}

func parseCHS(s, flag string) (*driver.CHS, error) {
	parts := strings.Split(s, "/")
	if len(parts) == 3 {
		var v [3]uint32
		ok := true
		for i, p := range parts {
			n, err := strconv.ParseUint(strings.TrimSpace(p), 10, 32)
			if err != nil {
				ok = false
				break
			}
			v[i] = uint32(n)
		}
		if ok {
			return &driver.CHS{Cylinders: v[0], Heads: v[1], Sectors: v[2]}, nil
		}
	}
	return nil, usageErrorf("invalid geometry %q for %s: expected CYLINDERS/HEADS/SECTORS", s, flag)
}

func chsString(g driver.CHS, ok bool) string {
	if !ok {
		return "none"
	}
	return fmt.Sprintf("%d/%d/%d", g.Cylinders, g.Heads, g.Sectors)
}

func (a *app) geometry(name, format string, pchs, lchs *driver.CHS) error {
	if err := checkFormat(format); err != nil {
		return err
	}
	show := pchs == nil && lchs == nil
	open := a.openTopInfo
	if !show {
		open = func(name, format string) (*vdisk.Disk, error) { return a.openRW(name, format, true) }
	}
	d, err := open(name, format)
	if err != nil {
		return err
	}
	defer d.Close()
	top := d.Top()
	g, ok := vdisk.As[driver.Geometry](top)
	if !ok {
		return driver.Unsupportedf(top.Name, "format %s does not record a disk geometry", top.Format.Name)
	}
	if show {
		p, pok := g.PCHS()
		l, lok := g.LCHS()
		_, err := fmt.Fprintf(a.stdout, "PCHS: %s\nLCHS: %s\n", chsString(p, pok), chsString(l, lok))
		return err
	}
	if err := d.SetGeometry(pchs, lchs); err != nil {
		return err
	}
	return d.Close()
}
