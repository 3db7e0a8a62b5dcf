package osfs

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vdisk/vdisk/driver"
)

// beneathTree makes dir/img (the image's directory) holding a regular
// file, a subdirectory, links inside and out, a FIFO, a socket and a
// device link, and out/secret beside it.
func beneathTree(t *testing.T) (dir, secret string) {
	t.Helper()
	root := t.TempDir()
	dir = filepath.Join(root, "img")
	out := filepath.Join(root, "out")
	for _, d := range []string{dir, out, filepath.Join(dir, "sub")} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	secret = filepath.Join(out, "secret")
	write := func(name, s string) {
		if err := os.WriteFile(name, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(secret, "secret")
	write(filepath.Join(dir, "data"), "data")
	write(filepath.Join(dir, "sub", "deep"), "deep")
	links := map[string]string{
		"in-link":      "data",                // stays inside: allowed by openat2
		"sub/up-link":  "../data",             // climbs, still inside
		"out-rel":      "../out/secret",       // relative, leads out
		"out-abs":      secret,                // absolute
		"out-dir":      out,                   // a directory outside
		"dev-null":     "/dev/null",           // a device
		"proc-self-fd": "/proc/self/fd/0",     // a magic link
		"sub/out-rel2": "../../out/secret",    // leads out from a subdirectory
		"loop":         "loop",                // ELOOP
		"via-out-dir":  "out-dir/../../img/x", // passes outside on the way
	}
	for name, target := range links {
		if err := os.Symlink(target, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Mkfifo(filepath.Join(dir, "fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir, secret
}

// TestOpenBeneath opens names under the strict policy's rules, through
// openat2 and through the O_NOFOLLOW walk, and checks which are refused.
func TestOpenBeneath(t *testing.T) {
	dir, secret := beneathTree(t)
	before, err := os.Stat(secret)
	if err != nil {
		t.Fatal(err)
	}
	// ok: content when allowed ("" refused). walkOK: the walk refuses
	// every link, so links allowed by openat2 are refused by it.
	cases := []struct {
		rel            string
		want, walkWant string // content; "" = refused (a *driver.PathError)
		notFound       bool
	}{
		{rel: "data", want: "data", walkWant: "data"},
		{rel: "sub/deep", want: "deep", walkWant: "deep"},
		{rel: "in-link", want: "data"},
		{rel: "sub/up-link", want: "data"},
		{rel: "out-rel"},
		{rel: "out-abs"},
		{rel: "out-dir"},
		{rel: "dev-null"},
		{rel: "proc-self-fd"},
		{rel: "sub/out-rel2"},
		{rel: "loop"},
		{rel: "via-out-dir"},
		{rel: "fifo"},
		{rel: "sub"},
		{rel: "../out/secret"},
		{rel: "/etc/passwd"},
		{rel: "missing", notFound: true},
	}
	for _, mode := range []string{"openat2", "walk"} {
		for _, c := range cases {
			for _, flag := range []driver.OpenFlag{driver.ReadOnly, driver.ReadWrite} {
				var f driver.File
				var err error
				done := make(chan struct{})
				go func() {
					defer close(done)
					if mode == "openat2" {
						f, err = FS{}.OpenBeneath(dir, c.rel, flag|driver.NoLock)
					} else {
						f, err = openBeneathWalk(dir, c.rel, flag|driver.NoLock)
					}
				}()
				select {
				case <-done:
				case <-time.After(5 * time.Second):
					t.Fatalf("%s %s: the open hangs", mode, c.rel)
				}
				want := c.want
				if mode == "walk" {
					want = c.walkWant
				}
				switch {
				case c.notFound:
					if !errors.Is(err, driver.ErrNotFound) {
						t.Errorf("%s %s: err = %v, want not found", mode, c.rel, err)
					}
				case want == "":
					var pe *driver.PathError
					if !errors.As(err, &pe) || !errors.Is(err, driver.ErrInvalidOption) {
						t.Errorf("%s %s flag %d: err = %v, want a *driver.PathError", mode, c.rel, flag, err)
					}
				case err != nil:
					t.Errorf("%s %s flag %d: %v", mode, c.rel, flag, err)
				default:
					b := make([]byte, 16)
					n, _ := f.ReadAt(b, 0)
					if string(b[:n]) != want {
						t.Errorf("%s %s: read %q, want %q", mode, c.rel, b[:n], want)
					}
				}
				if f != nil {
					f.Close()
				}
			}
		}
	}
	after, err := os.Stat(secret)
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(secret); !bytes.Equal(b, []byte("secret")) || !after.ModTime().Equal(before.ModTime()) {
		t.Errorf("the file outside changed: %q, mtime %v -> %v", b, before.ModTime(), after.ModTime())
	}
}

// openBeneathWalk is OpenBeneath with openat2 unavailable.
func openBeneathWalk(dir, rel string, flag driver.OpenFlag) (driver.File, error) {
	forceWalk = true
	defer func() { forceWalk = false }()
	return FS{}.OpenBeneath(dir, rel, flag)
}

// TestOpenBeneathCreate creates a file beneath a directory and refuses to
// create one through a link leading out.
func TestOpenBeneathCreate(t *testing.T) {
	dir, secret := beneathTree(t)
	f, err := FS{}.OpenBeneath(dir, "sub/new", driver.ReadWrite|driver.Create|driver.Excl)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := os.Stat(filepath.Join(dir, "sub", "new")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(filepath.Dir(secret), "created"), filepath.Join(dir, "dangling")); err != nil {
		t.Fatal(err)
	}
	if _, err := (FS{}).OpenBeneath(dir, "dangling", driver.ReadWrite|driver.Create); err == nil {
		t.Error("created a file through a link leading out")
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(secret), "created")); err == nil {
		t.Error("a file appeared outside the directory")
	}
}
