package iscsistore_test

import (
	"context"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/iscsi/iscsitest"
)

// TestCloseStorageClosesConnections: the storage built for an iSCSI URL
// logs out, at CloseStorage (the container calls it with the last layer
// on it), of the sessions of files still open from it, and logs in again
// when used afterwards.
func TestCloseStorageClosesConnections(t *testing.T) {
	tg := iscsitest.Start(t, testIQN)
	tg.AddLUN(1, 4<<20, true)
	url := tg.URL(1)
	live := &disktest.LiveConns{}
	open, ok := driver.LookupScheme("iscsi")
	if !ok {
		t.Fatal("no iscsi scheme")
	}
	st, name, err := open(context.Background(), url, &driver.SchemeEnv{Dialer: live.Dial})
	if err != nil {
		t.Fatal(err)
	}
	disktest.CheckStorageCloser(t, st, name, live)
}
