package killtest

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/qemutest"
)

var ctx = context.Background()

// tally counts the verdicts of a row's runs, for the log.
type tally struct {
	runs, clean, leaky, dirty int
	qemuLeaks, vdiskLeaks     int
}

func (s tally) String() string {
	return fmt.Sprintf("%d runs: %d clean, %d with leaks (qemu-img %d, vdisk %d), %d dirty and repaired by an open",
		s.runs, s.clean, s.leaky, s.qemuLeaks, s.vdiskLeaks, s.dirty)
}

// qemuCheck is qemu-img check's verdict.
type qemuCheck struct {
	code int
	res  qemutest.CheckResult
	out  string
}

func runQemuCheck(format, path string) (qemuCheck, error) {
	out, code, err := qemutest.RunCode("qemu-img", "check", "--output", "json", "-f", format, path)
	if err != nil {
		return qemuCheck{}, err
	}
	q := qemuCheck{code: code, out: out}
	if code == 0 || code == 2 || code == 3 {
		if err := json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &q.res); err != nil {
			return q, fmt.Errorf("qemu-img check: exit %d: %s", code, out)
		}
	}
	return q, nil
}

// vdiskCheck opens the image read-only and returns its Check result (nil
// for formats without one) and whether its dirty flag is set.
func vdiskCheck(r row, path string) (*driver.CheckResult, bool, error) {
	d, err := vdisk.Open(ctx, path, &vdisk.OpenOptions{Format: r.format, ReadOnly: true})
	if err != nil {
		return nil, false, fmt.Errorf("the image does not open after the kill: %w", err)
	}
	defer d.Close()
	dirty := d.Layers()[0].Info().Dirty
	if r.judge == noJudge {
		return nil, dirty, nil
	}
	res, err := d.Check(ctx, driver.RepairNone)
	if err != nil {
		return nil, dirty, fmt.Errorf("vdisk check: %w", err)
	}
	return res, dirty, nil
}

// judgeImage checks the image at path after a kill: qemu-img check exits
// 0 (3 where the row allows leaks), vdisk's Check finds no corruption and
// agrees with qemu-img; a set dirty flag (where the format has one) must be
// repaired by an open read-write, after which both checks pass.
func judgeImage(t testing.TB, r row, path string, st *tally) error {
	st.runs++
	res, dirty, err := vdiskCheck(r, path)
	if err != nil {
		return err
	}
	if dirty {
		if !r.dirty {
			return fmt.Errorf("the image's dirty flag is set, and the row says the format has none")
		}
		d, err := vdisk.Open(ctx, path, &vdisk.OpenOptions{Format: r.format})
		if err != nil {
			return fmt.Errorf("open read-write to repair the dirty image: %w", err)
		}
		if err := d.Close(); err != nil {
			return fmt.Errorf("close after repairing the dirty image: %w", err)
		}
		if res, dirty, err = vdiskCheck(r, path); err != nil {
			return err
		}
		if dirty {
			return fmt.Errorf("the dirty flag is still set after an open read-write")
		}
		st.dirty++
	}
	if r.judge == noJudge {
		st.clean++
		return nil
	}
	var q qemuCheck
	if r.judge == qemuAndVdisk {
		if q, err = runQemuCheck(r.format, path); err != nil {
			return err
		}
		switch {
		case q.code == 0:
		case q.code == 3 && r.leaks && q.res.Corruptions == 0:
			st.qemuLeaks++
		default:
			return fmt.Errorf("qemu-img check: exit %d:\n%s\nvdisk check: %+v %q", q.code, q.out, res, res.Messages)
		}
	}
	if res.Corruptions != 0 || res.CheckErrors != 0 {
		return fmt.Errorf("vdisk check: %d corruptions, %d errors (qemu-img check exit %d): %q", res.Corruptions, res.CheckErrors, q.code, res.Messages)
	}
	if res.Leaks > 0 {
		if !r.leaks {
			return fmt.Errorf("vdisk check: %d leaks, and the row allows none: %q", res.Leaks, res.Messages)
		}
		st.vdiskLeaks++
	}
	if q.res.Leaks > 0 && res.Leaks == 0 {
		return fmt.Errorf("qemu-img check finds %d leaked clusters, vdisk's Check none:\n%s", q.res.Leaks, q.out)
	}
	if q.res.Leaks == 0 && res.Leaks == 0 {
		st.clean++
		return nil
	}
	// Leaks stay until repaired: repair them (check -r leaks), so that the
	// next kill's are its own, and the repair is checked too.
	st.leaky++
	d, err := vdisk.Open(ctx, path, &vdisk.OpenOptions{Format: r.format})
	if err != nil {
		return fmt.Errorf("open to repair leaks: %w", err)
	}
	rr, err := d.Check(ctx, driver.RepairLeaks)
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil || rr.Leaks != 0 || rr.Corruptions != 0 {
		return fmt.Errorf("vdisk check -r leaks: %+v %q %v", rr, rr.Messages, err)
	}
	if r.judge == qemuAndVdisk {
		if q, err = runQemuCheck(r.format, path); err != nil || q.code != 0 {
			return fmt.Errorf("qemu-img check after vdisk check -r leaks: exit %d %v:\n%s", q.code, err, q.out)
		}
	}
	return nil
}

// readImage reads the whole disk.
func readImage(r row, path string) ([]byte, error) {
	d, err := vdisk.Open(ctx, path, &vdisk.OpenOptions{Format: r.format, ReadOnly: true})
	if err != nil {
		return nil, err
	}
	defer d.Close()
	got := make([]byte, d.Size())
	for off := int64(0); off < d.Size(); {
		n := min(int64(1<<20+4096), d.Size()-off)
		if _, err := d.ReadAt(got[off:off+n], off); err != nil {
			return nil, fmt.Errorf("read at %d: %w", off, err)
		}
		off += n
	}
	return got, nil
}
