package main

import (
	"bytes"
	"context"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestCommit commits a 3-layer chain (base.raw <- mid.vdtest <- top.vdtest)
// and checks the content against the chain flattened before the commit,
// with qemu-img compare on raw copies.
func TestCommit(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		// layers of top's chain afterwards
		layers []string
		// target alone (with its own chain) holds the whole content
		target string
		// the top still holds data
		topKeepsData bool
	}{
		{"into backing", nil, []string{"top.vdtest", "mid.vdtest", "base.raw"}, "mid", false},
		{"-d", []string{"-d"}, []string{"top.vdtest", "mid.vdtest", "base.raw"}, "mid", true},
		{"-b base", []string{"-b", "base.raw"}, []string{"top.vdtest", "mid.vdtest", "base.raw"}, "base", true},
		{"-b mid as recorded", []string{"-b", "mid.vdtest"}, []string{"top.vdtest", "mid.vdtest", "base.raw"}, "mid", true},
		{"-p", []string{"-p"}, []string{"top.vdtest", "mid.vdtest", "base.raw"}, "mid", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newTestChain(t)
			before := flatten(t, c.top, filepath.Join(c.dir, "before.raw"))
			// -b by any path to the file: make it absolute for the base case.
			args := slices.Clone(tc.args)
			for i, a := range args {
				if a == "base.raw" {
					args[i] = c.base
				}
			}
			r := mustRun(t, append(append([]string{"commit"}, args...), c.top)...)
			if r.stdout != "Image committed.\n" {
				t.Errorf("stdout %q", r.stdout)
			}
			if slices.Contains(tc.args, "-p") {
				if !strings.Contains(r.stderr, "(100.00/100%)") {
					t.Errorf("no progress on stderr: %q", r.stderr)
				}
			} else if r.stderr != "" {
				t.Errorf("stderr %q", r.stderr)
			}
			if got := layerNames(t, c.top); !slices.Equal(got, tc.layers) {
				t.Errorf("chain after commit: %v, want %v", got, tc.layers)
			}
			linksConsistent(t, c.top)
			after := flatten(t, c.top, filepath.Join(c.dir, "after.raw"))
			if out, code := runQemu(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", before, after); code != 0 {
				t.Errorf("qemu-img compare before/after the commit: %s", out)
			}
			sameContent(t, c.top, c.wantTop)
			target := c.mid
			if tc.target == "base" {
				target = c.base
				// The raw base alone is comparable by qemu-img directly.
				if out, code := runQemu(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", before, c.base); code != 0 {
					t.Errorf("qemu-img compare of the base with the chain before the commit: %s", out)
				}
			}
			sameContent(t, target, c.wantTop)
			alloc := len(vdtMetaOf(t, c.top).Alloc)
			if tc.topKeepsData && alloc == 0 || !tc.topKeepsData && alloc != 0 {
				t.Errorf("top has %d allocated clusters after the commit (keeps data: %v)", alloc, tc.topKeepsData)
			}
		})
	}
}

func TestCommitErrors(t *testing.T) {
	c := newTestChain(t)
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"commit", "-b", "nosuch.raw", c.top}, 1, "vdisk commit: Did not find 'nosuch.raw' in the backing chain of '" + c.top + "'\n"},
		{[]string{"commit", "-b", c.top, c.top}, 1, "vdisk commit: Did not find '" + c.top + "' in the backing chain of '" + c.top + "'\n"},
		{[]string{"commit", "-f", "raw", c.base}, 1, "vdisk commit: Image does not have a backing file\n"},
		{[]string{"commit", "-t", "bogus", c.top}, 1, "vdisk commit: invalid cache mode \"bogus\" (none, writeback, writethrough, directsync or unsafe)\nTry 'vdisk commit --help' for more information.\n"},
		{[]string{"commit"}, 1, "vdisk commit: expecting one image file name\nTry 'vdisk commit --help' for more information.\n"},
	} {
		t.Run(strings.Join(tc.args[:len(tc.args)-1], " "), func(t *testing.T) {
			r := vdiskRun(t, tc.args...)
			if r.code != tc.code || r.stderr != tc.want || r.stdout != "" {
				t.Errorf("exit %d, stdout %q, stderr %q; want exit %d, stderr %q", r.code, r.stdout, r.stderr, tc.code, tc.want)
			}
		})
	}
	// Interrupted (Ctrl-C before it starts): one line, nothing changed.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for _, args := range [][]string{{"commit", c.top}, {"merge", "--from", "0", "--to", "2", c.top}, {"rebase", "-b", "", c.top}} {
		r := vdiskRunCtx(t, ctx, nil, args...)
		if want := "vdisk " + args[0] + ": interrupted\n"; r.code != 1 || r.stderr != want {
			t.Errorf("%v interrupted: exit %d stderr %q", args, r.code, r.stderr)
		}
	}
	sameContent(t, c.top, c.wantTop)
}

