package s3

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/minio/minio-go/v7"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// TestSequentialReadFetchesOnce: read-ahead fetches each block once, and
// a second pass within the cache fetches nothing.
func TestSequentialReadFetchesOnce(t *testing.T) {
	s := startServer(t)
	data := randBytes(8, 8<<20)
	s.put("c/seq.raw", data)
	st := s.storage("block-size", "1M", "cache-blocks", "16", "read-ahead", "4")
	f, err := st.Open("c/seq.raw", driver.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s.dial.reset()
	buf := make([]byte, 256<<10)
	for off := int64(0); off < int64(len(data)); off += int64(len(buf)) {
		if _, err := f.ReadAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	gets, in := s.dial.gets.Load(), s.dial.bytesIn.Load()
	t.Logf("8 MiB in 256 KiB reads: %d GETs, %d bytes in", gets, in)
	if gets != 8 || in < int64(len(data)) || in > int64(len(data))+8*4096 {
		t.Fatalf("%d GETs, %d bytes fetched for 8 blocks", gets, in)
	}
	s.dial.reset()
	for off := int64(0); off < int64(len(data)); off += int64(len(buf)) {
		f.ReadAt(buf, off)
	}
	if g := s.dial.gets.Load(); g != 0 {
		t.Fatalf("second pass within the cache: %d GETs", g)
	}
}

// TestSparseQcow2FetchesOnlyAllocated: reading a whole sparse qcow2 base
// from S3 fetches its metadata and allocated clusters, not its virtual
// size.
func TestSparseQcow2FetchesOnlyAllocated(t *testing.T) {
	t.Parallel()
	qemutest.Require(t, "qemu-img", "qemu-io")
	s := startServer(t)
	local := filepath.Join(t.TempDir(), "base.qcow2")
	qemutest.Create(t, "qcow2", local, "1G")
	var cmds []string
	for i, off := range []string{"0", "64k", "100M", "333M", "512M", "700M", "1000M", "1023M"} {
		cmds = append(cmds, fmt.Sprintf("write -P %d %s 64k", 0x61+i, off))
	}
	qemutest.IO(t, "qcow2", local, cmds...)
	fi, err := os.Stat(local)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.client(testAccess, testSecret).FPutObject(context.Background(), testBucket, "c/base.qcow2", local, minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	s.dial.reset()
	d, err := vdisk.Open(ctx, s3url("c/base.qcow2"), &vdisk.OpenOptions{ReadOnly: true, Dialer: s.dial.Dial, StorageOptions: s.opts("block-size", "64K", "read-ahead", "0")})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if f := d.Top().Format.Name; f != "qcow2" {
		t.Fatalf("probed %s", f)
	}
	ld, err := vdisk.Open(ctx, local, &vdisk.OpenOptions{Format: "qcow2", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ld.Close()
	res, err := vdisk.Compare(ctx, ld, d, nil)
	if err != nil || !res.Identical {
		t.Fatalf("compare: %+v %v", res, err)
	}
	gets, in := s.dial.gets.Load(), s.dial.bytesIn.Load()
	clusters := fi.Size() / (64 << 10)
	t.Logf("1 GiB virtual, %d-byte file (%d clusters): %d GETs, %d bytes fetched", fi.Size(), clusters, gets, in)
	// Every GET is one 64 KiB block; the file holds the header, L1,
	// refcount table and block, L2 tables and the 8 data clusters. The
	// probe and the open read the header cluster each (two files).
	if gets > clusters+1 || in > fi.Size()+64<<10+gets*4096+16384 {
		t.Fatalf("fetched %d bytes in %d GETs from a %d-byte file", in, gets, fi.Size())
	}
}
