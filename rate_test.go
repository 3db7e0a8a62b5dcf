package vdisk_test

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// TestJobRate: a rate limit paces commit and stream (the 4 MiB chain at
// 16 MiB/s needs at least 0.25 s, where unlimited it takes milliseconds),
// the content stays right, and a cancelled paced job stops while it waits.
func TestJobRate(t *testing.T) {
	f := liveFormats[0]
	for _, job := range []string{"commit", "stream"} {
		t.Run(job, func(t *testing.T) {
			st := memfs.New()
			top, want := buildMemChain(t, st, f, 5)
			d, err := vdisk.Open(ctx, top, &vdisk.OpenOptions{Storage: st})
			if err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			switch job {
			case "commit":
				err = d.Commit(ctx, &vdisk.CommitOptions{Base: 2, Keep: true, Rate: 16 << 20})
			default:
				_, err = d.Stream(ctx, &vdisk.StreamOptions{Rate: 16 << 20})
			}
			if err != nil {
				t.Fatal(err)
			}
			if el := time.Since(start); el < 240*time.Millisecond {
				t.Errorf("%s of 4 MiB at 16 MiB/s took only %v", job, el)
			}
			if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
				t.Errorf("%s changed the content", job)
			}
			disktest.MustClose(t, d)
		})
	}
	// A job waiting on its rate ends as soon as it is cancelled.
	st := memfs.New()
	top, _ := buildMemChain(t, st, f, 6)
	d, err := vdisk.Open(ctx, top, &vdisk.OpenOptions{Storage: st})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	cctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	err = d.Commit(cctx, &vdisk.CommitOptions{Base: 1, Rate: 1 << 10})
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 5*time.Second {
		t.Errorf("cancelled paced commit: %v after %v", err, time.Since(start))
	}
}