// TestMerge runs VDMerge's directions over the 3-layer chain.
func TestMerge(t *testing.T) {
	for _, tc := range []struct {
		from, to string
		// open is the image whose chain must read the original content
		open   string
		layers []string
		stdout string
	}{
		{"0", "1", "mid.vdtest", []string{"mid.vdtest", "base.raw"},
			"Images merged into '$D/mid.vdtest'.\n'$D/top.vdtest' left the chain (not deleted).\nThe top of the chain is now '$D/mid.vdtest'.\n"},
		{"1", "2", "top.vdtest", []string{"top.vdtest", "base.raw"},
			"Images merged into '$D/base.raw'.\n'$D/mid.vdtest' left the chain (not deleted).\n"},
		{"0", "2", "base.raw", []string{"base.raw"},
			"Images merged into '$D/base.raw'.\n'$D/top.vdtest' left the chain (not deleted).\n'$D/mid.vdtest' left the chain (not deleted).\nThe top of the chain is now '$D/base.raw'.\n"},
		{"2", "1", "top.vdtest", []string{"top.vdtest", "mid.vdtest"},
			"Images merged into '$D/mid.vdtest'.\n'$D/base.raw' left the chain (not deleted).\n"},
		{"1", "0", "top.vdtest", []string{"top.vdtest", "base.raw"},
			"Images merged into '$D/top.vdtest'.\n'$D/mid.vdtest' left the chain (not deleted).\n"},
		{"2", "0", "top.vdtest", []string{"top.vdtest"},
			"Images merged into '$D/top.vdtest'.\n'$D/mid.vdtest' left the chain (not deleted).\n'$D/base.raw' left the chain (not deleted).\n"},
	} {
		t.Run(tc.from+"-"+tc.to, func(t *testing.T) {
			c := newTestChain(t)
			before := flatten(t, c.top, filepath.Join(c.dir, "before.raw"))
			r := mustRun(t, "merge", "--from", tc.from, "--to", tc.to, c.top)
			if want := strings.ReplaceAll(tc.stdout, "$D", c.dir); r.stdout != want {
				t.Errorf("stdout:\n%s\nwant:\n%s", r.stdout, want)
			}
			open := filepath.Join(c.dir, tc.open)
			if got := layerNames(t, open); !slices.Equal(got, tc.layers) {
				t.Errorf("chain of %s: %v, want %v", tc.open, got, tc.layers)
			}
			linksConsistent(t, open)
			after := flatten(t, open, filepath.Join(c.dir, "after.raw"))
			if out, code := runQemu(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", before, after); code != 0 {
				t.Errorf("qemu-img compare before/after the merge: %s", out)
			}
		})
	}
	c := newTestChain(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"merge", "--from", "0", c.top}, "vdisk merge: --from and --to are required\n"},
		{[]string{"merge", "--from", "1", "--to", "1", c.top}, "vdisk merge: --from and --to name the same image: nothing to merge\n"},
		{[]string{"merge", "--from", "0", "--to", "3", c.top}, "vdisk merge: the backing chain of " + c.top + " has 3 images (0..2); --from 0 --to 3 is out of range\n"},
		{[]string{"merge", "--from", "-1", "--to", "1", c.top}, "vdisk merge: --from and --to must not be negative\n"},
	} {
		r := vdiskRun(t, tc.args...)
		want := tc.want + "Try 'vdisk merge --help' for more information.\n"
		if r.code != 1 || r.stderr != want {
			t.Errorf("%v: exit %d, stderr %q, want %q", tc.args, r.code, r.stderr, want)
		}
	}
	sameContent(t, c.top, c.wantTop)
}

