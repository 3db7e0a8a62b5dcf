// Package iscsitest starts a real tgtd (Linux SCSI target framework, the
// tgt package) on loopback for tests: each target gets its own portal port
// and control number, so parallel test binaries do not collide.
package iscsitest

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Require fails the test when tgtd or tgtadm is missing under CI and skips
// on a development machine without them.
func Require(t testing.TB, tools ...string) {
	t.Helper()
	tools = append([]string{"tgtd", "tgtadm"}, tools...)
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") != "" {
				t.Fatalf("%s not found: run ./test.sh, which installs tgt, libiscsi-bin and qemu-block-extra", tool)
			}
			t.Skipf("%s not found (apt-get install tgt libiscsi-bin)", tool)
		}
	}
}

// Target is a running tgtd with one target.
type Target struct {
	t       testing.TB
	Portal  string // 127.0.0.1:PORT
	IQN     string
	Control int
	Dir     string
	cmd     *exec.Cmd
	luns    int
}

// Start starts tgtd and creates target IQN (tid 1), bound to all
// initiators.
func Start(t testing.TB, iqn string) *Target {
	t.Helper()
	return StartAt(t, iqn, "127.0.0.1")
}

// StartAt is Start with the portal on another loopback address (such as
// 127.0.0.2: tgtd redirects only to an address other than the portal's).
func StartAt(t testing.TB, iqn, host string) *Target {
	t.Helper()
	Require(t)
	dir := t.TempDir()
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		tg := &Target{t: t, Portal: net.JoinHostPort(host, strconv.Itoa(port)), IQN: iqn, Control: 1000 + rand.IntN(19000), Dir: dir}
		if lastErr = tg.start(tg.Portal); lastErr == nil {
			t.Cleanup(tg.Kill)
			tg.Adm("--op", "new", "--mode", "target", "--tid", "1", "-T", iqn)
			tg.Adm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
			return tg
		}
	}
	t.Fatalf("tgtd did not start: %v", lastErr)
	return nil
}

