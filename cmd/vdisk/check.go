package main

import (
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

// Exit codes of qemu-img check.
const (
	checkExitCorrupt     = 2
	checkExitLeaks       = 3
	checkExitUnsupported = 63
)

const checkLong = `Check the consistency of the metadata of FILE (its top image): corruptions
(errors that may lose data), leaks (allocated space nothing uses) and
allocation statistics, printed as qemu-img check prints them.

Exit status: 0 no errors, 1 the check could not be completed, 2 the image
is corrupted, 3 it only leaks clusters, 63 the format cannot be checked.`

func (a *app) newCheckCmd() *cobra.Command {
	var format, repair, output, cache string
	var quiet bool
	cmd := &cobra.Command{
		Use:   "check [-f FMT] [-r leaks|all] [--output human|json] [-q] [-U] FILE",
		Short: "Check an image for consistency",
		Long: checkLong + `

With -r leaks the leaks are repaired, with -r all also the corruptions;
the image is checked again afterwards.`,
		Args: exactArgs(1, "expecting one image file name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			asJSON, err := outputFormat(output)
			if err != nil {
				return err
			}
			if err := checkCacheMode(cache); err != nil {
				return err
			}
			mode := driver.RepairNone
			switch repair {
			case "":
			case "leaks":
				mode = driver.RepairLeaks
			case "all":
				mode = driver.RepairAll
			default:
				return usageErrorf("Unknown option value for -r (expecting 'leaks' or 'all'): %s", repair)
			}
			return a.check(args[0], format, mode, asJSON, quiet)
		},
	}
	addFormatFlag(cmd, &format, "image format (probed when not given)")
	cmd.Flags().StringVarP(&repair, "repair", "r", "", "repair: leaks, or all (leaks and corruptions)")
	cmd.Flags().StringVar(&output, "output", "human", "output format: human or json")
	cmd.Flags().StringVarP(&cache, "cache", "T", "", "cache mode (accepted for compatibility, ignored)")
	addQuietFlag(cmd, &quiet)
	addForceShareFlag(cmd)
	return cmd
}

func (a *app) newRepairCmd() *cobra.Command {
	var format, output string
	var dryRun, quiet bool
	cmd := &cobra.Command{
		Use:   "repair [-f FMT] [--dry-run] [--output human|json] [-q] FILE",
		Short: "Check an image and repair what can be repaired (check -r all)",
		Long: checkLong + `

repair is VirtualBox's name for 'check -r all': leaks and corruptions are
repaired, then the image is checked again. With --dry-run nothing is
written (a plain check).`,
		Args: exactArgs(1, "expecting one image file name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			asJSON, err := outputFormat(output)
			if err != nil {
				return err
			}
			mode := driver.RepairAll
			if dryRun {
				mode = driver.RepairNone
			}
			return a.check(args[0], format, mode, asJSON, quiet)
		},
	}
	addFormatFlag(cmd, &format, "image format (probed when not given)")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "only check; repair nothing")
	cmd.Flags().StringVar(&output, "output", "human", "output format: human or json")
	addQuietFlag(cmd, &quiet)
	return cmd
}

