package nbdstore_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/nbdstore"
)

var sparseWrites = [][2]int64{
	{0, 64 << 10},
	{1<<20 + 512, 128<<10 + 3*512},
	{5 << 20, 1 << 20},
	{20<<20 - 4096, 4096},
	{31 << 20, 1 << 20},
}

// TestReadQemuWritten reads through vdisk, over qemu-nbd, what qemu-io
// wrote into a qcow2.
func TestReadQemuWritten(t *testing.T) {
	dir := t.TempDir()
	file, want := sparseQcow2(t, dir, 32<<20, sparseWrites)
	_, url := qemuNBD(t, "qcow2", file, "-r")
	d := openRaw(t, url, true, nil)
	if d.Size() != 32<<20 {
		t.Fatalf("size %d", d.Size())
	}
	got := readAll(t, d)
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("first difference at %d: got %#x want %#x", i, got[i], want[i])
	}
	// Unaligned small reads.
	for _, off := range []int64{1, 511, 1<<20 + 511, 20<<20 - 4097, 32<<20 - 3} {
		b := make([]byte, 3)
		if _, err := d.ReadAt(b, off); err != nil {
			t.Fatal(err)
		}
		if string(b) != string(want[off:off+3]) {
			t.Fatalf("read at %d: %x want %x", off, b, want[off:off+3])
		}
	}
}

// TestWriteReadByQemu writes through vdisk over qemu-nbd and checks the
// qcow2 with qemu-io and qemu-img after the server stops.
func TestWriteReadByQemu(t *testing.T) {
	dir := t.TempDir()
	file, want := sparseQcow2(t, dir, 16<<20, nil)
	srv, url := qemuNBD(t, "qcow2", file)
	d := openRaw(t, url, false, nil)
	writes := []struct {
		off int64
		n   int
		pat byte
	}{{0, 4096, 0}, {4096*3 + 7, 10000, 0xb2}, {1<<20 - 1, 2, 0xc3}, {3 << 20, 3 << 20, 0xd4}, {16<<20 - 100, 100, 0xe5}}
	for i, w := range writes {
		b := pattern(w.n, w.pat)
		if i == 0 {
			b = bytes.Repeat([]byte{0xa1}, w.n) // for qemu-io read -P
		}
		if _, err := d.WriteAt(b, w.off); err != nil {
			t.Fatal(err)
		}
		copy(want[w.off:], b)
	}
	// Zeroes and discards through the NBD file.
	if err := d.WriteZeroes(4<<20, 1<<20, false); err != nil {
		t.Fatal(err)
	}
	clear(want[4<<20 : 5<<20])
	if err := d.WriteZeroes(5<<20+3, 8000, true); err != nil {
		t.Fatal(err)
	}
	clear(want[5<<20+3 : 5<<20+8003])
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, d); firstDiff(got, want) >= 0 {
		t.Fatalf("read back through vdisk differs at %d", firstDiff(got, want))
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	srv.kill()
	qemutest.IO(t, "qcow2", file, "read -P 0xa1 0 4096", "read -P 0 4194304 1048576")
	qemutest.Check(t, "qcow2", file)
	ref := filepath.Join(dir, "want.raw")
	if err := writeFile(ref, want); err != nil {
		t.Fatal(err)
	}
	if !qemutest.Compare(t, "qcow2", file, "raw", ref) {
		t.Fatal("qemu-img compare: the qcow2 served over NBD differs from what vdisk wrote")
	}
}

