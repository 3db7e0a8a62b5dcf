package driver

import (
	"errors"
	"io/fs"
	"testing"
)

func TestErrorString(t *testing.T) {
	cause := &fs.PathError{Op: "open", Path: "/x/b.img", Err: fs.ErrNotExist}
	cases := []struct {
		name string
		err  error
		want string
	}{
		{"reason and sentinel", Corruptf("a.qcow2", 512, "L1 table past EOF"),
			"a.qcow2: at offset 512 (0x200): L1 table past EOF (corrupt image)"},
		{"no offset", Unsupportedf("a.vmdk", "extent type %q", "VMFSRDM"),
			`a.vmdk: extent type "VMFSRDM" (unsupported)`},
		{"cause already in reason", Errorf(cause, "a.qcow2", -1, "backing file: %v", cause),
			"a.qcow2: backing file: open /x/b.img: file does not exist"},
		{"cause not in reason", Errorf(cause, "a.qcow2", -1, "backing file"),
			"a.qcow2: backing file (open /x/b.img: file does not exist)"},
		{"op only", WithFile(errors.New("boom"), "read", "a.raw"), "a.raw: read: boom"},
		{"already named", WithFile(Corruptf("a.raw", -1, "bad"), "read", "b.raw"), "a.raw: bad (corrupt image)"},
	}
	for _, c := range cases {
		if got := c.err.Error(); got != c.want {
			t.Errorf("%s:\n got %q\nwant %q", c.name, got, c.want)
		}
	}
	// Wrapping keeps errors.Is working whatever the text.
	if err := Errorf(cause, "a", -1, "x: %v", cause); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("errors.Is lost the cause: %v", err)
	}
}
