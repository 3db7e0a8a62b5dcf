package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

type benchFlags struct {
	count, depth   int
	format         string
	native, write  bool
	offset         string
	bufsize, step  string
	cache, aio     string
	pattern        int
	flushInterval  int
	noDrain, quiet bool
}

func (a *app) newBenchCmd() *cobra.Command {
	var fl benchFlags
	cmd := &cobra.Command{
		Use:   "bench [-c COUNT] [-d DEPTH] [-f FMT] [-n] [-o OFFSET] [-q] [-s BUFSIZE] [-S STEP] [-t CACHE] [-w] [--pattern=N] [--flush-interval=N] [--no-drain] [-U] FILE",
		Short: "Measure the speed of reads or writes through an image",
		Long: `Send COUNT read requests (write requests with -w) of BUFSIZE bytes each to
FILE through its whole chain, DEPTH of them in parallel (goroutines on one
shared disk), the first at OFFSET and each next one STEP bytes further
(BUFSIZE when not given), wrapping around at the end of the image, as
qemu-img bench does; then print how long the run took. Writes write the
byte PATTERN; with --flush-interval a flush is sent every N requests
(after the requests in flight completed, unless --no-drain). Cache mode
none or directsync opens the image with O_DIRECT; writethrough and
directsync flush after every write; unsafe never flushes.`,
		Args: exactArgs(1, "expecting one image file name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.bench(args[0], &fl)
		},
	}
	f := cmd.Flags()
	f.IntVarP(&fl.count, "count", "c", 75000, "number of requests")
	f.IntVarP(&fl.depth, "depth", "d", 64, "number of requests in parallel")
	addFormatFlag(cmd, &fl.format, "image format (probed when not given)")
	f.BoolVarP(&fl.native, "native", "n", false, "native AIO (accepted for compatibility, ignored)")
	f.StringVarP(&fl.offset, "offset", "o", "0", "offset of the first request")
	f.BoolVarP(&fl.quiet, "quiet", "q", false, "accepted for compatibility (qemu-img bench prints its lines anyway)")
	f.StringVarP(&fl.bufsize, "buffer-size", "s", "4096", "size of each request")
	f.StringVarP(&fl.step, "step-size", "S", "0", "distance between the offsets of consecutive requests (0: BUFSIZE)")
	f.StringVarP(&fl.cache, "cache", "t", "writeback", "cache mode: none, writeback, writethrough, directsync or unsafe")
	f.StringVarP(&fl.aio, "aio", "i", "threads", "AIO mode (accepted for compatibility, ignored)")
	f.BoolVarP(&fl.write, "write", "w", false, "write instead of read")
	f.IntVar(&fl.pattern, "pattern", 0, "byte written by write requests (0 to 255)")
	f.IntVar(&fl.flushInterval, "flush-interval", 0, "send a flush every N requests (write tests only)")
	f.BoolVar(&fl.noDrain, "no-drain", false, "do not wait for the requests in flight before a flush")
	addForceShareFlag(cmd)
	return cmd
}

func benchSize(what, s string, lo, hi int64) (int64, error) {
	n, err := driver.ParseSize(s)
	if err != nil {
		return 0, fmt.Errorf("Invalid %s specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.", what)
	}
	if n < lo || n > hi {
		return 0, fmt.Errorf("Invalid %s specified. Must be between %d and %d.", what, lo, hi)
	}
	return n, nil
}

