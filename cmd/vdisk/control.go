package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"time"

	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk/control"
)

// The --server forms of commit, stream, snapshot and jobs talk to a
// `vdisk serve --control SOCKET` over its control socket (package
// control).

// jobPoll is how often a waiting command asks how its job is doing.
const jobPoll = 100 * time.Millisecond

// addServerFlag declares --server.
func addServerFlag(cmd *cobra.Command, p *string) {
	cmd.Flags().StringVar(p, "server", "", "act on an export of a running 'vdisk serve --control SOCKET' through SOCKET")
}

// imageOrExportArgs takes one FILE, or with --server at most one EXPORT.
func imageOrExportArgs(server *string, msg string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if *server != "" {
			return rangeArgs(0, 1, "expecting at most one export name with --server")(cmd, args)
		}
		return exactArgs(1, msg)(cmd, args)
	}
}

// exportArg is the export named on the command line ("" by default).
func exportArg(args []string) string {
	if len(args) == 1 {
		return args[0]
	}
	return ""
}

// dialControl connects to a control socket.
func (a *app) dialControl(sock string) (*control.Client, error) {
	c, err := control.DialContext(a.ctx, sock)
	if err != nil {
		var oe *net.OpError
		if errors.As(err, &oe) && oe.Err != nil {
			err = oe.Err
		}
		return nil, fmt.Errorf("cannot connect to the control socket %s: %w", sock, err)
	}
	return c, nil
}

// startJob connects to sock and runs cmd (commit or stream), which starts
// a job: with detach it prints the job's ID and returns, otherwise it
// waits for the job's end (see waitJob) and prints done unless quiet.
func (a *app) startJob(sock, cmd string, args any, detach, showProgress, quiet bool, done string) error {
	c, err := a.dialControl(sock)
	if err != nil {
		return err
	}
	defer c.Close()
	var st control.JobStarted
	if err := c.Call(a.ctx, cmd, args, &st); err != nil {
		return err
	}
	if detach {
		fmt.Fprintln(a.stdout, st.JobID)
		return nil
	}
	if err := a.waitJob(c, sock, st.JobID, showProgress && !quiet); err != nil {
		return err
	}
	a.say(quiet, "%s", done)
	return nil
}

// waitJob polls query-jobs until job id ends, showing its progress, and
// returns its error (nil when it concluded). An interrupted wait (SIGINT)
// cancels the job.
func (a *app) waitJob(c *control.Client, sock, id string, showProgress bool) (err error) {
	prog := a.newProgress(showProgress)
	defer func() { prog.finish(err == nil) }()
	tick := time.NewTicker(jobPoll)
	defer tick.Stop()
	for {
		var jobs []control.JobInfo
		if err := c.Call(a.ctx, "query-jobs", nil, &jobs); err != nil {
			if a.ctx.Err() != nil {
				return a.cancelJob(sock, id)
			}
			return err
		}
		var j *control.JobInfo
		for i := range jobs {
			if jobs[i].ID == id {
				j = &jobs[i]
			}
		}
		if j == nil {
			return fmt.Errorf("job %s is no longer listed by the server", id)
		}
		if j.Total > 0 {
			prog.update(j.Done, j.Total)
		}
		switch j.Status {
		case control.StatusRunning:
		case control.StatusConcluded:
			return nil
		case control.StatusCancelled:
			return fmt.Errorf("job %s was cancelled", id)
		default:
			msg := j.Error
			if msg == "" {
				msg = "job " + id + " " + j.Status
			}
			return errors.New(msg)
		}
		select {
		case <-a.ctx.Done():
			return a.cancelJob(sock, id)
		case <-tick.C:
		}
	}
}

// cancelJob cancels job id after the command was interrupted (over a new
// connection: the old one may be broken by the interruption) and returns
// the interruption.
func (a *app) cancelJob(sock, id string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if c, err := control.DialContext(ctx, sock); err == nil {
		if err := c.Call(ctx, "cancel", control.CancelArgs{JobID: id}, nil); err != nil {
			a.log.Warn("could not cancel the job", "job", id, "error", err)
		}
		c.Close()
	}
	return a.ctx.Err()
}

// queryExport returns the export named name.
func (a *app) queryExport(c *control.Client, name string) (*control.ExportInfo, error) {
	var list []control.ExportInfo
	if err := c.Call(a.ctx, "query-exports", nil, &list); err != nil {
		return nil, err
	}
	for i := range list {
		if list[i].Name == name {
			return &list[i], nil
		}
	}
	return nil, fmt.Errorf("the server has no export named '%s'", name)
}

// layerIndex resolves a -b argument against an export's chain: an index,
// or an image's name (as the server knows it, its base name, or any path
// to the same file). It returns -1 when nothing matches.
func layerIndex(layers []control.LayerInfo, ref string) int {
	if n, err := strconv.Atoi(ref); err == nil {
		return n
	}
	for i := 1; i < len(layers); i++ {
		if layers[i].Name == ref || filepath.Base(layers[i].Name) == ref || sameFile(ref, layers[i].Name) {
			return i
		}
	}
	return -1
}