// TestMapMatchesQemu compares vdisk.Map over NBD with qemu-img map on the
// same export.
func TestMapMatchesQemu(t *testing.T) {
	dir := t.TempDir()
	file, _ := sparseQcow2(t, dir, 32<<20, sparseWrites)
	_, url := qemuNBD(t, "qcow2", file, "-r")
	var qm []qemutest.MapEntry
	out := qemutest.Img(t, "map", "--output=json", "-f", "raw", url)
	if err := json.Unmarshal([]byte(out), &qm); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	d := openRaw(t, url, true, nil)
	var ours []vdisk.Extent
	if err := d.Map(context.Background(), 0, d.Size(), func(e vdisk.Extent) error {
		ours = append(ours, e)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// Compare which bytes read as zeros per the map, at 512-byte grain.
	zeroQemu := map[int64]bool{}
	for _, e := range qm {
		for o := e.Start; o < e.Start+e.Length; o += 512 {
			zeroQemu[o] = e.Zero
		}
	}
	var data int64
	for _, e := range ours {
		for o := e.Start; o < e.Start+e.Length; o += 512 {
			z := e.State != driver.Data
			if z != zeroQemu[o] {
				t.Fatalf("offset %d: vdisk says %v, qemu-img map says zero=%v\nvdisk: %+v\nqemu: %s", o, e.State, zeroQemu[o], ours, out)
			}
		}
		if e.State == driver.Data {
			data += e.Length
		}
	}
	if data == 0 || data >= d.Size()/2 {
		t.Fatalf("map reports %d data bytes of %d", data, d.Size())
	}
	t.Logf("%d runs, %d data bytes", len(ours), data)
}

// TestStatusCache checks that a sequential scan of holes costs one block
// status request per reply, not per call.
func TestStatusCache(t *testing.T) {
	dir := t.TempDir()
	file, _ := sparseQcow2(t, dir, 32<<20, sparseWrites)
	_, url := qemuNBD(t, "qcow2", file, "-r")
	st, err := nbdstore.New(url, nil)
	if err != nil {
		t.Fatal(err)
	}
	f, err := st.Open(url, driver.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	nf := f.(*nbdstore.File)
	var runs int
	for off := int64(0); off < 32<<20; {
		d, err := nf.SeekData(off)
		if err != nil {
			break
		}
		h, err := nf.SeekHole(d)
		if err != nil {
			t.Fatal(err)
		}
		runs++
		off = h
	}
	if runs != len(sparseWrites)-1 && runs != len(sparseWrites) {
		t.Errorf("found %d data runs, want about %d", runs, len(sparseWrites))
	}
	if n := nf.StatusRequests(); n != 1 {
		t.Errorf("%d block status requests for a scan of %d runs; want 1 (the cache)", n, runs)
	}
}

// TestConvertSparse converts an NBD export to a local qcow2 and counts the
// bytes that came over the network: only the allocated data.
func TestConvertSparse(t *testing.T) {
	dir := t.TempDir()
	file, want := sparseQcow2(t, dir, 256<<20, [][2]int64{{0, 1 << 20}, {100 << 20, 2 << 20}, {200<<20 + 4096, 64 << 10}})
	_, url := qemuNBD(t, "qcow2", file, "-r")
	var read, conns atomic.Int64
	src := openRaw(t, url, true, &vdisk.OpenOptions{Dialer: countingDialer(&read, &conns)})
	dstName := filepath.Join(dir, "copy.qcow2")
	dst, err := vdisk.Create(context.Background(), dstName, &vdisk.CreateOptions{Format: "qcow2", Size: src.Size()})
	if err != nil {
		t.Fatal(err)
	}
	if err := vdisk.Convert(context.Background(), dst, src, nil); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
	allocated := int64(1<<20 + 2<<20 + 64<<10)
	t.Logf("read %d bytes over %d connections for %d allocated of %d", read.Load(), conns.Load(), allocated, len(want))
	if read.Load() > allocated+allocated/10+64<<10 {
		t.Errorf("read %d bytes over the network for %d allocated bytes", read.Load(), allocated)
	}
	qemutest.Check(t, "qcow2", dstName)
	if !qemutest.Compare(t, "qcow2", dstName, "qcow2", file) {
		t.Fatal("the converted copy differs from the source")
	}
}

// TestUnixSocket uses nbd+unix with a socket in the test's directory.
func TestUnixSocket(t *testing.T) {
	dir := t.TempDir()
	file, want := sparseQcow2(t, dir, 4<<20, [][2]int64{{1 << 20, 64 << 10}})
	sock := filepath.Join(dir, "s.sock")
	startServer(t, true, sock, "qemu-nbd", "-f", "qcow2", "-x", "disk one", "-k", sock, "-t", "--shared=16", "-D", "the first disk", file)
	url := "nbd+unix:///disk%20one?socket=" + sock
	d := openRaw(t, url, false, nil)
	if got := readAll(t, d); firstDiff(got, want) >= 0 {
		t.Fatalf("differs at %d", firstDiff(got, want))
	}
	if _, err := d.WriteAt([]byte("hello"), 3); err != nil {
		t.Fatal(err)
	}
	// The export list.
	open, _ := driver.LookupScheme("nbd+unix")
	st, _, err := open(context.Background(), url, nil)
	if err != nil {
		t.Fatal(err)
	}
	l, err := st.(driver.Lister).ListExports(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	if len(l) != 1 || l[0].Name != "disk one" || l[0].Description != "the first disk" || l[0].URL != url {
		t.Fatalf("exports %+v", l)
	}
	// A missing export is a clear not-found error.
	_, err = vdisk.Open(context.Background(), "nbd+unix:///nope?socket="+sock, &vdisk.OpenOptions{Format: "raw", ReadOnly: true})
	if !errors.Is(err, driver.ErrNotFound) || !strings.Contains(err.Error(), "nope") {
		t.Fatalf("missing export: %v", err)
	}
}

// TestReadOnlyExport refuses writes clearly.
func TestReadOnlyExport(t *testing.T) {
	dir := t.TempDir()
	file, _ := sparseQcow2(t, dir, 1<<20, nil)
	_, url := qemuNBD(t, "qcow2", file, "-r")
	_, err := vdisk.Open(context.Background(), url, &vdisk.OpenOptions{Format: "raw"})
	if !errors.Is(err, driver.ErrReadOnly) || !strings.Contains(err.Error(), url) {
		t.Fatalf("read-write open of a read-only export: %v", err)
	}
}

// TestMultiConn uses a pool of connections with nbdkit memory (which
// allows multi-conn) and one with qemu-nbd read-write (which does not).
func TestMultiConn(t *testing.T) {
	_, url := nbdkit(t, "memory", "64M")
	var read, conns atomic.Int64
	d := openRaw(t, url, false, &vdisk.OpenOptions{Dialer: countingDialer(&read, &conns)})
	buf := pattern(8<<20, 0x5a)
	if _, err := d.WriteAt(buf, 1<<20); err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 16)
	for i := range 16 {
		go func() {
			b := make([]byte, 512<<10)
			off := int64(1<<20 + i*512<<10)
			_, err := d.ReadAt(b, off)
			if err == nil && firstDiff(b, buf[i*512<<10:(i+1)*512<<10]) >= 0 {
				err = fmt.Errorf("wrong data at %d", off)
			}
			errc <- err
		}()
	}
	for range 16 {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	if c := conns.Load(); c != 4 {
		t.Errorf("%d connections to a multi-conn server, want 4", c)
	}

	dir := t.TempDir()
	file, _ := sparseQcow2(t, dir, 1<<20, nil)
	_, url2 := qemuNBD(t, "qcow2", file, "--shared=1")
	st, err := nbdstore.New(url2, nil)
	if err != nil {
		t.Fatal(err)
	}
	f, err := st.Open(url2, driver.ReadWrite)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if n := f.(*nbdstore.File).Connections(); n != 1 {
		t.Errorf("%d connections to qemu-nbd read-write, want 1", n)
	}
}

// TestURLs checks the URL forms and option errors.
func TestURLs(t *testing.T) {
	bad := []string{
		"nbd:///x",                    // no host
		"nbd+unix:///x",               // no socket
		"nbd+unix://host/x?socket=/s", // host with unix
		"nbd://h/x?socket=/s",         // unknown parameter
		"nbd://u:p@h/x",               // user
	}
	for _, u := range bad {
		if _, err := nbdstore.New(u, nil); !errors.Is(err, driver.ErrInvalidOption) {
			t.Errorf("%s: %v", u, err)
		}
	}
	if _, err := nbdstore.New("nbds://h/x", nil); !errors.Is(err, driver.ErrInvalidOption) {
		t.Errorf("nbds without credentials: %v", err)
	}
	_, err := nbdstore.New("nbds://h/x", &driver.SchemeEnv{Options: map[string]string{"tls-creds-psk": "k"}})
	if !errors.Is(err, driver.ErrUnsupported) || !strings.Contains(err.Error(), "6379") {
		t.Errorf("PSK: %v", err)
	}
	if _, err := nbdstore.New("nbd://h/x", &driver.SchemeEnv{Options: map[string]string{"multi-conn": "0"}}); !errors.Is(err, driver.ErrInvalidOption) {
		t.Errorf("multi-conn=0: %v", err)
	}
	for _, u := range []string{"nbd://h/x", "nbd://[::1]:99/a/b", "nbd+unix:///e?socket=/tmp/s", "nbds://h:1/"} {
		o := &driver.SchemeEnv{}
		if strings.HasPrefix(u, "nbds") {
			o.Options = map[string]string{"tls-creds": t.TempDir()}
			if _, err := nbdstore.New(u, o); err == nil || !strings.Contains(err.Error(), "CA certificate") {
				t.Errorf("%s with an empty creds dir: %v", u, err)
			}
			continue
		}
		if _, err := nbdstore.New(u, o); err != nil {
			t.Errorf("%s: %v", u, err)
		}
	}
}

// TestNoLeftoverConnections checks that open, stat and close leave no
// connection behind.
func TestNoLeftoverConnections(t *testing.T) {
	dir := t.TempDir()
	file, _ := sparseQcow2(t, dir, 1<<20, nil)
	_, url := qemuNBD(t, "qcow2", file)
	var read, conns atomic.Int64
	live := &disktest.LiveConns{}
	dial := countingDialer(&read, &conns)
	o := &vdisk.OpenOptions{Dialer: func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return live.Track(c), nil
	}}
	d := openRaw(t, url, false, o)
	readAll(t, d)
	if _, err := d.WriteAt([]byte{1}, 5); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if n := live.N(); n != 0 {
		t.Fatalf("%d connections open after Close (%d dialled)", n, conns.Load())
	}
	t.Logf("%d connections dialled", conns.Load())
}

// TestConvertToExport converts a local qcow2 into an NBD export (the
// target of `convert -n`), which qemu-img compare then reads over NBD.
func TestConvertToExport(t *testing.T) {
	dir := t.TempDir()
	file, _ := sparseQcow2(t, dir, 16<<20, [][2]int64{{0, 1 << 20}, {9<<20 + 512, 70000}})
	_, url := nbdkit(t, "memory", "16M")
	// Garbage the conversion must clear.
	pre := openRaw(t, url, false, nil)
	if _, err := pre.WriteAt(pattern(2<<20, 0xee), 4<<20); err != nil {
		t.Fatal(err)
	}
	pre.Close()
	src, err := vdisk.Open(context.Background(), file, &vdisk.OpenOptions{Format: "qcow2", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := vdisk.Create(context.Background(), url, &vdisk.CreateOptions{Format: "raw", Size: src.Size(), Overwrite: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := vdisk.Convert(context.Background(), dst, src, nil); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
	if !qemutest.Compare(t, "raw", url, "qcow2", file) {
		t.Fatal("qemu-img compare: the export differs from the converted qcow2")
	}
	// A target of another size is refused: exports do not resize.
	_, err = vdisk.Create(context.Background(), url, &vdisk.CreateOptions{Format: "raw", Size: 8 << 20, Overwrite: true})
	if !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("create of a smaller raw on a 16M export: %v", err)
	}
}