// start starts tgtd listening on portal and waits until it answers there.
func (tg *Target) start(portal string) error {
	log, err := os.Create(filepath.Join(tg.Dir, "tgtd-"+strconv.Itoa(tg.Control)+".log"))
	if err != nil {
		return err
	}
	cmd := exec.Command("tgtd", "-f", "--iscsi", "portal="+portal, "-C", strconv.Itoa(tg.Control))
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		log.Close()
		return err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait(); log.Close() }()
	tg.cmd = cmd
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case err := <-exited:
			b, _ := os.ReadFile(log.Name())
			return fmt.Errorf("tgtd exited: %v\n%s", err, b)
		default:
		}
		if out, err := exec.Command("tgtadm", "-C", strconv.Itoa(tg.Control), "--op", "show", "--mode", "sys").CombinedOutput(); err == nil && len(out) > 0 {
			if c, err := net.DialTimeout("tcp", portal, time.Second); err == nil {
				c.Close()
				tg.cmd = cmd
				// Reap in the background; Kill waits through the channel.
				go func() { <-exited }()
				return nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	return fmt.Errorf("tgtd on %s did not become ready", portal)
}

// Kill stops tgtd (its whole process group) at once.
func (tg *Target) Kill() {
	if tg.cmd == nil || tg.cmd.Process == nil {
		return
	}
	syscall.Kill(-tg.cmd.Process.Pid, syscall.SIGKILL)
	for i := 0; i < 200; i++ {
		if syscall.Kill(tg.cmd.Process.Pid, 0) != nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	tg.cmd = nil
}

// Restart starts tgtd again with the same target and LUNs re-created from
// their backing files (the caller re-adds accounts). tgtd starts on a
// scratch portal and takes the old one only once the target and its LUNs
// exist, so an initiator retrying meanwhile never logs in to a half-made
// target.
func (tg *Target) Restart(luns map[int]string, thin bool) {
	tg.t.Helper()
	tg.Kill()
	host, _, _ := net.SplitHostPort(tg.Portal)
	var err error
	for i := 0; i < 5; i++ {
		var l net.Listener
		if l, err = net.Listen("tcp", net.JoinHostPort(host, "0")); err != nil {
			tg.t.Fatal(err)
		}
		scratch := l.Addr().String()
		l.Close()
		if err = tg.start(scratch); err == nil {
			break
		}
	}
	if err != nil {
		tg.t.Fatalf("restart tgtd: %v", err)
	}
	tg.Adm("--op", "new", "--mode", "target", "--tid", "1", "-T", tg.IQN)
	tg.Adm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
	for lun, file := range luns {
		tg.addLUN(lun, file, thin)
	}
	show := tg.Adm("--op", "show", "--mode", "portal")
	// The old portal's port may still be held a moment by the killed
	// tgtd's sockets.
	full := []string{"-C", strconv.Itoa(tg.Control), "--lld", "iscsi", "--op", "new", "--mode", "portal", "--param", "portal=" + tg.Portal}
	var out []byte
	for i := 0; i < 50; i++ {
		if out, err = exec.Command("tgtadm", full...).CombinedOutput(); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		tg.t.Fatalf("tgtadm %s: %v\n%s", strings.Join(full, " "), err, out)
	}
	for _, line := range strings.Split(show, "\n") {
		if p, ok := strings.CutPrefix(strings.TrimSpace(line), "Portal: "); ok {
			p, _, _ = strings.Cut(p, ",")
			tg.Adm("--op", "delete", "--mode", "portal", "--param", "portal="+p)
		}
	}
}

// Adm runs tgtadm against this tgtd with --lld iscsi.
func (tg *Target) Adm(args ...string) string {
	tg.t.Helper()
	full := append([]string{"-C", strconv.Itoa(tg.Control), "--lld", "iscsi"}, args...)
	out, err := exec.Command("tgtadm", full...).CombinedOutput()
	if err != nil {
		tg.t.Fatalf("tgtadm %s: %v\n%s", strings.Join(full, " "), err, out)
	}
	return string(out)
}

// AddLUN creates a LUN backed by a new sparse file of size bytes and
// returns the file's path. thin turns on thin provisioning (UNMAP, GET LBA
// STATUS backed by the file's holes).
func (tg *Target) AddLUN(lun int, size int64, thin bool) string {
	tg.t.Helper()
	file := filepath.Join(tg.Dir, fmt.Sprintf("lun%d.img", lun))
	f, err := os.Create(file)
	if err != nil {
		tg.t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		tg.t.Fatal(err)
	}
	f.Close()
	tg.addLUN(lun, file, thin)
	return file
}

func (tg *Target) addLUN(lun int, file string, thin bool) {
	tg.Adm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", strconv.Itoa(lun), "--backing-store", file)
	if thin {
		tg.Adm("--op", "update", "--mode", "logicalunit", "--tid", "1", "--lun", strconv.Itoa(lun), "--params", "thin_provisioning=1")
	}
}

// AddAccount creates a CHAP account and binds it to the target; outgoing
// makes it the target's own identity for mutual CHAP.
func (tg *Target) AddAccount(user, password string, outgoing bool) {
	tg.t.Helper()
	tg.Adm("--op", "new", "--mode", "account", "--user", user, "--password", password)
	args := []string{"--op", "bind", "--mode", "account", "--tid", "1", "--user", user}
	if outgoing {
		args = append(args, "--outgoing")
	}
	tg.Adm(args...)
}

// Redirect makes the target answer logins with a redirection to portal
// (host:port, on another address than its own) of the given reason
// ("Temporary" or "Permanent"); an empty portal stops it.
func (tg *Target) Redirect(portal, reason string) {
	tg.t.Helper()
	if portal == "" {
		// tgtd redirects while RedirectAddress is not empty.
		tg.Adm("--mode", "target", "--op", "update", "--tid", "1", "--name", "RedirectAddress", "--value", "")
		return
	}
	host, port, err := net.SplitHostPort(portal)
	if err != nil {
		tg.t.Fatal(err)
	}
	for _, kv := range [][2]string{{"RedirectAddress", host}, {"RedirectPort", port}, {"RedirectReason", reason}} {
		tg.Adm("--mode", "target", "--op", "update", "--tid", "1", "--name", kv[0], "--value", kv[1])
	}
}

// URL is the iscsi:// name of a LUN.
func (tg *Target) URL(lun int) string {
	return fmt.Sprintf("iscsi://%s/%s/%d", tg.Portal, tg.IQN, lun)
}
