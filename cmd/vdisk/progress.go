package main

import (
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

// progress shows how far a long operation is, on stderr. On a terminal it
// draws a bar labelled like qemu-img's "(12.34/100%)"; elsewhere it prints
// qemu-img's own "    (12.34/100%)\r" records, one per percent.
type progress struct {
	mu       sync.Mutex
	w        io.Writer
	bar      *progressbar.ProgressBar
	tty      bool
	last     float64 // last percentage shown; -1 before the first
	lastTime time.Time
	done     bool
}

// newProgress returns nil (which ignores every call) unless enabled.
func (a *app) newProgress(enabled bool) *progress {
	if !enabled {
		return nil
	}
	return &progress{w: a.stderr, tty: isTerminal(a.stderr), last: -1}
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

func percent(done, total int64) float64 {
	if total <= 0 {
		return 100
	}
	p := float64(done) * 100 / float64(total)
	return min(max(p, 0), 100)
}

// update is a driver.Progress: safe for concurrent use, throttled.
func (p *progress) update(done, total int64) {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.done {
		return
	}
	pct := percent(done, total)
	if p.tty {
		if total <= 0 {
			return
		}
		if p.bar == nil {
			p.bar = progressbar.NewOptions64(total,
				progressbar.OptionSetWriter(p.w),
				progressbar.OptionSetDescription(fmt.Sprintf("(%.2f/100%%)", pct)),
				progressbar.OptionShowBytes(true),
				progressbar.OptionUseIECUnits(true),
				progressbar.OptionSetWidth(30),
				progressbar.OptionThrottle(100*time.Millisecond),
				progressbar.OptionClearOnFinish(),
				progressbar.OptionSetRenderBlankState(true),
			)
		}
		if pct != p.last && (pct-p.last >= 0.01 || pct == 100) {
			p.last = pct
			p.bar.Describe(fmt.Sprintf("(%.2f/100%%)", pct))
		}
		// The bar throttles itself, but always draws the end.
		_ = p.bar.Set64(min(done, total))
		return
	}
	// qemu prints when the progress moved by more than 1%, and at 100%.
	if p.last < 0 || pct-p.last >= 1 || (pct == 100 && p.last != 100) {
		p.last = pct
		fmt.Fprintf(p.w, "    (%.2f/100%%)\r", pct)
	}
}

// finish ends the display: at 100% on success, left where it was on
// failure, so that an error message starts on a clean line.
func (p *progress) finish(ok bool) {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.done {
		return
	}
	p.done = true
	if p.tty {
		if p.bar == nil {
			return
		}
		if ok {
			_ = p.bar.Finish() // clears the line (OptionClearOnFinish)
			return
		}
		_ = p.bar.Exit()
		_ = p.bar.Clear()
		return
	}
	if ok && p.last != 100 {
		fmt.Fprintf(p.w, "    (%.2f/100%%)\r", 100.0)
	}
	fmt.Fprint(p.w, "\n")
}