// TestRebase: safe mode keeps the content, -u only rewrites the reference;
// a relative backing name is relative to the image's directory.
func TestRebase(t *testing.T) {
	setup := func(t *testing.T) (*testChain, string, []byte) {
		c := newTestChain(t)
		other := filepath.Join(c.dir, "other.raw")
		otherW := map[int64][]byte{0: pattern(0x21, 1<<20), 2 << 20: pattern(0x22, 64<<10)}
		sparseRaw(t, other, chainSize, otherW)
		return c, other, apply(make([]byte, chainSize), otherW, nil)
	}

	t.Run("safe", func(t *testing.T) {
		c, _, _ := setup(t)
		before := flatten(t, c.top, filepath.Join(c.dir, "before.raw"))
		// cwd is the package directory: other.raw is found next to top.
		r := mustRun(t, "rebase", "-b", "other.raw", "-F", "raw", c.top)
		if r.stdout != "" || r.stderr != "" {
			t.Errorf("output %q %q", r.stdout, r.stderr)
		}
		if got := layerNames(t, c.top); !slices.Equal(got, []string{"top.vdtest", "other.raw"}) {
			t.Errorf("chain %v", got)
		}
		if m := vdtMetaOf(t, c.top); m.Backing != "other.raw" || m.BackingFmt != "raw" {
			t.Errorf("recorded backing %q (%q)", m.Backing, m.BackingFmt)
		}
		after := flatten(t, c.top, filepath.Join(c.dir, "after.raw"))
		if out, code := runQemu(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", before, after); code != 0 {
			t.Errorf("safe rebase changed the content: %s", out)
		}
	})
	t.Run("unsafe", func(t *testing.T) {
		c, _, otherData := setup(t)
		want := overlay(t, c, otherData)
		mustRun(t, "rebase", "-u", "-b", "other.raw", "-F", "raw", c.top)
		sameContent(t, c.top, want)
	})
	t.Run("standalone safe", func(t *testing.T) {
		c, _, _ := setup(t)
		mustRun(t, "rebase", "-p", "-b", "", c.top)
		if got := layerNames(t, c.top); !slices.Equal(got, []string{"top.vdtest"}) {
			t.Errorf("chain %v", got)
		}
		sameContent(t, c.top, c.wantTop)
		if r := mustRun(t, "info", "--output", "json", c.top); strings.Contains(r.stdout, "backing-filename") {
			t.Errorf("still has a backing file:\n%s", r.stdout)
		}
	})
	t.Run("standalone unsafe", func(t *testing.T) {
		c, _, _ := setup(t)
		want := overlay(t, c, make([]byte, chainSize))
		mustRun(t, "rebase", "-u", c.top)
		sameContent(t, c.top, want)
	})
	t.Run("unsafe onto a missing file", func(t *testing.T) {
		c, _, _ := setup(t)
		r := mustRun(t, "rebase", "-u", "-b", "later.vdtest", "-F", "vdtest", c.top)
		if !strings.HasPrefix(r.stderr, "vdisk rebase: warning: the new backing file does not exist") {
			t.Errorf("stderr %q", r.stderr)
		}
		if m := vdtMetaOf(t, c.top); m.Backing != "later.vdtest" {
			t.Errorf("recorded backing %q", m.Backing)
		}
	})
	t.Run("errors", func(t *testing.T) {
		c, _, _ := setup(t)
		for _, tc := range []struct {
			args []string
			want string
		}{
			{[]string{"rebase", c.top}, "vdisk rebase: Must specify backing file (-b) or use unsafe mode (-u)\nTry 'vdisk rebase --help' for more information.\n"},
			{[]string{"rebase", "-F", "raw", c.top}, "vdisk rebase: Must specify backing file (-b) or use unsafe mode (-u)\nTry 'vdisk rebase --help' for more information.\n"},
			{[]string{"rebase", "-b", "base.raw", "-f", "raw", c.base}, "vdisk rebase: " + c.base + ": format raw cannot record a backing file (unsupported)\n"},
			{[]string{"rebase", "-b", "nosuch.raw", "-F", "raw", c.top}, ""},
			{[]string{"rebase", "-u", "-b", "nosuch.raw", c.top}, ""},
			{[]string{"rebase", "-b", "other.raw", "-F", "nosuch", c.top}, ""},
		} {
			r := vdiskRun(t, tc.args...)
			if tc.want != "" && r.stderr != tc.want {
				t.Errorf("%v: stderr %q, want %q", tc.args, r.stderr, tc.want)
			}
			if tc.want == "" {
				oneErrorLine(t, r, "vdisk rebase")
			}
			if r.code != 1 {
				t.Errorf("%v: exit %d", tc.args, r.code)
			}
		}
		sameContent(t, c.top, c.wantTop)
	})
}

// overlay is what the top of c reads over a backing reading below: the
// top's own data wherever it holds a cluster (the test format allocates
// whole 64 KiB clusters, zeros included), below elsewhere.
func overlay(t *testing.T, c *testChain, below []byte) []byte {
	t.Helper()
	out := bytes.Clone(below)
	own := content(t, c.top)
	for _, cl := range vdtMetaOf(t, c.top).Alloc {
		off := cl * vdtCluster
		end := min(off+vdtCluster, int64(len(out)))
		copy(out[off:end], own[off:end])
	}
	return out
}
