package vdisk_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	_ "github.com/vdisk/vdisk/format/qcow2"
	_ "github.com/vdisk/vdisk/format/raw"
	_ "github.com/vdisk/vdisk/format/vhd"
	_ "github.com/vdisk/vdisk/format/vmdk"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// hostile is a directory holding an image directory img and, beside it,
// out: the files an image must not reach under the strict policy.
type hostile struct {
	t        *testing.T
	img, out string
	watched  map[string]fileState
}

type fileState struct {
	sum   [32]byte
	mtime time.Time
}

func newHostile(t *testing.T) *hostile {
	t.Helper()
	qemutest.Require(t)
	root := t.TempDir()
	h := &hostile{t: t, img: filepath.Join(root, "img"), out: filepath.Join(root, "out"), watched: map[string]fileState{}}
	for _, d := range []string{h.img, h.out} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return h
}

// run runs a command in the image directory (qemu-img resolves a relative
// data_file against its working directory when it creates it).
func (h *hostile) run(name string, args ...string) {
	h.t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = h.img
	if out, err := cmd.CombinedOutput(); err != nil {
		h.t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// watch records the content and mtime of the outside file name.
func (h *hostile) watch(name string) {
	h.t.Helper()
	h.watched[name] = h.state(name)
}

func (h *hostile) state(name string) fileState {
	h.t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		h.t.Fatal(err)
	}
	fi, err := os.Stat(name)
	if err != nil {
		h.t.Fatal(err)
	}
	return fileState{sha256.Sum256(b), fi.ModTime()}
}

// untouched fails the test if a watched file changed.
func (h *hostile) untouched() {
	h.t.Helper()
	for name, was := range h.watched {
		if now := h.state(name); now != was {
			h.t.Errorf("%s was modified (content or mtime changed)", name)
		}
	}
}

func (h *hostile) symlink(target, name string) {
	h.t.Helper()
	if err := os.Symlink(target, filepath.Join(h.img, name)); err != nil {
		h.t.Fatal(err)
	}
}

// openWithin opens name, failing the test if the open blocks (a FIFO).
func openWithin(t *testing.T, name string, o *vdisk.OpenOptions) (*vdisk.Disk, error) {
	t.Helper()
	type res struct {
		d   *vdisk.Disk
		err error
	}
	ch := make(chan res, 1)
	go func() {
		d, err := vdisk.Open(context.Background(), name, o)
		ch <- res{d, err}
	}()
	select {
	case r := <-ch:
		return r.d, r.err
	case <-time.After(20 * time.Second):
		t.Fatalf("opening %s hangs", name)
		return nil, nil
	}
}

// refused asserts that a strict open of name (read-write, and read-only)
// fails with a *driver.PathError naming the image, field and name.
func (h *hostile) refused(name, field, ref string, o vdisk.OpenOptions) {
	h.t.Helper()
	o.Paths = driver.PathStrict
	for _, ro := range []bool{false, true} {
		o.ReadOnly = ro
		d, err := openWithin(h.t, name, &o)
		if err == nil {
			d.Close()
			h.t.Errorf("strict open of %s (read-only %v) succeeded, want a refusal of %s %q", name, ro, field, ref)
			continue
		}
		var pe *driver.PathError
		if !errors.As(err, &pe) || !errors.Is(err, driver.ErrInvalidOption) {
			h.t.Errorf("strict open of %s: %v, want a *driver.PathError", name, err)
			continue
		}
		msg := err.Error()
		for _, want := range []string{field, ref, "strict path policy"} {
			if !strings.Contains(msg, want) {
				h.t.Errorf("refusal %q does not mention %q", msg, want)
			}
		}
		if !strings.Contains(msg, filepath.Base(pe.Image)) || pe.Image == "" {
			h.t.Errorf("refusal %q does not name the referring image (%q)", msg, pe.Image)
		}
	}
	h.untouched()
}

// trusted asserts that name opens under the trusted policy and reads want
// at offset 0.
func (h *hostile) trusted(name string, want []byte, o vdisk.OpenOptions) {
	h.t.Helper()
	o.Paths, o.ReadOnly = driver.PathTrusted, true
	d, err := vdisk.Open(context.Background(), name, &o)
	if err != nil {
		h.t.Fatalf("trusted open of %s: %v", name, err)
	}
	defer d.Close()
	got := make([]byte, len(want))
	if _, err := d.ReadAt(got, 0); err != nil {
		h.t.Fatalf("trusted read of %s: %v", name, err)
	}
	if !bytes.Equal(got, want) {
		h.t.Errorf("trusted read of %s: % x..., want % x...", name, got[:8], want[:8])
	}
}

func pattern(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

// TestStrictQcow2DataFile: a qcow2 external data file named absolutely,
// with "..", or through a symbolic link leading out is refused under the
// strict policy (the file is neither read nor written), and followed
// under the trusted one.
func TestStrictQcow2DataFile(t *testing.T) {
	h := newHostile(t)
	data := filepath.Join(h.out, "data.raw")
	h.run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+data+",data_file_raw=on", "abs.qcow2", "1M")
	qemutest.IO(t, "qcow2", filepath.Join(h.img, "abs.qcow2"), "write -P 0x5a 0 64k")
	h.run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=../out/data2.raw,data_file_raw=on", "rel.qcow2", "1M")
	h.run("qemu-io", "-f", "qcow2", "-c", "write -P 0x6b 0 64k", "rel.qcow2")
	h.symlink("../out/data3.raw", "link.raw")
	h.run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=link.raw,data_file_raw=on", "link.qcow2", "1M")
	h.run("qemu-io", "-f", "qcow2", "-c", "write -P 0x7c 0 64k", "link.qcow2")
	for _, n := range []string{"data.raw", "data2.raw", "data3.raw"} {
		h.watch(filepath.Join(h.out, n))
	}
	cases := []struct {
		image, ref string
		fill       byte
	}{
		{"abs.qcow2", data, 0x5a},
		{"rel.qcow2", "../out/data2.raw", 0x6b},
		{"link.qcow2", "link.raw", 0x7c},
	}
	for _, c := range cases {
		name := filepath.Join(h.img, c.image)
		h.refused(name, "data file", c.ref, vdisk.OpenOptions{Format: "qcow2"})
		h.trusted(name, pattern(c.fill, 64<<10), vdisk.OpenOptions{Format: "qcow2"})
		// AllowUnsafeBacking still means trusted.
		d, err := vdisk.Open(context.Background(), name, &vdisk.OpenOptions{ReadOnly: true, AllowUnsafeBacking: true})
		if err != nil {
			t.Errorf("AllowUnsafeBacking open of %s: %v", c.image, err)
		} else {
			d.Close()
		}
	}
	// The same image with its data file inside the directory opens
	// strictly.
	h.run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=inside.raw,data_file_raw=on", "inside.qcow2", "1M")
	h.run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", "inside.qcow2")
	d, err := vdisk.Open(context.Background(), filepath.Join(h.img, "inside.qcow2"), nil)
	if err != nil {
		t.Fatalf("strict open of a data file inside the directory: %v", err)
	}
	got := make([]byte, 64<<10)
	if _, err := d.ReadAt(got, 0); err != nil || !bytes.Equal(got, pattern(0x11, 64<<10)) {
		t.Errorf("read through an inside data file: %v", err)
	}
	d.Close()
	h.untouched()
}

// TestStrictInfoOnlyReports: an InfoOnly strict open of an image whose
// data file is refused still opens (for info), lists the reference as
// refused, and fails every read instead of touching the file.
func TestStrictInfoOnlyReports(t *testing.T) {
	h := newHostile(t)
	data := filepath.Join(h.out, "data.raw")
	h.run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+data+",data_file_raw=on", "abs.qcow2", "1M")
	qemutest.IO(t, "qcow2", filepath.Join(h.img, "abs.qcow2"), "write -P 0x5a 0 64k")
	h.watch(data)
	d, err := vdisk.Open(context.Background(), filepath.Join(h.img, "abs.qcow2"), &vdisk.OpenOptions{InfoOnly: true, Format: "qcow2"})
	if err != nil {
		t.Fatalf("InfoOnly strict open: %v", err)
	}
	defer d.Close()
	refs := d.Top().References()
	if len(refs) != 1 || refs[0].Field != "data file" || refs[0].Name != data || refs[0].Refused == "" {
		t.Fatalf("references %+v, want the data file, refused", refs)
	}
	buf := make([]byte, 4096)
	if _, err := d.ReadAt(buf, 0); err == nil {
		t.Error("a read through a refused data file succeeded")
	} else if pe := (*driver.PathError)(nil); !errors.As(err, &pe) {
		t.Errorf("read error %v is not the refusal", err)
	}
	h.untouched()
}