func (a *app) bench(name string, fl *benchFlags) error {
	if fl.count < 0 || fl.count > math.MaxInt32 {
		return fmt.Errorf("Invalid request count specified")
	}
	if fl.depth < 1 || fl.depth > math.MaxInt32 {
		return fmt.Errorf("Invalid queue depth specified")
	}
	if fl.pattern < 0 || fl.pattern > 0xff {
		return fmt.Errorf("Invalid pattern byte specified")
	}
	if fl.flushInterval < 0 || fl.flushInterval > math.MaxInt32 {
		return fmt.Errorf("Invalid flush interval specified")
	}
	offset, err := benchSize("offset", fl.offset, 0, math.MaxInt64)
	if err != nil {
		return err
	}
	bufsize, err := benchSize("buffer size", fl.bufsize, 0, math.MaxInt32)
	if err != nil {
		return err
	}
	step, err := benchSize("step_size", fl.step, 0, math.MaxInt32)
	if err != nil {
		return err
	}
	if step == 0 {
		step = bufsize
	}
	var direct, flushEach, noFlush bool
	switch fl.cache {
	case "none":
		direct = true
	case "writeback":
	case "writethrough":
		flushEach = true
	case "directsync":
		direct, flushEach = true, true
	case "unsafe":
		noFlush = true
	default:
		return fmt.Errorf("Invalid cache mode")
	}
	if !fl.write && fl.flushInterval != 0 {
		return fmt.Errorf("--flush-interval is only available in write tests")
	}
	if fl.flushInterval != 0 && fl.flushInterval < fl.depth {
		return fmt.Errorf("Flush interval can't be smaller than depth")
	}
	if err := checkFormat(fl.format); err != nil {
		return err
	}
	d, err := a.open(name, vdisk.OpenOptions{
		Format:   fl.format,
		ReadOnly: !fl.write,
		Direct:   direct,
		Paths:    a.policy(),
	})
	if err != nil {
		return err
	}
	defer d.Close()

	rw := "read"
	if fl.write {
		rw = "write"
	}
	fmt.Fprintf(a.stdout, "Sending %d %s requests, %d bytes each, %d in parallel (starting at offset %d, step size %d)\n",
		fl.count, rw, bufsize, fl.depth, offset, step)
	if fl.flushInterval != 0 {
		fmt.Fprintf(a.stdout, "Sending flush every %d requests\n", fl.flushInterval)
	}
	r := &benchRun{
		d: d, count: fl.count, depth: fl.depth, bufsize: bufsize, offset: offset, step: step,
		write: fl.write, pattern: byte(fl.pattern), flushInterval: fl.flushInterval,
		drain: !fl.noDrain, flushEach: flushEach && !noFlush, noFlush: noFlush,
	}
	start := time.Now()
	if err := r.run(a.ctx); err != nil {
		if errors.Is(err, context.Canceled) && a.ctx.Err() != nil {
			return err
		}
		return fmt.Errorf("Failed request: %w", err)
	}
	if fl.write && !noFlush {
		if err := d.Flush(); err != nil {
			return fmt.Errorf("Failed request: %w", err)
		}
	}
	fmt.Fprintf(a.stdout, "Run completed in %.3f seconds.\n", time.Since(start).Seconds())
	return d.Close()
}

// benchRun is one bench run: count requests, at most depth in flight.
type benchRun struct {
	d                     *vdisk.Disk
	count, depth          int
	bufsize, offset, step int64
	write                 bool
	pattern               byte
	flushInterval         int
	drain                 bool
	flushEach, noFlush    bool
}

func (r *benchRun) request(buf []byte, off int64) error {
	size := r.d.Size()
	if off > size || int64(len(buf)) > size-off {
		return fmt.Errorf("Input/output error (a request of %d bytes at offset %d reaches past the end of the image, %d bytes)", len(buf), off, size)
	}
	if !r.write {
		_, err := r.d.ReadAt(buf, off)
		return err
	}
	if _, err := r.d.WriteAt(buf, off); err != nil {
		return err
	}
	if r.flushEach {
		return r.d.Flush()
	}
	return nil
}

func (r *benchRun) run(parent context.Context) error {
	ctx, cancel := context.WithCancelCause(parent)
	defer cancel(nil)
	fail := func(err error) { cancel(err) }
	// The buffers double as the semaphore bounding the requests in flight.
	bufs := make(chan []byte, r.depth)
	for i := 0; i < r.depth; i++ {
		b := make([]byte, r.bufsize)
		for j := range b {
			b[j] = r.pattern
		}
		bufs <- b
	}
	size := r.d.Size()
	var wg sync.WaitGroup
	off := r.offset
issue:
	for i := 0; i < r.count; i++ {
		var buf []byte
		select {
		case buf = <-bufs:
		case <-ctx.Done():
			break issue
		}
		o := off
		if size > 0 {
			off = (off + r.step) % size
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := r.request(buf, o); err != nil {
				fail(err)
			}
			bufs <- buf
		}()
		if r.flushInterval > 0 && (i+1)%r.flushInterval == 0 && !r.noFlush {
			if r.drain {
				wg.Wait()
				if err := r.d.Flush(); err != nil {
					fail(err)
				}
			} else {
				wg.Add(1)
				go func() {
					defer wg.Done()
					if err := r.d.Flush(); err != nil {
						fail(err)
					}
				}()
			}
		}
	}
	wg.Wait()
	return context.Cause(ctx)
}
