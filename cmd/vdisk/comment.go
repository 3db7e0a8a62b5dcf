package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

func (a *app) newCommentCmd() *cobra.Command {
	var format, text string
	cmd := &cobra.Command{
		Use:   "comment [-f FMT] [--set TEXT] FILE",
		Short: "Show or set the free-text comment of an image",
		Long: `Without --set, print the comment FILE records (nothing when it has none).
--set TEXT replaces it ('--set ""' clears it); formats that record a
comment, such as VDI.`,
		Args: exactArgs(1, "expecting one image file name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.comment(args[0], format, text, cmd.Flags().Changed("set"))
		},
	}
	addFormatFlag(cmd, &format, "image format (probed when not given)")
	cmd.Flags().StringVar(&text, "set", "", "set the comment to TEXT")
	return cmd
}

func (a *app) comment(name, format, text string, set bool) error {
	if err := checkFormat(format); err != nil {
		return err
	}
	var d *vdisk.Disk
	var err error
	if set {
		d, err = a.openRW(name, format, true)
	} else {
		d, err = a.openTopInfo(name, format)
	}
	if err != nil {
		return err
	}
	defer d.Close()
	top := d.Top()
	c, ok := vdisk.As[driver.Commenter](top)
	if !ok {
		return driver.Unsupportedf(top.Name, "format %s does not record a comment", top.Format.Name)
	}
	if !set {
		if s := c.Comment(); s != "" {
			_, err := fmt.Fprintln(a.stdout, s)
			return err
		}
		return nil
	}
	if err := d.SetComment(text); err != nil {
		return err
	}
	return d.Close()
}
