package driver_test

import (
	"errors"
	"strconv"
	"strings"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/memfs"
)

func TestResolveReferenced(t *testing.T) {
	cases := []struct {
		ref            string
		strict, trusty string // "" = refused (strict) / error
	}{
		{"data.raw", "/d/img/data.raw", "/d/img/data.raw"},
		{"sub/../data.raw", "/d/img/data.raw", "/d/img/data.raw"},
		{"./sub/x", "/d/img/sub/x", "/d/img/sub/x"},
		{"../out/x", "", "/d/out/x"},
		{"sub/../../x", "", "/d/x"},
		{"..", "", "/d"},
		{"/etc/shadow", "", "/etc/shadow"},
		{"/d/img/base.qcow2", "/d/img/base.qcow2", "/d/img/base.qcow2"},
		{"/d/img/sub/../base.qcow2", "/d/img/base.qcow2", "/d/img/base.qcow2"},
		{"/d/img/../img2/x", "", "/d/img2/x"},
		{"/d/img", "", "/d/img"},
		{"/d/imgx/base", "", "/d/imgx/base"},
		{`\\server\share\x`, "", `\\server\share\x`},
		{`C:\x.vmdk`, "", `C:\x.vmdk`},
		{"nbd://host/export", "", "nbd://host/export"},
		{"https://example.com/x.qcow2", "", "https://example.com/x.qcow2"},
	}
	for _, c := range cases {
		got, err := driver.ResolveReferenced("/d/img/top.qcow2", "data file", c.ref, false)
		if c.strict == "" {
			var pe *driver.PathError
			if !errors.As(err, &pe) || !errors.Is(err, driver.ErrInvalidOption) {
				t.Errorf("strict %q: %q, %v; want a refusal", c.ref, got, err)
			} else if msg := err.Error(); !strings.Contains(msg, "/d/img/top.qcow2") || !strings.Contains(msg, "data file") || !strings.Contains(msg, strconv.Quote(c.ref)) {
				t.Errorf("strict %q: message %q does not name image, field and name", c.ref, msg)
			}
		} else if err != nil || got != c.strict {
			t.Errorf("strict %q: %q, %v; want %q", c.ref, got, err, c.strict)
		}
		got, err = driver.ResolveReferenced("/d/img/top.qcow2", "data file", c.ref, true)
		if err != nil || got != c.trusty {
			t.Errorf("trusted %q: %q, %v; want %q", c.ref, got, err, c.trusty)
		}
	}
	for _, bad := range []string{"", "a\x00b"} {
		if _, err := driver.ResolveReferenced("/d/top", "extent file", bad, true); !errors.Is(err, driver.ErrInvalidOption) {
			t.Errorf("%q: %v, want an invalid option error even when trusted", bad, err)
		}
	}
}

// TestOpenReferencedPolicy: OpenReferenced follows the policy, records
// what it met, and for an InfoOnly image hands back a stand-in file for a
// refused name instead of failing.
func TestOpenReferencedPolicy(t *testing.T) {
	st := memfs.New()
	for _, n := range []string{"/d/img/in.raw", "/d/out.raw"} {
		f, err := st.Open(n, driver.ReadWrite|driver.Create)
		if err != nil {
			t.Fatal(err)
		}
		f.WriteAt([]byte("outside"), 0)
		f.Close()
	}
	refs := &driver.ReferenceLog{}
	p := driver.OpenParams{Storage: st, Name: "/d/img/top", References: refs}
	if p.Policy() != driver.PathStrict {
		t.Fatalf("zero policy is %v", p.Policy())
	}
	f, full, err := p.OpenReferenced("data file", "in.raw", driver.ReadOnly)
	if err != nil || full != "/d/img/in.raw" {
		t.Fatalf("inside: %q, %v", full, err)
	}
	f.Close()
	if _, _, err := p.OpenReferenced("data file", "../out.raw", driver.ReadWrite); err == nil {
		t.Fatal("strict open of ../out.raw succeeded")
	}
	got := refs.List()
	if len(got) != 2 || got[0].Refused != "" || got[1].Refused == "" || got[1].Name != "../out.raw" || got[1].Path != "/d/out.raw" {
		t.Fatalf("references %+v", got)
	}

	// InfoOnly: the open succeeds with a stand-in that fails every access.
	p.InfoOnly = true
	f, _, err = p.OpenReferenced("data file", "../out.raw", driver.ReadOnly)
	if err != nil {
		t.Fatalf("InfoOnly: %v", err)
	}
	b := make([]byte, 7)
	if n, err := f.ReadAt(b, 0); n != 0 || !errors.Is(err, driver.ErrInvalidOption) {
		t.Errorf("stand-in read: %d %v", n, err)
	}
	if _, err := f.WriteAt(b, 0); err == nil {
		t.Error("stand-in write succeeded")
	}
	if _, err := f.Size(); err == nil {
		t.Error("stand-in Size succeeded")
	}
	f.Close()
	// A name that is bad whatever the policy still fails.
	if _, _, err := p.OpenReferenced("data file", "", driver.ReadOnly); err == nil {
		t.Error("empty name accepted")
	}

	// Trusted follows it.
	for _, q := range []driver.OpenParams{
		{Storage: st, Name: "/d/img/top", Paths: driver.PathTrusted},
	} {
		f, full, err := q.OpenReferenced("data file", "../out.raw", driver.ReadOnly)
		if err != nil || full != "/d/out.raw" {
			t.Fatalf("trusted: %q %v", full, err)
		}
		if _, err := f.ReadAt(b, 0); err != nil || string(b) != "outside" {
			t.Errorf("trusted read %q %v", b, err)
		}
		f.Close()
	}
}
