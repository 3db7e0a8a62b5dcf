package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vdisk/vdisk/nbd"
)

// TestServeFork builds vdisk and runs `serve --fork --pid-file`: the
// command returns (its output closed) once the server listens, the server
// in the background serves the image under the PID of the pid file, and
// SIGTERM stops it and removes the pid file. A server that cannot start
// makes the command fail with the child's error.
func TestServeFork(t *testing.T) {
	dir := t.TempDir()
	bin := buildVdisk(t, dir)
	img := filepath.Join(dir, "a.raw")
	data := pattern(0x5a, 4<<20)
	if err := os.WriteFile(img, data, 0o644); err != nil {
		t.Fatal(err)
	}
	sock := sockPath(t)
	pidFile := filepath.Join(dir, "pid")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// CombinedOutput returns only once every holder of the output pipe
	// has closed it: the background server must have let go of it.
	out, err := exec.CommandContext(ctx, bin, "serve", "--fork", "--pid-file", pidFile, "-t", "-k", sock, "-f", "raw", img).CombinedOutput()
	if err != nil {
		t.Fatalf("serve --fork: %v\n%s", err, out)
	}
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatalf("no pid file once serve --fork returned: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		t.Fatalf("pid file holds %q", b)
	}
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	c, err := nbd.Dial(ctx, "unix", sock, nil)
	if err != nil {
		t.Fatalf("the background server does not answer: %v", err)
	}
	got := make([]byte, len(data))
	if _, err := c.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read through the background server: %v (data equal: %v)", err, bytes.Equal(got, data))
	}
	c.Close()
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		t.Fatalf("the pid file's process: %v", err)
	}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		gone := errors.Is(syscall.Kill(pid, 0), syscall.ESRCH)
		if _, err := os.Stat(pidFile); gone && os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after SIGTERM: process gone %v, pid file still there: %v", gone, err == nil)
		}
	}

	out, err = exec.CommandContext(ctx, bin, "serve", "--fork", "-k", sockPath(t), "-f", "raw", filepath.Join(dir, "missing.raw")).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "missing.raw") || !strings.Contains(string(out), "did not start") {
		t.Fatalf("serve --fork of a missing image: %v\n%s", err, out)
	}
}
