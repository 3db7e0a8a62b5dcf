package main

import (
	"path/filepath"
	"strings"
	"testing"
)

// TestImageOpts: --image-opts takes qemu's option strings (driver=,
// file.filename=, open options with hyphens) for info, convert and map,
// and refuses what qemu-img refuses.
func TestImageOpts(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "x.qcow2")
	mustQemu(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "8M")
	mustQemu(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x61 1M 1M", img)
	spec := "driver=qcow2,file.filename=" + img + ",l2-cache-size=64k,cache.direct=off"

	r := mustRun(t, "info", "--image-opts", spec)
	want, _ := runQemu(t, "qemu-img", "info", "--image-opts", "driver=qcow2,file.filename="+img)
	if r.stdout != want {
		t.Errorf("info --image-opts:\n%s\nqemu-img:\n%s", r.stdout, want)
	}
	out := filepath.Join(dir, "out.raw")
	mustRun(t, "convert", "--image-opts", "-O", "raw", spec, out)
	if msg, code := runQemu(t, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, out); code != 0 {
		t.Errorf("convert --image-opts: %s", msg)
	}
	m := mustRun(t, "map", "--output", "json", "--image-opts", "file.filename="+img)
	if !strings.Contains(m.stdout, `"start": 1048576, "length": 1048576`) {
		t.Errorf("map --image-opts: %s", m.stdout)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"info", "-f", "qcow2", "--image-opts", "file.filename=" + img}, "mutually exclusive"},
		{[]string{"info", "--image-opts", "driver=qcow2"}, "names no file"},
		{[]string{"info", "--image-opts", "driver=qcow2,file.filename=" + img + ",bogus=1"}, `no option "bogus"`},
		{[]string{"info", "--image-opts", "file.filename=" + img + ",l2-cache-size=1M"}, "need driver="},
		{[]string{"info", "--image-opts", "driver=qcow2,file.driver=nbd,file.filename=" + img}, "takes a nbd:// URL"},
		{[]string{"info", "--image-opts", "driver=qcow2,file.driver=gluster,file.filename=" + img}, "file.driver=gluster is not supported"},
		{[]string{"info", "--image-opts", "driver=nbd,export=x"}, "needs server.host="},
		{[]string{"info", "--image-opts", "driver=nbd,server.type=unix"}, "needs server.path="},
		{[]string{"info", "--image-opts", "driver=nbd,server.host=127.0.0.1,bogus=1"}, `no key "bogus"`},
		{[]string{"info", "--image-opts", "driver=iscsi,portal=127.0.0.1,target=iqn.x,password=pw"}, "password-secret=ID"},
		{[]string{"info", "--image-opts", "driver=iscsi,target=iqn.x"}, "needs portal="},
		// The storage options reach the storage, which checks them.
		{[]string{"info", "--image-opts", "driver=nbd,server.host=127.0.0.1,open-retry=soon"}, `open-retry="soon"`},
		{[]string{"info", "--image-opts", "driver=nbd,server.host=127.0.0.1,allocation-depth=maybe"}, `allocation-depth="maybe"`},
		{[]string{"info", "--image-opts", "driver=nbd,server.host=127.0.0.1,reconnect-delay=-1"}, `reconnect-delay="-1"`},
		{[]string{"info", "--image-opts", "driver=raw,file.driver=nbd,file.filename=nbd://127.0.0.1/x,file.open-timeout=x"}, `open-timeout="x"`},
		{[]string{"info", "--image-opts", "driver=iscsi,portal=127.0.0.1,target=iqn.x,open-retry=soon"}, `open-retry="soon"`},
	} {
		r := vdiskRun(t, tc.args...)
		oneErrorLine(t, r, "vdisk "+tc.args[0])
		if r.code != 1 || !strings.Contains(r.stderr, tc.want) {
			t.Errorf("%v: exit %d, %q lacks %q", tc.args, r.code, r.stderr, tc.want)
		}
	}
}