func (a *app) check(name, format string, mode driver.RepairMode, asJSON, quiet bool) error {
	if err := checkFormat(format); err != nil {
		return err
	}
	var d *vdisk.Disk
	var err error
	if mode == driver.RepairNone {
		d, err = a.openRO(name, format, false)
	} else {
		d, err = a.openRW(name, format, false)
	}
	if err != nil {
		return err
	}
	defer d.Close()
	top := d.Top()
	unsupported := &exitError{code: checkExitUnsupported, err: errors.New("This image format does not support checks")}
	if _, ok := vdisk.As[driver.Checker](top); !ok {
		return unsupported
	}
	res, err := d.Check(a.ctx, mode)
	if err != nil {
		if errors.Is(err, vdisk.ErrUnsupported) {
			return unsupported
		}
		return fmt.Errorf("Check failed: %w", err)
	}
	a.checkMessages(res)
	if res.CorruptionsFixed != 0 || res.LeaksFixed != 0 {
		if !asJSON {
			a.say(quiet, "The following inconsistencies were found and repaired:\n\n"+
				"    %d leaked clusters\n    %d corruptions\n\nDouble checking the fixed image now...\n",
				res.LeaksFixed, res.CorruptionsFixed)
		}
		again, err := d.Check(a.ctx, driver.RepairNone)
		if err != nil {
			return fmt.Errorf("Check failed: %w", err)
		}
		a.checkMessages(again)
		again.LeaksFixed, again.CorruptionsFixed = res.LeaksFixed, res.CorruptionsFixed
		res = again
	}
	if !quiet {
		if asJSON {
			var b strings.Builder
			writeQJSON(&b, checkJSON(name, top.Format.Name, res), 0)
			b.WriteByte('\n')
			io.WriteString(a.stdout, b.String())
		} else {
			dumpHumanCheck(a.stdout, res)
		}
	}
	switch {
	case res.CheckErrors != 0:
		return errors.New("Check failed")
	case res.Corruptions != 0:
		return &exitError{code: checkExitCorrupt}
	case res.Leaks != 0:
		return &exitError{code: checkExitLeaks}
	}
	return d.Close()
}

// checkMessages prints the driver's findings on stderr, as qemu's drivers
// do ("Leaked cluster 4 refcount=1 reference=0").
func (a *app) checkMessages(res *driver.CheckResult) {
	for _, m := range res.Messages {
		fmt.Fprintln(a.stderr, oneLine(m))
	}
}

// checkJSON builds qemu's ImageCheck object: filename, format and
// check-errors always, the other fields when they are not zero; keys are
// added in the order of the QAPI schema.
func checkJSON(name, format string, r *driver.CheckResult) *jnode {
	n := jobj()
	n.set("filename", jstr(name))
	n.set("format", jstr(format))
	n.set("check-errors", jint(int64(r.CheckErrors)))
	for _, f := range []struct {
		key string
		v   int64
	}{
		{"image-end-offset", r.ImageEndOffset},
		{"corruptions", int64(r.Corruptions)},
		{"leaks", int64(r.Leaks)},
		{"corruptions-fixed", int64(r.CorruptionsFixed)},
		{"leaks-fixed", int64(r.LeaksFixed)},
		{"total-clusters", r.TotalClusters},
		{"allocated-clusters", r.AllocatedClusters},
		{"fragmented-clusters", r.FragmentedClusters},
		{"compressed-clusters", r.CompressedClusters},
	} {
		if f.v != 0 {
			n.set(f.key, jint(f.v))
		}
	}
	return n
}

// dumpHumanCheck prints a check result as qemu-img 7.2's
// dump_human_image_check.
func dumpHumanCheck(w io.Writer, r *driver.CheckResult) {
	if r.Corruptions == 0 && r.Leaks == 0 && r.CheckErrors == 0 {
		fmt.Fprintf(w, "No errors were found on the image.\n")
	} else {
		if r.Corruptions != 0 {
			fmt.Fprintf(w, "\n%d errors were found on the image.\n"+
				"Data may be corrupted, or further writes to the image may corrupt it.\n", r.Corruptions)
		}
		if r.Leaks != 0 {
			fmt.Fprintf(w, "\n%d leaked clusters were found on the image.\n"+
				"This means waste of disk space, but no harm to data.\n", r.Leaks)
		}
		if r.CheckErrors != 0 {
			fmt.Fprintf(w, "\n%d internal errors have occurred during the check.\n", r.CheckErrors)
		}
	}
	if r.TotalClusters != 0 && r.AllocatedClusters != 0 {
		fmt.Fprintf(w, "%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
			r.AllocatedClusters, r.TotalClusters,
			float64(r.AllocatedClusters)*100/float64(r.TotalClusters),
			float64(r.FragmentedClusters)*100/float64(r.AllocatedClusters),
			float64(r.CompressedClusters)*100/float64(r.AllocatedClusters))
	}
	if r.ImageEndOffset != 0 {
		fmt.Fprintf(w, "Image end offset: %d\n", r.ImageEndOffset)
	}
}
