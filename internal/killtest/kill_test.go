package killtest

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"

	_ "github.com/vdisk/vdisk/format/all"
)

// childEnv, when set, makes the test binary the child that writes under
// load until it is killed (see child).
const childEnv = "VDISK_KILLTEST_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(child())
	}
	os.Exit(m.Run())
}

// child opens the image named by the environment read-write and runs the
// load with 4 workers (as a server with several requests in flight would),
// logging to the file the parent reads, until it is killed. It gives up
// after a while, so that a parent gone astray leaves no writer running.
func child() int {
	env := func(k string) string { return os.Getenv("KILLTEST_" + k) }
	num := func(k string) int64 {
		v, _ := strconv.ParseInt(env(k), 10, 64)
		return v
	}
	fail := func(format string, args ...any) int {
		fmt.Fprintf(os.Stderr, "killtest child: "+format+"\n", args...)
		return 3
	}
	f, err := driver.Lookup(env("FORMAT"))
	if err != nil {
		return fail("%v", err)
	}
	logf, err := os.OpenFile(env("LOG"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return fail("%v", err)
	}
	d, err := vdisk.Open(ctx, env("IMAGE"), &vdisk.OpenOptions{Format: f.Name})
	if err != nil {
		return fail("open: %v", err)
	}
	time.AfterFunc(30*time.Second, func() { os.Exit(4) })
	cfg := loadConfig{seed: uint64(num("SEED")), idBase: num("IDBASE"), workers: 4, maxSize: num("MAXSIZE")}
	cfg.caps(f)
	if err := runLoad(d, cfg, &opLog{w: logf}); err != nil {
		return fail("%v", err)
	}
	return 0
}

// iterations is the number of kills per format: 50, or 500 with VDISK_LONG=1.
func iterations() int {
	if os.Getenv("VDISK_LONG") != "" {
		return 500
	}
	return 50
}

const (
	killSize    = 8 << 20
	killMaxSize = 12 << 20
)

// TestKill: a child writes through the library under random load
// (allocating writes, zeroes, discards, resizes, flushes) and is killed
// with SIGKILL at a random moment, again and again on the same image;
// after every kill the image must pass qemu-img check and vdisk's Check
// (which agree), or carry the format's dirty flag that an open repairs,
// and every write flushed before the kill must read back.
func TestKill(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	for _, r := range rows {
		t.Run(r.name, func(t *testing.T) {
			t.Parallel()
			killRow(t, r, iterations())
		})
	}
}

func killRow(t *testing.T, r row, iters int) {
	dir := t.TempDir()
	path := filepath.Join(dir, "disk.img")
	d, err := vdisk.Create(ctx, path, &vdisk.CreateOptions{Format: r.format, Size: killSize, Options: disktest.KVs(r.opts)})
	if err != nil {
		t.Fatal(err)
	}
	disktest.MustClose(t, d)
	m := newModel(make([]byte, killSize))
	rng := rand.New(rand.NewPCG(uint64(len(r.name)), 21))
	var st tally
	var ops int
	for i := range iters {
		logPath := filepath.Join(dir, "ops.log")
		os.Remove(logPath)
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), childEnv+"=1",
			"KILLTEST_FORMAT="+r.format, "KILLTEST_IMAGE="+path, "KILLTEST_LOG="+logPath,
			"KILLTEST_SEED="+strconv.Itoa(rng.Int()), "KILLTEST_IDBASE="+strconv.Itoa((i+1)<<32),
			"KILLTEST_MAXSIZE="+strconv.Itoa(killMaxSize))
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		if rng.IntN(10) == 0 {
			// Now and then anywhere from the start: in the open too.
			time.Sleep(time.Duration(rng.IntN(30)) * time.Millisecond)
		} else {
			// Once the load runs, at a random moment of it.
			deadline := time.Now().Add(20 * time.Second)
			for {
				if fi, err := os.Stat(logPath); err == nil && fi.Size() > 0 {
					break
				}
				if time.Now().After(deadline) {
					cmd.Process.Kill()
					t.Fatalf("run %d: the child wrote nothing in 20s: %s", i, stderr.String())
				}
				time.Sleep(time.Millisecond)
			}
			time.Sleep(time.Duration(rng.IntN(100_000)) * time.Microsecond)
		}
		cmd.Process.Signal(syscall.SIGKILL)
		err := <-exited
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			t.Fatalf("run %d: the child ended before the kill (%v): %s", i, err, stderr.String())
		}
		text, err := os.ReadFile(logPath)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		ops += bytes.Count(text, []byte("\nE "))
		if err := m.apply(text); err != nil {
			t.Fatalf("run %d: %v", i, err)
		}
		if err := judgeImage(t, r, path, &st); err != nil {
			keep(t, path, i)
			t.Fatalf("run %d: %v", i, err)
		}
		got, err := readImage(r, path)
		if err != nil {
			t.Fatalf("run %d: %v", i, err)
		}
		if err := m.verify(got); err != nil {
			keep(t, path, i)
			t.Fatalf("run %d: %v", i, err)
		}
		m = newModel(got)
	}
	t.Logf("%s: %d kills, %d operations finished: %v", r.name, iters, ops, st)
}

// keep copies a failing image where it survives the test's cleanup.
func keep(t testing.TB, path string, run int) {
	data, err := os.ReadFile(path)
	if err != nil {
		return
	}
	dst := filepath.Join(os.TempDir(), fmt.Sprintf("killtest-%s-%d.img", filepath.Base(filepath.Dir(path)), run))
	if os.WriteFile(dst, data, 0o644) == nil {
		t.Logf("the image is kept as %s", dst)
	}
}
