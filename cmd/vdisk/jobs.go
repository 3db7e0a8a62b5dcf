package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk/control"
)

func (a *app) newJobsCmd() *cobra.Command {
	var server, output, cancel string
	cmd := &cobra.Command{
		Use:   "jobs --server SOCKET [--output human|json] [--cancel ID]",
		Short: "List (or cancel) the live jobs of a 'vdisk serve --control'",
		Long: `List the jobs (commit, stream, snapshot) of the 'vdisk serve --control
SOCKET' listening on SOCKET: running ones, and the last ones that ended
(concluded, failed or cancelled). PROGRESS is the share of the bytes to
copy copied so far (a commit's total grows with what clients write
meanwhile). --cancel ID cancels a running job instead: it ends
"cancelled", the disk reading the same as before.`,
		Args: rangeArgs(0, 0, "expecting no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if server == "" {
				return usageErrorf("--server SOCKET is required")
			}
			js, err := outputFormat(output)
			if err != nil {
				return err
			}
			return a.jobs(server, js, cancel)
		},
	}
	addServerFlag(cmd, &server)
	cmd.Flags().StringVar(&output, "output", "human", "output format: human or json")
	cmd.Flags().StringVar(&cancel, "cancel", "", "cancel job ID")
	return cmd
}

func (a *app) jobs(sock string, asJSON bool, cancel string) error {
	c, err := a.dialControl(sock)
	if err != nil {
		return err
	}
	defer c.Close()
	if cancel != "" {
		return c.Call(a.ctx, "cancel", control.CancelArgs{JobID: cancel}, nil)
	}
	var list []control.JobInfo
	if err := c.Call(a.ctx, "query-jobs", nil, &list); err != nil {
		return err
	}
	if asJSON {
		if list == nil {
			list = []control.JobInfo{}
		}
		b, err := json.MarshalIndent(list, "", "    ")
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(a.stdout, "%s\n", b)
		return err
	}
	if len(list) == 0 {
		return nil
	}
	withErr := false
	for _, j := range list {
		withErr = withErr || j.Error != ""
	}
	var buf bytes.Buffer
	w := tabwriter.NewWriter(&buf, 0, 0, 2, ' ', 0)
	fmt.Fprint(w, "ID\tTYPE\tEXPORT\tSTATUS\tPROGRESS")
	if withErr {
		fmt.Fprint(w, "\tERROR")
	}
	fmt.Fprintln(w)
	for _, j := range list {
		export := j.Export
		if q := strconv.Quote(export); export == "" || q[1:len(q)-1] != export {
			export = q // "" for the default export; escapes for the odd name
		}
		prog := "-"
		if j.Total > 0 {
			prog = fmt.Sprintf("%.2f%%", percent(j.Done, j.Total))
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s", j.ID, j.Type, export, j.Status, prog)
		if withErr {
			fmt.Fprintf(w, "\t%s", j.Error)
		}
		fmt.Fprintln(w)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	// The padding of an empty last column is trailing blanks.
	for _, l := range strings.SplitAfter(buf.String(), "\n") {
		if l != "" {
			fmt.Fprintln(a.stdout, strings.TrimRight(l, " \n"))
		}
	}
	return nil
}