// TestStrictBacking: backing files named absolutely, through a symbolic
// link in the image's directory that leads out, or naming a FIFO or a
// device are refused under the strict policy; the first two work trusted.
func TestStrictBacking(t *testing.T) {
	h := newHostile(t)
	base := filepath.Join(h.out, "base.qcow2")
	qemutest.Create(t, "qcow2", base, "1M")
	qemutest.IO(t, "qcow2", base, "write -P 0x3c 0 64k")
	h.watch(base)
	h.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", "abs.qcow2")
	h.symlink("../out/base.qcow2", "base-link.qcow2")
	h.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base-link.qcow2", "-F", "qcow2", "link.qcow2")
	h.symlink(base, "base-abslink.qcow2")
	h.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base-abslink.qcow2", "-F", "qcow2", "abslink.qcow2")
	h.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "../out/base.qcow2", "-F", "qcow2", "rel.qcow2")
	if err := unix.Mkfifo(filepath.Join(h.img, "fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	h.run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "fifo", "-F", "raw", "fifo.qcow2", "1M")
	h.symlink("/dev/zero", "zero")
	h.run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "zero", "-F", "raw", "dev.qcow2", "1M")
	for _, c := range []struct{ image, ref string }{
		{"abs.qcow2", base}, {"link.qcow2", "base-link.qcow2"}, {"abslink.qcow2", "base-abslink.qcow2"},
		{"rel.qcow2", "../out/base.qcow2"}, {"fifo.qcow2", "fifo"}, {"dev.qcow2", "zero"},
	} {
		name := filepath.Join(h.img, c.image)
		h.refused(name, "backing file", c.ref, vdisk.OpenOptions{Format: "qcow2"})
		if c.image != "fifo.qcow2" && c.image != "dev.qcow2" {
			h.trusted(name, pattern(0x3c, 64<<10), vdisk.OpenOptions{Format: "qcow2"})
		}
	}
	// A backing file inside the directory, also through a link that
	// stays inside, opens strictly.
	inner := filepath.Join(h.img, "inner.qcow2")
	qemutest.Create(t, "qcow2", inner, "1M")
	qemutest.IO(t, "qcow2", inner, "write -P 0x21 0 64k")
	h.symlink("inner.qcow2", "inner-link.qcow2")
	h.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "inner-link.qcow2", "-F", "qcow2", "ok.qcow2")
	// qemu-img create -b with an absolute name records it as given; one
	// that leads into the image's own directory opens strictly, and an
	// absolute name through a link inside that leads out is still refused.
	h.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", inner, "-F", "qcow2", "absin.qcow2")
	h.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", filepath.Join(h.img, "base-link.qcow2"), "-F", "qcow2", "absinlink.qcow2")
	h.refused(filepath.Join(h.img, "absinlink.qcow2"), "backing file", filepath.Join(h.img, "base-link.qcow2"), vdisk.OpenOptions{Format: "qcow2"})
	for _, top := range []string{"ok.qcow2", "absin.qcow2"} {
		d, err := vdisk.Open(context.Background(), filepath.Join(h.img, top), &vdisk.OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatalf("strict open of %s with a backing file inside: %v", top, err)
		}
		got := make([]byte, 64<<10)
		if _, err := d.ReadAt(got, 0); err != nil || !bytes.Equal(got, pattern(0x21, 64<<10)) {
			t.Errorf("%s: read through an inside backing file: %v", top, err)
		}
		d.Close()
	}
	h.untouched()
}

