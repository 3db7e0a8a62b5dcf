// Package xfstest mounts a small XFS file system with reflinks on a loop
// device, for tests of what only such file systems do: the shared-block
// copies (FICLONERANGE, and copy_file_range's clones) that ext4, where
// the tests otherwise run, does not have.
//
// The test script installs xfsprogs, so a missing mkfs.xfs fails the test.
// A machine that cannot mount at all (not root, no loop devices: an
// unprivileged container) skips it, saying why.
package xfstest

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vdisk/vdisk/internal/qemutest"
)

// Size is the size of the file system (its image file is sparse: a few
// megabytes of metadata until the test writes).
const Size = 2 << 30

// Dir returns the root of a new XFS file system with reflinks on, mounted
// for the test and unmounted (its image removed) when the test ends. The
// test must have closed its files in it by then.
func Dir(t testing.TB) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a loop file system needs root")
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		t.Skipf("no loop devices here: %v", err)
	}
	if _, err := exec.LookPath("mkfs.xfs"); err != nil {
		t.Fatal("mkfs.xfs not found: run ./test.sh, which installs xfsprogs")
	}
	img := filepath.Join(t.TempDir(), "xfs.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	err = f.Truncate(Size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	qemutest.Run(t, "mkfs.xfs", "-q", "-f", "-m", "reflink=1", img)
	mnt := t.TempDir()
	out, err := exec.Command("mount", "-o", "loop", img, mnt).CombinedOutput()
	if err != nil {
		msg := strings.ToLower(string(out))
		for _, s := range []string{"permission denied", "operation not permitted", "only root", "failed to setup loop", "unused loop device"} {
			if strings.Contains(msg, s) {
				t.Skipf("this machine cannot mount a loop file system: %s", bytes.TrimSpace(out))
			}
		}
		t.Fatalf("mount -o loop %s: %v\n%s", img, err, out)
	}
	t.Cleanup(func() {
		// The kernel may still hold the file system a moment after the
		// last close (a process of the test ending).
		var out []byte
		var err error
		for try := 0; try < 50; try++ {
			if out, err = exec.Command("umount", mnt).CombinedOutput(); err == nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		exec.Command("umount", "-l", mnt).Run()
		t.Errorf("umount %s: %v\n%s", mnt, err, out)
	})
	return mnt
}

// Used is what the file system holding dir has allocated, by the kernel's
// own count (statfs, after a sync): a clone of a range costs it next to
// nothing, a copy the range's size.
func Used(t testing.TB, dir string) int64 {
	t.Helper()
	unix.Sync()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize
}
