package vhdx

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/faultfs"
	"github.com/vdisk/vdisk/storage/osfs"
)

// blkdebugFail is qemu-io's image spec for f with writes at byte offset
// off failing once: qemu has written its log entry and flushed it when
// the in-place write of the metadata it covers fails, so the file keeps
// a log that needs replaying.
func blkdebugFail(f string, off int64) string {
	return fmt.Sprintf(`json:{"driver":"vhdx","file":{"driver":"blkdebug","inject-error":[{"event":"pwritev","sector":%d,"once":true}],"image":{"driver":"file","filename":%q}}}`, off/512, f)
}

// TestReadsQemuLogs: images whose log qemu left non-empty (the BAT
// write after a logged allocation failed) read, in vdisk, what qemu reads
// after replaying: read-only through the in-memory replay (the file is
// untouched), read-write after replaying into the file, which qemu-img
// check then finds clean.
func TestReadsQemuLogs(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	for _, c := range []struct {
		name, size, opts string
		batOff           int64
		pre, cmd         string
		replays          bool
	}{
		{"first-block", "8M", "block_size=1M", 2 * mib, "", "write -P 0x33 0 64k", true},
		{"later-block", "40M", "block_size=8M", 2 * mib, "write -P 0x44 9M 1M", "write -P 0x55 30M 100k", false},
		{"log-2M", "8M", "block_size=1M,log_size=2M", 3 * mib, "write -P 0x44 0 4k", "write -P 0x66 5M 8k", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := filepath.Join(dir, c.name+".vhdx")
			qemutest.Create(t, "vhdx", f, c.size, c.opts)
			if c.pre != "" {
				qemutest.IO(t, "vhdx", f, c.pre)
			}
			out, code, err := qemutest.RunCode("qemu-io", "-c", c.cmd, blkdebugFail(f, c.batOff))
			if err != nil || code == 0 {
				t.Fatalf("qemu-io with an injected BAT write error: exit %d %v: %s", code, err, out)
			}
			before, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			if string(before[mib:mib+4]) != "loge" {
				t.Fatal("qemu left no log entry")
			}
			// qemu's view: replay on a copy.
			cp := f + ".copy"
			os.WriteFile(cp, before, 0o644)
			qemutest.Run(t, "qemu-io", "-f", "vhdx", "-c", "flush", cp)
			qemutest.Check(t, "vhdx", cp)
			want := qemutest.Raw(t, "vhdx", cp)

			d, err := vdisk.Open(ctx, f, &vdisk.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			// qemu 7.2 writes an entry with a log GUID other than the
			// header's when the allocation is the session's first
			// metadata change after an earlier session: by the
			// specification (and in qemu's own replay) that entry is not
			// part of the log, and the allocation is lost.
			if replayed := topImage(d).replayedInMemory; replayed != c.replays || d.Top().Info().Dirty != replayed {
				t.Fatalf("replayed in memory: %v, want %v", replayed, c.replays)
			}
			if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
				t.Fatal("vdisk's in-memory replay reads differently from qemu's replay")
			}
			disktest.MustClose(t, d)
			if after, _ := os.ReadFile(f); !bytes.Equal(after, before) {
				t.Fatal("a read-only open changed the file")
			}
			d, err = vdisk.Open(ctx, f, &vdisk.OpenOptions{Storage: osfs.New()})
			if err != nil {
				t.Fatal(err)
			}
			if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
				t.Fatal("vdisk's replay into the file reads differently from qemu's")
			}
			disktest.MustClose(t, d)
			qemutest.Check(t, "vhdx", f)
			if !qemutest.Compare(t, "vhdx", f, "vhdx", cp) {
				t.Fatal("qemu-img compare: vdisk's replay differs from qemu's")
			}
		})
	}
}

// TestLargeLog: a log larger than 256 MiB (qemu makes them; vdisk once
// refused to replay them) is searched and applied from the file a window
// at a time. vdisk writes into a qemu-made image with a 260 MiB log and
// is killed after each write in turn until a kill leaves its log entry
// pending: the read-only open replays in memory, qemu replays the same,
// and vdisk's read-write replay reads the same.
func TestLargeLog(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "big-log.vhdx")
	qemutest.Create(t, "vhdx", src, "8M", "block_size=1M,log_size=260M")
	fs := osfs.New()
	f := filepath.Join(dir, "img.vhdx")
	phase := func(arm func(*faultfs.FS)) int {
		qemutest.Run(t, "cp", "--sparse=always", src, f)
		ffs := faultfs.New(fs)
		d, err := vdisk.Open(ctx, f, &vdisk.OpenOptions{Storage: ffs})
		if err != nil {
			t.Fatal(err)
		}
		arm(ffs)
		d.WriteAt(disktest.Fill(64<<10, 0x77), 2<<20)
		d.Flush()
		d.Close()
		return ffs.Writes()
	}
	total := phase(func(ffs *faultfs.FS) { ffs.Reset() })
	want := make([]byte, 8<<20)
	copy(want[2<<20:], disktest.Fill(64<<10, 0x77))
	for k := 1; k <= total; k++ {
		phase(func(ffs *faultfs.FS) { ffs.KillAfterWrites(k) })
		d := openVHDX(t, fs, f, true)
		if !topImage(d).replayedInMemory {
			disktest.MustClose(t, d)
			continue
		}
		ours := disktest.ReadAll(t, d)
		disktest.MustClose(t, d)
		if !bytes.Equal(ours, want) {
			t.Fatalf("kill after write %d: the in-memory replay reads differently", k)
		}
		cp := f + ".copy"
		qemutest.Run(t, "cp", "--sparse=always", f, cp)
		qemuReplayCheck(t, cp, fmt.Sprint("kill after write ", k))
		oursRaw := f + ".raw"
		os.WriteFile(oursRaw, ours, 0o644)
		if !qemutest.Compare(t, "vhdx", cp, "raw", oursRaw) {
			t.Fatal("qemu's replay reads differently")
		}
		d = openVHDX(t, fs, f, false)
		if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
			t.Fatal("vdisk's read-write replay reads differently")
		}
		disktest.MustClose(t, d)
		return
	}
	t.Fatalf("no kill point among %d writes left a log to replay", total)
}