// TestStrictVHDLocators: a VHD differencing image whose parent locators
// point outside its directory (W2ku absolute, W2ru "..\out\base.vhd") is
// refused under the strict policy and opens trusted. qemu cannot create
// VHD differencing images, so vdisk (trusted) makes it from a qemu-made
// base.
func TestStrictVHDLocators(t *testing.T) {
	h := newHostile(t)
	base := filepath.Join(h.out, "base.vhd")
	qemutest.Create(t, "vpc", base, "1M")
	qemutest.IO(t, "vpc", base, "write -P 0x4d 0 64k")
	child := filepath.Join(h.img, "child.vhd")
	d, err := vdisk.Create(context.Background(), child, &vdisk.CreateOptions{Format: "vpc", Backing: base, BackingFormat: "vpc", Paths: driver.PathTrusted})
	if err != nil {
		t.Fatal(err)
	}
	if ref := d.Top().ParentRef(); ref == nil || !strings.HasPrefix(ref.Name, "../") {
		t.Fatalf("parent reference %+v, want a relative name climbing out", ref)
	}
	d.Close()
	h.watch(base)
	h.refused(child, "backing file", "../out/base.vhd", vdisk.OpenOptions{Format: "vpc"})
	h.trusted(child, pattern(0x4d, 64<<10), vdisk.OpenOptions{Format: "vpc"})
}

