package iscsistore

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/iscsi"
)

func TestParseURL(t *testing.T) {
	cases := []struct {
		in   string
		want Location
		str  string
	}{
		{"iscsi://host/iqn.a:b/3", Location{Host: "host:3260", Target: "iqn.a:b", LUN: 3}, "iscsi://host:3260/iqn.a:b/3"},
		{"iscsi://u%p@1.2.3.4:3261/iqn.x", Location{User: "u", Password: "p", HasPassword: true, Host: "1.2.3.4:3261", Target: "iqn.x"}, "iscsi://u@1.2.3.4:3261/iqn.x/0"},
		{"iscsi://[::1]:99/iqn.x/1", Location{Host: "[::1]:99", Target: "iqn.x", LUN: 1}, "iscsi://[::1]:99/iqn.x/1"},
		{"iscsi://[::1]/iqn.x/1", Location{Host: "[::1]:3260", Target: "iqn.x", LUN: 1}, ""},
		{"ISCSI://host", Location{Host: "host:3260"}, "iscsi://host:3260"},
		{"iscsi://a%b%c@h/t/0", Location{User: "a", Password: "b%c", HasPassword: true, Host: "h:3260", Target: "t"}, ""},
	}
	for _, c := range cases {
		l, err := ParseURL(c.in)
		if err != nil {
			t.Fatalf("%s: %v", c.in, err)
		}
		if *l != c.want {
			t.Errorf("%s: %+v, want %+v", c.in, *l, c.want)
		}
		if c.str != "" && l.String() != c.str {
			t.Errorf("%s: String %q, want %q", c.in, l.String(), c.str)
		}
	}
	for _, bad := range []string{"nbd://h/x", "iscsi://", "iscsi:///t/0", "iscsi://h:0/t/0", "iscsi://h:x/t", "iscsi://h/t/99999", "iscsi://h/t/-1", "iscsi://%secret@h/t/0"} {
		_, err := ParseURL(bad)
		if !errors.Is(err, driver.ErrInvalidOption) {
			t.Errorf("%s: %v", bad, err)
		}
		if err != nil && strings.Contains(err.Error(), "secret") {
			t.Errorf("%s: error shows the password: %v", bad, err)
		}
	}
}

func TestOptions(t *testing.T) {
	ctx := context.Background()
	for _, o := range []map[string]string{{"header-digest": "md5"}, {"bogus": "1"}, {"timeout": "0"}} {
		if _, _, err := Open(ctx, "iscsi://h/t/0", &driver.SchemeEnv{Options: o}); !errors.Is(err, driver.ErrInvalidOption) {
			t.Errorf("%v: %v", o, err)
		}
	}
	st, _, err := Open(ctx, "iscsi://h/t/0", &driver.SchemeEnv{Options: map[string]string{"target-password-secret": "x"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.(*Storage).config(); !errors.Is(err, driver.ErrInvalidOption) {
		t.Errorf("mutual without user: %v", err)
	}
}

func TestMapError(t *testing.T) {
	wp := &iscsi.StatusError{Status: 2, Sense: &iscsi.Sense{Key: iscsi.SenseDataProtect, ASC: 0x27}}
	err := mapError(wp, "write", "iscsi://h/t/0", 4096)
	if !errors.Is(err, driver.ErrReadOnly) || !errors.Is(err, iscsi.ErrWriteProtected) || !strings.Contains(err.Error(), "write protected") || !strings.Contains(err.Error(), "offset 4096") {
		t.Fatalf("%v", err)
	}
	oor := &iscsi.StatusError{Status: 2, Sense: &iscsi.Sense{Key: iscsi.SenseIllegalRequest, ASC: 0x21}}
	if err := mapError(oor, "read", "x", 0); !errors.Is(err, driver.ErrOutOfRange) {
		t.Fatalf("%v", err)
	}
	me := &iscsi.StatusError{Status: 2, Sense: &iscsi.Sense{Key: iscsi.SenseMediumError, ASC: 0x11}}
	if err := mapError(me, "read", "x", 0); !errors.Is(err, iscsi.ErrMediumError) || !strings.Contains(err.Error(), "unrecovered read error") {
		t.Fatalf("%v", err)
	}
}
