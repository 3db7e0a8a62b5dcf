package main

import (
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestParseObjects: --object secret takes qemu's forms, and every mistake
// is a usage error naming the argument.
func TestParseObjects(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "pw")
	os.WriteFile(file, []byte("from-file"), 0o600)
	b64 := filepath.Join(dir, "pw64")
	os.WriteFile(b64, []byte(base64.StdEncoding.EncodeToString([]byte("decoded"))+"\n"), 0o600)
	s, err := parseObjects([]string{
		"secret,id=a,data=inline",
		"secret,id=b,file=" + file,
		"secret,id=c,file=" + b64 + ",format=base64",
		"qom-type=secret,id=d,data=x",
	})
	if err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string]string{"a": "inline", "b": "from-file", "c": "decoded", "d": "x"} {
		got, err := s.Secret(id)
		if err != nil || string(got) != want {
			t.Errorf("secret %s: %q, %v; want %q", id, got, err, want)
		}
	}
	if _, err := s.Secret("nope"); err == nil || !strings.Contains(err.Error(), `"nope"`) {
		t.Errorf("unknown id: %v", err)
	}
	for _, bad := range []struct{ arg, want string }{
		{"tls-creds-x509,id=x,dir=/tmp", "unknown object type"},
		{"secret,data=x", "needs id="},
		{"secret,id=x", "exactly one of data= and file="},
		{"secret,id=x,data=a,file=" + file, "exactly one of data= and file="},
		{"secret,id=x,data=a,format=hex", "format=hex"},
		{"secret,id=x,data=!!!,format=base64", "not base64"},
		{"secret,id=x,data=a,keyid=k", `no property "keyid"`},
		{"secret,id=x,file=" + filepath.Join(dir, "missing"), "missing"},
	} {
		if _, err := parseObjects([]string{bad.arg}); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%s: %v, want an error with %q", bad.arg, err, bad.want)
		}
	}
}

// TestNetworkSpec: qemu's --image-opts keys of the nbd and iscsi drivers
// become the URL names the storages take.
func TestNetworkSpec(t *testing.T) {
	for _, c := range []struct {
		drv   string
		kvs   map[string]string
		want  string
		extra map[string]string
	}{
		{"nbd", map[string]string{"server.type": "inet", "server.host": "10.0.0.1", "server.port": "10810", "export": "disk"}, "nbd://10.0.0.1:10810/disk", nil},
		{"nbd", map[string]string{"server.host": "::1", "export": "d"}, "nbd://[::1]/d", nil},
		{"nbd", map[string]string{"server.type": "unix", "server.path": "/run/nbd.sock", "export": "e"}, "nbd+unix:///e?socket=%2Frun%2Fnbd.sock", nil},
		{"nbd", map[string]string{"server.host": "h", "tls-creds": "tls0", "tls-hostname": "srv"}, "nbds://h/", map[string]string{"tls-creds": "tls0", "tls-hostname": "srv"}},
		{"nbd", map[string]string{"filename": "nbd+unix:///x?socket=/s"}, "nbd+unix:///x?socket=/s", nil},
		{"iscsi", map[string]string{"transport": "tcp", "portal": "127.0.0.1:3261", "target": "iqn.2026-12.org.vdisk:t", "lun": "1", "user": "u", "password-secret": "pw"}, "iscsi://u@127.0.0.1:3261/iqn.2026-12.org.vdisk:t/1", map[string]string{"password-secret": "pw"}},
		{"iscsi", map[string]string{"portal": "h", "target": "iqn.x"}, "iscsi://h/iqn.x/0", nil},
		{"nbd", map[string]string{"server.host": "h", "export": "x", "open-retry": "0", "allocation-depth": "off", "reconnect-delay": "2.5", "open-timeout": "3"}, "nbd://h/x",
			map[string]string{"open-retry": "0", "allocation-depth": "off", "reconnect-delay": "2.5", "open-timeout": "3"}},
		{"nbd", map[string]string{"filename": "nbd://h/x", "open-retry": "5", "reconnect-delay": "0"}, "nbd://h/x", map[string]string{"open-retry": "5", "reconnect-delay": "0"}},
		{"iscsi", map[string]string{"portal": "h", "target": "iqn.x", "open-retry": "7"}, "iscsi://h/iqn.x/0", map[string]string{"open-retry": "7"}},
		{"iscsi", map[string]string{"filename": "iscsi://h/iqn.x/1", "open-retry": "0"}, "iscsi://h/iqn.x/1", map[string]string{"open-retry": "0"}},
	} {
		extra := map[string]string{}
		got, err := networkSpec(c.drv, c.kvs, extra)
		if err != nil || got != c.want {
			t.Errorf("%s %v: %q, %v; want %q", c.drv, c.kvs, got, err, c.want)
			continue
		}
		if len(c.kvs) != 0 {
			t.Errorf("%s: keys left unused: %v", c.drv, c.kvs)
		}
		for k, v := range c.extra {
			if extra[k] != v {
				t.Errorf("%s: storage option %s=%q, want %q", c.drv, k, extra[k], v)
			}
		}
	}
}
