package iscsistore_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/iscsi"
)

func TestCHAP(t *testing.T) {
	tg, _ := newTarget(t, 4<<20)
	tg.AddAccount("alice", "alice-secret-12", false)
	tg.AddAccount("tgtid", "target-secret-34", true)
	hostURL := func(userinfo string) string {
		return strings.Replace(tg.URL(1), "iscsi://", "iscsi://"+userinfo, 1)
	}
	ctx := context.Background()
	cases := []struct {
		name    string
		url     string
		opts    map[string]string
		secrets *driver.SecretMap
		wantErr string
	}{
		{name: "one-way in URL", url: hostURL("alice%alice-secret-12@")},
		{name: "one-way secret", url: hostURL("alice@"), opts: map[string]string{"password-secret": "pw"}, secrets: secrets("pw", "alice-secret-12")},
		{name: "mutual", url: hostURL("alice@"), opts: map[string]string{"password-secret": "pw", "target-password-secret": "tpw", "target-user": "tgtid"},
			secrets: secrets("pw", "alice-secret-12", "tpw", "target-secret-34")},
		{name: "wrong secret", url: hostURL("alice%wrong-secret-00@"), wantErr: "wrong user or secret"},
		{name: "wrong user", url: hostURL("bob%alice-secret-12@"), wantErr: "wrong user or secret"},
		{name: "wrong target secret", url: hostURL("alice@"), opts: map[string]string{"password-secret": "pw", "target-password-secret": "tpw"},
			secrets: secrets("pw", "alice-secret-12", "tpw", "not-the-target-secret"), wantErr: "wrong target secret"},
		{name: "no credentials", url: tg.URL(1), wantErr: "requires CHAP authentication"},
		{name: "missing secret", url: hostURL("alice@"), opts: map[string]string{"password-secret": "nope"}, secrets: secrets(), wantErr: `no secret with id "nope"`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			o := &vdisk.OpenOptions{Format: "raw", StorageOptions: c.opts}
			if c.secrets != nil {
				o.Secrets = c.secrets
			}
			d, err := vdisk.Open(ctx, c.url, o)
			if c.wantErr != "" {
				if err == nil {
					d.Close()
					t.Fatal("opened")
				}
				if !strings.Contains(err.Error(), c.wantErr) {
					t.Fatalf("error %q does not say %q", err, c.wantErr)
				}
				if strings.Contains(err.Error(), "wrong-secret-00") {
					t.Fatalf("error shows the password: %v", err)
				}
				if c.wantErr == "wrong user or secret" && !errors.Is(err, iscsi.ErrAuth) {
					t.Fatalf("not ErrAuth: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			if _, err := d.WriteAt([]byte("chap"), 512); err != nil {
				t.Fatal(err)
			}
		})
	}
	// Discovery needs no account on tgtd, but the target does: it is
	// listed without its LUNs, saying why.
	st, _, err := openScheme("iscsi://" + tg.Portal)
	if err != nil {
		t.Fatal(err)
	}
	es, err := st.(driver.Lister).ListExports(ctx, "iscsi://"+tg.Portal)
	if err != nil || len(es) != 1 || es[0].Name != testIQN || !strings.Contains(es[0].Description, "CHAP") {
		t.Fatalf("exports %+v: %v", es, err)
	}
	// qemu's initiator logs in with the same account and reads our write.
	qemuIO(t, hostURL("alice%alice-secret-12@"), "read -P 0x63 512 1")
}