// vmdkFlat makes a monolithicFlat VMDK with qemu-img in dir and rewrites
// its descriptor's extent file name to ref (text, as an attacker would).
func vmdkFlat(t *testing.T, dir, name, ref string) string {
	t.Helper()
	desc := filepath.Join(dir, name)
	qemutest.Create(t, "vmdk", desc, "1M", "subformat=monolithicFlat")
	b, err := os.ReadFile(desc)
	if err != nil {
		t.Fatal(err)
	}
	flat := strings.TrimSuffix(name, ".vmdk") + "-flat.vmdk"
	text := strings.Replace(string(b), `"`+flat+`"`, `"`+ref+`"`, 1)
	if text == string(b) {
		t.Fatalf("descriptor has no extent line naming %s:\n%s", flat, b)
	}
	if err := os.WriteFile(desc, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	os.Remove(filepath.Join(dir, flat))
	return desc
}

// TestStrictVMDKExtents: FLAT extents naming a file outside the
// descriptor's directory (absolute, "..", a link leading out), a device
// or a FIFO are refused under the strict policy without hanging; the
// outside file works trusted.
func TestStrictVMDKExtents(t *testing.T) {
	h := newHostile(t)
	secret := filepath.Join(h.out, "secret.raw")
	if err := os.WriteFile(secret, pattern(0x99, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	h.watch(secret)
	if err := unix.Mkfifo(filepath.Join(h.img, "fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	h.symlink("../out/secret.raw", "link.raw")
	h.symlink("/dev/zero", "zero-link")
	cases := []struct {
		ref     string
		trusted bool
	}{
		{secret, true}, {"../out/secret.raw", true}, {"link.raw", true},
		{"/dev/zero", false}, {"/dev/null", false}, {"zero-link", false}, {"fifo", false},
	}
	for i, c := range cases {
		desc := vmdkFlat(t, h.img, "d"+string(rune('a'+i))+".vmdk", c.ref)
		h.refused(desc, "extent file", c.ref, vdisk.OpenOptions{Format: "vmdk"})
		if c.trusted {
			h.trusted(desc, pattern(0x99, 64<<10), vdisk.OpenOptions{Format: "vmdk"})
		}
	}
	// The unedited layout (extent beside the descriptor) opens strictly.
	desc := filepath.Join(h.img, "plain.vmdk")
	qemutest.Create(t, "vmdk", desc, "1M", "subformat=monolithicFlat")
	qemutest.IO(t, "vmdk", desc, "write -P 0x42 0 64k")
	d, err := vdisk.Open(context.Background(), desc, nil)
	if err != nil {
		t.Fatalf("strict open of a plain monolithicFlat VMDK: %v", err)
	}
	got := make([]byte, 64<<10)
	if _, err := d.ReadAt(got, 0); err != nil || !bytes.Equal(got, pattern(0x42, 64<<10)) {
		t.Errorf("read: %v", err)
	}
	d.Close()
	h.untouched()
}
