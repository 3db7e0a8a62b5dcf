package qcow2_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/klauspost/compress/flate"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// smallImage builds a small valid image (512-byte clusters, 1 MiB) with a
// little data and returns its bytes. Layout: header 0, refcount table
// 512, refcount block 1024, L1 1536, then the first L2 table at 2048 and
// data.
func smallImage(t testing.TB, opts ...string) []byte {
	t.Helper()
	st := memfs.New()
	d, err := vdisk.Create(ctx, "/s.qcow2", &vdisk.CreateOptions{Format: "qcow2", Size: 1 << 20, Storage: st,
		Options: disktest.KVs(append([]string{"cluster_size=512"}, opts...)...)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.WriteAt(bytes.Repeat([]byte{0xab}, 1536), 512); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := st.ReadFile("/s.qcow2")
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// openBytes opens b as a qcow2 image, reads it all, checks it and writes
// to it; it returns the first error and never panics.
func openBytes(t testing.TB, b []byte, write bool) (err error) {
	st := memfs.New()
	if err := st.WriteFile("/h.qcow2", b); err != nil {
		t.Fatal(err)
	}
	d, err := vdisk.Open(ctx, "/h.qcow2", &vdisk.OpenOptions{Format: "qcow2", Storage: st, ReadOnly: !write, NoBacking: true})
	if err != nil {
		return err
	}
	defer func() {
		if cerr := d.Close(); err == nil {
			err = cerr
		}
	}()
	_ = d.Top().Info()
	_ = d.Top().ParentRef()
	size := d.Size()
	buf := make([]byte, 64<<10)
	off := int64(0)
	for i := 0; i < 64 && off < size; i++ {
		st, err := d.Status(off, size-off)
		if err != nil {
			return err
		}
		n := min(st.Length, int64(len(buf)))
		if _, err := d.ReadAt(buf[:n], off); err != nil {
			return err
		}
		off += st.Length
	}
	if _, err := d.Check(ctx, driver.RepairNone); err != nil {
		return err
	}
	if write && size > 0 {
		if _, err := d.WriteAt(bytes.Repeat([]byte{1}, int(min(4096, size))), 0); err != nil {
			return err
		}
		if err := d.Flush(); err != nil {
			return err
		}
	}
	return nil
}

func TestHostileHeaders(t *testing.T) {
	good := smallImage(t)
	if err := openBytes(t, good, true); err != nil {
		t.Fatalf("the unmodified image fails: %v", err)
	}
	be32 := func(b []byte, off int, v uint32) { binary.BigEndian.PutUint32(b[off:], v) }
	be64 := func(b []byte, off int, v uint64) { binary.BigEndian.PutUint64(b[off:], v) }
	// Offsets of the tables in the small image.
	const (
		l1Off  = 1536
		l2Off  = 2048
		rbOff  = 1024
		rtOff  = 512
		hdrLen = 100
	)
	cases := []struct {
		name   string
		mutate func(b []byte) []byte
		want   error  // sentinel
		substr string // in the message
		write  bool
	}{
		{"bad magic", func(b []byte) []byte { b[0] = 'X'; return b }, driver.ErrCorrupt, "magic", false},
		{"version 1", func(b []byte) []byte { be32(b, 4, 1); return b }, driver.ErrUnsupported, "version", false},
		{"version 4", func(b []byte) []byte { be32(b, 4, 4); return b }, driver.ErrUnsupported, "version", false},
		{"cluster_bits 8", func(b []byte) []byte { be32(b, 20, 8); return b }, driver.ErrCorrupt, "cluster_bits", false},
		{"cluster_bits 22", func(b []byte) []byte { be32(b, 20, 22); return b }, driver.ErrCorrupt, "cluster_bits", false},
		{"cluster_bits huge", func(b []byte) []byte { be32(b, 20, 0xffffffff); return b }, driver.ErrCorrupt, "cluster_bits", false},
		{"size huge", func(b []byte) []byte { be64(b, 24, 1<<63); return b }, driver.ErrCorrupt, "size", false},
		{"size needs a huge L1", func(b []byte) []byte { be64(b, 24, 1<<50); return b }, driver.ErrUnsupported, "L1", false},
		{"L1 size overflow", func(b []byte) []byte { be32(b, 36, 0xffffffff); return b }, driver.ErrCorrupt, "L1", false},
		{"L1 too small", func(b []byte) []byte { be32(b, 36, 1); return b }, driver.ErrCorrupt, "too small", false},
		{"L1 past EOF", func(b []byte) []byte { be64(b, 40, 1<<40); return b }, driver.ErrCorrupt, "L1 table", false},
		{"L1 misaligned", func(b []byte) []byte { be64(b, 40, l1Off+8); return b }, driver.ErrCorrupt, "aligned", false},
		{"refcount table past EOF", func(b []byte) []byte { be64(b, 48, 1<<30); return b }, driver.ErrCorrupt, "refcount table", false},
		{"refcount table huge", func(b []byte) []byte { be32(b, 56, 0xffffffff); return b }, driver.ErrCorrupt, "refcount table", false},
		{"no refcount table", func(b []byte) []byte { be32(b, 56, 0); return b }, driver.ErrCorrupt, "refcount table", false},
		{"refcount_order 7", func(b []byte) []byte { be32(b, 96, 7); return b }, driver.ErrCorrupt, "refcount_order", false},
		{"header_length odd", func(b []byte) []byte { be32(b, hdrLen, 105); return b }, driver.ErrCorrupt, "header_length", false},
		{"header_length short", func(b []byte) []byte { be32(b, hdrLen, 96); return b }, driver.ErrCorrupt, "header_length", false},
		{"header_length huge", func(b []byte) []byte { be32(b, hdrLen, 4096); return b }, driver.ErrCorrupt, "header_length", false},
		{"unknown incompatible bit", func(b []byte) []byte { b[72+7] |= 1 << 5; return b }, driver.ErrUnsupported, "bit 5", false},
		{"unknown incompatible bit 63", func(b []byte) []byte { b[72] |= 0x80; return b }, driver.ErrUnsupported, "bit 63", false},
		{"AES without a key", func(b []byte) []byte { be32(b, 32, 1); return b }, driver.ErrInvalidOption, "encrypt.key-secret", false},
		{"LUKS without its header", func(b []byte) []byte { be32(b, 32, 2); return b }, driver.ErrCorrupt, "encryption header", false},
		{"encryption method 3", func(b []byte) []byte { be32(b, 32, 3); return b }, driver.ErrUnsupported, "encryption method", false},
		{"compression bit without type", func(b []byte) []byte { b[72+7] |= 1 << 3; return b }, driver.ErrCorrupt, "compression", false},
		{"compression type 2", func(b []byte) []byte { b[72+7] |= 1 << 3; b[104] = 2; return b }, driver.ErrUnsupported, "compression type", false},
		{"extended L2 with 512-byte clusters", func(b []byte) []byte { b[72+7] |= 1 << 4; return b }, driver.ErrCorrupt, "extended L2", false},
		{"raw data bit without data file", func(b []byte) []byte { b[88+7] |= 2; return b }, driver.ErrCorrupt, "raw external data", false},
		{"backing name past the cluster", func(b []byte) []byte { be64(b, 8, 500); be32(b, 16, 100); return b }, driver.ErrCorrupt, "", false},
		{"backing name too long", func(b []byte) []byte { be64(b, 8, 200); be32(b, 16, 5000); return b }, driver.ErrCorrupt, "", false},
		{"extension overflow", func(b []byte) []byte { be32(b, 112+4, 0xfffffff0); return b }, driver.ErrCorrupt, "extension", false},
		{"snapshots count huge", func(b []byte) []byte { be32(b, 60, 0xffffffff); return b }, driver.ErrCorrupt, "snapshots", false},
		{"snapshot table past EOF", func(b []byte) []byte { be32(b, 60, 1); be64(b, 64, 1<<30); return b }, driver.ErrCorrupt, "snapshot table", false},
		{"snapshot entry past EOF", func(b []byte) []byte {
			be32(b, 60, 1)
			be64(b, 64, l2Off)
			be32(b, l2Off+36, 2000) // extra data size
			return b
		}, driver.ErrCorrupt, "snapshot", false},
		{"L1 entry past EOF", func(b []byte) []byte { be64(b, l1Off, 1<<40|1<<63); return b }, driver.ErrCorrupt, "L2 table", false},
		{"L2 entry past EOF", func(b []byte) []byte { be64(b, l2Off+8, 1<<40|1<<63); return b }, driver.ErrCorrupt, "past the end", false},
		{"compressed past EOF", func(b []byte) []byte { be64(b, l2Off+8, 1<<62|1<<30); return b }, driver.ErrCorrupt, "outside the file", false},
		{"compressed garbage", func(b []byte) []byte { be64(b, l2Off+8, 1<<62|uint64(l1Off)); return b }, driver.ErrCorrupt, "decompress", false},
		{"refcount block past EOF", func(b []byte) []byte { be64(b, rtOff, 1<<40); return b }, driver.ErrCorrupt, "refcount block", true},
		{"data over the L1 table", func(b []byte) []byte { be64(b, l2Off, l1Off|1<<63); return b }, driver.ErrCorrupt, "metadata", true},
		{"L2 table is a refcount block", func(b []byte) []byte { be64(b, l1Off, rbOff|1<<63); return b }, nil, "", true},
		{"L2 table is the L1 table", func(b []byte) []byte { be64(b, l1Off, l1Off|1<<63); return b }, nil, "", true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := c.mutate(append([]byte(nil), good...))
			err := openBytes(t, b, c.write)
			if c.want == nil {
				return // anything but a panic
			}
			if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.substr) {
				t.Fatalf("err = %v; want %v containing %q", err, c.want, c.substr)
			}
		})
	}
}

// TestFeatureNameInError: an unknown incompatible feature is named from
// the image's feature name table.
func TestFeatureNameInError(t *testing.T) {
	b := smallImage(t, "cluster_size=4k")
	// Find the feature table extension and add an entry for bit 9.
	off := int(binary.BigEndian.Uint32(b[100:]))
	for {
		typ := binary.BigEndian.Uint32(b[off:])
		n := int(binary.BigEndian.Uint32(b[off+4:]))
		if typ == 0 {
			t.Fatal("no feature table")
		}
		if typ == 0x6803f857 {
			e := b[off+8 : off+8+48]
			e[0], e[1] = 0, 9
			copy(e[2:], "time travel\x00\x00\x00\x00\x00\x00")
			break
		}
		off += 8 + (n+7)&^7
	}
	b[72+6] |= 1 << 1 // bit 9
	err := openBytes(t, b, false)
	if !errors.Is(err, driver.ErrUnsupported) || !strings.Contains(err.Error(), "time travel") {
		t.Fatalf("err = %v", err)
	}
}

// TestZipBomb: a compressed cluster whose stream inflates far beyond a
// cluster reads as its first cluster; a truncated one is corrupt.
func TestZipBomb(t *testing.T) {
	b := smallImage(t)
	var z bytes.Buffer
	w, _ := flate.NewWriter(&z, 9)
	w.Write(make([]byte, 8<<20))
	w.Close()
	bomb := z.Bytes()
	at := len(b)
	b = append(b, bomb...)
	for len(b)%512 != 0 {
		b = append(b, 0)
	}
	// 512-byte clusters: the sector count field is 1 bit; point at the
	// first bytes of the bomb (one or two sectors).
	binary.BigEndian.PutUint64(b[2048+8:], 1<<62|uint64(at)|1<<61)
	st := memfs.New()
	st.WriteFile("/z.qcow2", b)
	d, err := vdisk.Open(ctx, "/z.qcow2", &vdisk.OpenOptions{Format: "qcow2", Storage: st, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	got := make([]byte, 512)
	if _, err := d.ReadAt(got, 512); err != nil {
		t.Fatalf("bomb cluster: %v", err)
	}
	if !bytes.Equal(got, make([]byte, 512)) {
		t.Fatal("bomb cluster does not read its first cluster of zeros")
	}
}

// compressedSeed is a small image with compressed clusters.
func compressedSeed(t testing.TB) []byte {
	st := memfs.New()
	d, err := vdisk.Create(ctx, "/c.qcow2", &vdisk.CreateOptions{Format: "qcow2", Size: 64 << 10, Storage: st, Options: disktest.KVs("cluster_size=512")})
	if err != nil {
		t.Fatal(err)
	}
	writeCompressed(t, d, compressibleData(4096))
	d.Close()
	b, _ := st.ReadFile("/c.qcow2")
	return b
}

// snapshotSeed is a small image with an internal snapshot.
func snapshotSeed(t testing.TB) []byte {
	st := memfs.New()
	d, err := vdisk.Create(ctx, "/n.qcow2", &vdisk.CreateOptions{Format: "qcow2", Size: 64 << 10, Storage: st, Options: disktest.KVs("cluster_size=512")})
	if err != nil {
		t.Fatal(err)
	}
	d.WriteAt(bytes.Repeat([]byte{7}, 1000), 100)
	if err := snapshotter(t, d).CreateSnapshot("s"); err != nil {
		t.Fatal(err)
	}
	d.WriteAt(bytes.Repeat([]byte{8}, 100), 300)
	d.Close()
	b, _ := st.ReadFile("/n.qcow2")
	return b
}

// TestMisalignedEntries: L1 and L2 entries not aligned to a cluster are
// corrupt, for reads and writes.
func TestMisalignedEntries(t *testing.T) {
	good := smallImage(t, "cluster_size=4k")
	for _, c := range []struct {
		name string
		at   func(r *rawImage) int64
	}{
		{"L1", func(r *rawImage) int64 { return r.l1Off() }},
		{"L2", func(r *rawImage) int64 { return r.l2EntryOff(0) }},
	} {
		for _, write := range []bool{false, true} {
			r := &rawImage{t: t, b: append([]byte(nil), good...)}
			off := c.at(r)
			r.put64(off, r.u64(off)+512)
			err := openBytes(t, r.b, write)
			if !errors.Is(err, driver.ErrCorrupt) || !strings.Contains(err.Error(), "aligned") {
				t.Fatalf("%s entry misaligned (write %v): err = %v", c.name, write, err)
			}
		}
	}
}
