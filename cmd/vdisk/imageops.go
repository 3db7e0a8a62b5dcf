package main

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

// Helpers shared by the image-operation commands (commit, merge, rebase,
// resize, check, snapshot, ...).

// openRW opens name read-write (only the top is written), following parent
// references wherever they point, as qemu-img does.
func (a *app) openRW(name, format string, noBacking bool) (*vdisk.Disk, error) {
	return a.open(name, vdisk.OpenOptions{
		Format:    format,
		NoBacking: noBacking,
		Paths:     a.policy(),
	})
}

// openTopInfo opens only the top image, read-only, for reading metadata.
func (a *app) openTopInfo(name, format string) (*vdisk.Disk, error) {
	return a.open(name, vdisk.OpenOptions{
		Format:    format,
		InfoOnly:  true,
		NoBacking: true,
		Paths:     a.policy(),
	})
}

// checkFormat validates a -f argument before any file is touched.
func checkFormat(name string) error {
	if name == "" {
		return nil
	}
	_, err := driver.Lookup(name)
	return err
}

// checkCacheMode validates a -t argument (accepted for compatibility).
func checkCacheMode(s string) error {
	switch s {
	case "", "none", "writeback", "writethrough", "directsync", "unsafe":
		return nil
	}
	return usageErrorf("invalid cache mode %q (none, writeback, writethrough, directsync or unsafe)", s)
}

// sameFile reports whether the names a and b are the same file.
func sameFile(a, b string) bool {
	if a == b {
		return true
	}
	fa, err := os.Stat(a)
	if err != nil {
		return false
	}
	fb, err := os.Stat(b)
	if err != nil {
		return false
	}
	return os.SameFile(fa, fb)
}

// findLayer returns the depth (>= 1) of the layer of the chain (top first)
// that ref names, or -1. ref matches a layer when it is the reference the
// layer's child records, or when it names the same file, taken relative to
// the current directory or to the directory of any image of the chain
// (qemu's rule for backing file names).
func findLayer(layers []*vdisk.Layer, ref string) int {
	for i := 1; i < len(layers); i++ {
		if p := layers[i-1].ParentRef(); p != nil && p.Name == ref {
			return i
		}
	}
	candidates := []string{ref}
	if !filepath.IsAbs(ref) {
		for _, l := range layers {
			candidates = append(candidates, filepath.Join(filepath.Dir(l.Name), ref))
		}
	}
	for i := 1; i < len(layers); i++ {
		for _, c := range candidates {
			if sameFile(c, layers[i].Name) {
				return i
			}
		}
	}
	return -1
}

// addQuietFlag declares -q.
func addQuietFlag(cmd *cobra.Command, p *bool) {
	cmd.Flags().BoolVarP(p, "quiet", "q", false, "print nothing but errors")
}

// addProgressFlag declares -p.
func addProgressFlag(cmd *cobra.Command, p *bool) {
	cmd.Flags().BoolVarP(p, "progress", "p", false, "show progress")
}

// say prints a qemu-img style message on stdout unless quiet.
func (a *app) say(quiet bool, format string, args ...any) {
	if !quiet {
		fmt.Fprintf(a.stdout, format, args...)
	}
}

// resetLogger rebuilds the logger after a command parsed its own flags
// (resize parses them itself, so --debug is known only then).
func (a *app) resetLogger() {
	level := slog.LevelWarn
	if a.debug {
		level = slog.LevelDebug
	}
	a.log = slog.New(newLineHandler(a.stderr, a.name, level))
}
