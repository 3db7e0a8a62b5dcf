package nbdstore_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/nbdstore"
)

// TestCloseStorageClosesConnections: the storage built for an NBD URL
// closes, at CloseStorage (the container calls it with the last layer on
// it), the connections of files still open from it, and connects again
// when used afterwards.
func TestCloseStorageClosesConnections(t *testing.T) {
	t.Parallel()
	file := filepath.Join(t.TempDir(), "d.raw")
	qemutest.Create(t, "raw", file, "4M")
	_, url := qemuNBD(t, "raw", file)
	live := &disktest.LiveConns{}
	env := &driver.SchemeEnv{Dialer: live.Dial, Options: map[string]string{nbdstore.OptMultiConn: "1"}}
	open, ok := driver.LookupScheme("nbd")
	if !ok {
		t.Fatal("no nbd scheme")
	}
	st, _, err := open(context.Background(), url, env)
	if err != nil {
		t.Fatal(err)
	}
	disktest.CheckStorageCloser(t, st, url, live)
}
