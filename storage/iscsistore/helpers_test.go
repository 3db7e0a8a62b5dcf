package iscsistore_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	_ "github.com/vdisk/vdisk/format/qcow2"
	_ "github.com/vdisk/vdisk/format/raw"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/iscsi/iscsitest"
	_ "github.com/vdisk/vdisk/storage/iscsistore"
)

const testIQN = "iqn.2026-12.org.vdisk:test"

// newTarget starts tgtd with LUN 1 of size bytes (thin provisioned).
func newTarget(t *testing.T, size int64) (*iscsitest.Target, string) {
	t.Helper()
	tg := iscsitest.Start(t, testIQN)
	file := tg.AddLUN(1, size, true)
	return tg, file
}

func openRaw(t *testing.T, url string, o *vdisk.OpenOptions) *vdisk.Disk {
	t.Helper()
	if o == nil {
		o = &vdisk.OpenOptions{}
	}
	o.Format = "raw"
	d, err := vdisk.Open(context.Background(), url, o)
	if err != nil {
		t.Fatalf("open %s: %v", url, err)
	}
	return d
}

// qemuIO runs qemu-io on an iscsi:// URL (qemu's libiscsi driver).
func qemuIO(t *testing.T, url string, cmds ...string) string {
	t.Helper()
	qemutest.Require(t, "qemu-io")
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, url)
	out, code, err := qemutest.RunCode("qemu-io", args...)
	if err != nil || code != 0 || bytes.Contains([]byte(out), []byte("Pattern verification failed")) || bytes.Contains([]byte(out), []byte("failed")) {
		t.Fatalf("qemu-io %v: exit %d %v\n%s", args, code, err, out)
	}
	return out
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) ^ seed
	}
	return b
}

func readFile(t *testing.T, name string, off, n int64) []byte {
	t.Helper()
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

func secrets(kv ...string) *driver.SecretMap {
	s := &driver.SecretMap{}
	for i := 0; i+1 < len(kv); i += 2 {
		s.Set(kv[i], []byte(kv[i+1]))
	}
	return s
}

func mustEqual(t *testing.T, what string, got, want []byte) {
	t.Helper()
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && i < len(want) && got[i] == want[i] {
			i++
		}
		t.Fatalf("%s: differs at byte %d (len %d vs %d)", what, i, len(got), len(want))
	}
}

var _ = fmt.Sprintf
