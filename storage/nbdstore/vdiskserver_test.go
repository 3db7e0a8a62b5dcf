package nbdstore_test

import (
	"bytes"
	"context"
	"net"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/nbd"
	"github.com/vdisk/vdisk/storage/memfs"
	"github.com/vdisk/vdisk/storage/nbdstore"
)

// TestOwnServer opens an export of vdisk's own NBD server, which takes
// extended headers: reads, writes, zeroes and the map go over 32-byte
// headers and BLOCK_STATUS_EXT.
func TestOwnServer(t *testing.T) {
	st := memfs.New()
	d, err := vdisk.Create(context.Background(), "/d.qcow2", &vdisk.CreateOptions{Format: "qcow2", Size: 32 << 20, Storage: st})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, err := d.WriteAt(pattern(1<<20, 7), 4<<20); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	srv := &nbd.Server{Persistent: true, Exports: []*nbd.Export{{Name: "d", Disk: d}}}
	go func() { done <- srv.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	url := "nbd+unix:///d?socket=" + sock
	s, err := nbdstore.New(url, nil)
	if err != nil {
		t.Fatal(err)
	}
	f, err := s.Open(url, driver.ReadWrite)
	if err != nil {
		t.Fatal(err)
	}
	nf := f.(*nbdstore.File)
	if !nf.Extended() {
		t.Fatal("extended headers were not negotiated with vdisk's server")
	}
	f.Close()

	r := openRaw(t, url, false, nil)
	if _, err := r.WriteAt([]byte("hello"), 10<<20+3); err != nil {
		t.Fatal(err)
	}
	if err := r.WriteZeroes(4<<20+4096, 8192, true); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 32<<20)
	copy(want[4<<20:], pattern(1<<20, 7))
	clear(want[4<<20+4096 : 4<<20+12288])
	copy(want[10<<20+3:], "hello")
	if got := readAll(t, r); !bytes.Equal(got, want) {
		t.Fatalf("differs at %d", firstDiff(got, want))
	}
	var data int64
	r.Map(context.Background(), 0, r.Size(), func(e vdisk.Extent) error {
		if e.State == driver.Data {
			data += e.Length
		}
		return nil
	})
	if data == 0 || data > 2<<20 {
		t.Fatalf("map over extended block status: %d data bytes", data)
	}
}
