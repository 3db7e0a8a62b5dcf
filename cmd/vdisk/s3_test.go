package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vdisk/vdisk/storage/s3/s3test"
)

// TestS3Flows runs issue 19's flows through the command line against a
// real S3 server (versitygw on loopback): convert a local disk to a
// compressed qcow2 object, info on it, a local overlay created on it,
// served under the strict path policy with a block cache (refused without
// --allow-backing-scheme s3; a warm cache fetches no object data), writes
// through NBD landing in the overlay, commit of a local snapshot staying
// local while the object never changes, and --image-opts cache=FILE.
func TestS3Flows(t *testing.T) {
	qemu(t, "qemu-img")
	qemu(t, "qemu-io")
	srv := s3test.Start(t, "images")
	srv.Setenv(t)
	dir := t.TempDir()
	disk := filepath.Join(dir, "disk.raw")
	sparseRaw(t, disk, 8<<20, map[int64][]byte{0: pattern(0x11, 64<<10), 3 << 20: pattern(0x22, 1<<20), 7<<20 + 512: pattern(0x33, 4096)})

	// vdisk convert -O qcow2 -c disk.raw s3://images/base.qcow2
	const base = "s3://images/base.qcow2"
	mustRun(t, "convert", "-O", "qcow2", "-c", disk, base)
	if up := srv.Uploads("images"); len(up) != 0 {
		t.Fatalf("uploads left behind: %v", up)
	}
	got := filepath.Join(dir, "got.qcow2")
	srv.Download("images", "base.qcow2", got)
	if out, code := runQemu(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", disk, got); code != 0 {
		t.Fatalf("qemu-img compare of the uploaded base: %s", out)
	}
	// Converting over an existing object replaces it (objects cannot be
	// changed in place): raw, and qcow2 over the raw one.
	for _, format := range []string{"raw", "qcow2"} {
		mustRun(t, "convert", "-O", format, disk, "s3://images/again.img")
		again := filepath.Join(dir, "again."+format)
		srv.Download("images", "again.img", again)
		if out, code := runQemu(t, "qemu-img", "compare", "-f", "raw", "-F", format, disk, again); code != 0 {
			t.Fatalf("qemu-img compare of the %s converted over an existing object: %s", format, out)
		}
	}
	before, err := srv.Stat("images", "base.qcow2")
	if err != nil {
		t.Fatal(err)
	}

	// vdisk info s3://images/base.qcow2
	r := mustRun(t, "info", base)
	if !strings.Contains(r.stdout, "file format: qcow2") || !strings.Contains(r.stdout, "virtual size: 8 MiB") {
		t.Errorf("info %s:\n%s", base, r.stdout)
	}
	r = mustRun(t, "info", "--output", "json", base)
	if m, ok := parseJSON(t, r.stdout).(map[string]any); !ok || m["format"] != "qcow2" || m["virtual-size"] != float64(8<<20) {
		t.Errorf("info --output json %s:\n%s", base, r.stdout)
	}

	// vdisk create -f qcow2 -b s3://images/base.qcow2 -F qcow2 vm1.qcow2
	vm1 := filepath.Join(dir, "vm1.qcow2")
	mustRun(t, "create", "-f", "qcow2", "-b", base, "-F", "qcow2", vm1)
	r = mustRun(t, "info", vm1)
	if !strings.Contains(r.stdout, "backing file: "+base) {
		t.Errorf("info %s:\n%s", vm1, r.stdout)
	}

	// serve keeps the strict policy: the URL base is refused unless its
	// scheme is allowed, with the image, the field and the name in the
	// message; unknown schemes are a usage error.
	sock := sockPath(t)
	r = runServe(t.Context(), "-k", sock, vm1)
	if r.code == 0 || !strings.Contains(r.stderr, vm1) || !strings.Contains(r.stderr, "backing file") ||
		!strings.Contains(r.stderr, base) || !strings.Contains(r.stderr, "--allow-backing-scheme s3") {
		t.Fatalf("serve of an overlay on S3 without --allow-backing-scheme: exit %d\n%s", r.code, r.stderr)
	}
	r = runServe(t.Context(), "--allow-backing-scheme", "s3,gopher", "-k", sock, vm1)
	if r.code == 0 || !strings.Contains(r.stderr, `"gopher"`) {
		t.Fatalf("--allow-backing-scheme gopher: exit %d\n%s", r.code, r.stderr)
	}

	// vdisk serve --block-cache base.vci vm1.qcow2: the VM writes
	// locally and reads the base from S3 through the cache.
	vci := filepath.Join(dir, "base.vci")
	want, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	copy(want[5<<20:], pattern(0x44, 64<<10))
	serveRead := func(write bool) (gets int) {
		t.Helper()
		g0 := srv.Requests("GetObject")
		s := startServe(t, sockReady(sock), "--allow-backing-scheme", "s3", "--block-cache", vci, "-t", "-k", sock, vm1)
		if write {
			mustTool(t, "qemu-io", "-f", "raw", nbdURI(sock, ""), "-c", "write -P 0x44 5M 64k")
		}
		out := filepath.Join(t.TempDir(), "read.raw")
		mustTool(t, "nbdcopy", nbdURI(sock, ""), out)
		if r := s.stop(t); r.code != 0 {
			t.Fatalf("serve: exit %d\n%s", r.code, r.stderr)
		}
		b, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b, want) {
			t.Fatal("the served overlay reads wrong")
		}
		return srv.Requests("GetObject") - g0
	}
	if g := serveRead(true); g == 0 {
		t.Fatal("a cold cache fetched nothing from S3")
	}
	if g := serveRead(false); g != 0 {
		t.Fatalf("a warm cache sent %d GETs", g)
	}
	if _, err := os.Stat(vci); err != nil {
		t.Fatalf("no cache file: %v", err)
	}

	// vdisk commit stays local: a snapshot overlay on vm1 commits into
	// vm1; the object is never written (same ETag, no upload).
	snap := filepath.Join(dir, "snap.qcow2")
	mustRun(t, "create", "-f", "qcow2", "-b", vm1, "-F", "qcow2", snap)
	puts := srv.Requests("PutObject") + srv.Requests("UploadPart") + srv.Requests("CreateMultipartUpload")
	// Writes into the snapshot through serve (Trusted needs no allowlist
	// for local commands; serve does).
	sock2 := sockPath(t)
	s := startServe(t, func() bool { return exists(sock2) }, "--allow-backing-scheme", "s3", "-k", sock2, snap)
	mustTool(t, "qemu-io", "-f", "raw", nbdURI(sock2, ""), "-c", "write -P 0x55 6M 128k")
	if r := s.wait(t); r.code != 0 {
		t.Fatalf("serve: exit %d\n%s", r.code, r.stderr)
	}
	copy(want[6<<20:], pattern(0x55, 128<<10))
	mustRun(t, "commit", snap)
	flat := filepath.Join(dir, "flat.raw")
	mustRun(t, "--block-cache", vci, "convert", "-O", "raw", vm1, flat)
	if b, err := os.ReadFile(flat); err != nil || !bytes.Equal(b, want) {
		t.Fatalf("vm1 after commit reads wrong (%v)", err)
	}
	after, err := srv.Stat("images", "base.qcow2")
	if err != nil || after.ETag != before.ETag {
		t.Fatalf("the S3 base changed: %v %q -> %q", err, before.ETag, after.ETag)
	}
	if n := srv.Requests("PutObject") + srv.Requests("UploadPart") + srv.Requests("CreateMultipartUpload"); n != puts {
		t.Fatalf("%d uploads during the local flows", n-puts)
	}

	// --image-opts: cache=FILE and cache-size= open options.
	vci2 := filepath.Join(dir, "opts.vci")
	flat2 := filepath.Join(dir, "flat2.raw")
	g0 := srv.Requests("GetObject")
	mustRun(t, "--image-opts", "convert", "-O", "raw", "driver=qcow2,file.filename="+vm1+",cache="+vci2+",cache-size=64M", flat2)
	if g := srv.Requests("GetObject") - g0; g == 0 {
		t.Fatal("convert through cache= fetched nothing")
	}
	fi, err := os.Stat(vci2)
	if err != nil || fi.Size() > 64<<20 {
		t.Fatalf("cache= file: %v (size %v)", err, fi)
	}
	g0 = srv.Requests("GetObject")
	r = mustRun(t, "--image-opts", "convert", "-O", "raw", "driver=qcow2,file.filename="+vm1+",cache="+vci2+",cache-size=64M", flat2)
	if g := srv.Requests("GetObject") - g0; g != 0 {
		t.Fatalf("a warm cache= sent %d GETs\n%s", g, r.stderr)
	}
	if b, err := os.ReadFile(flat2); err != nil || !bytes.Equal(b, want) {
		t.Fatalf("convert through cache= reads wrong (%v)", err)
	}
	r = vdiskRun(t, "--image-opts", "info", "driver=qcow2,file.filename="+vm1+",cache-size=64M")
	if r.code == 0 || !strings.Contains(r.stderr, "cache-size= needs a block cache") {
		t.Fatalf("cache-size= without a cache: exit %d\n%s", r.code, r.stderr)
	}
}
