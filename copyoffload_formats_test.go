package vdisk_test

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// convertToRaw converts the disk src into a new raw file out and returns
// the stats.
func convertToRaw(t *testing.T, src *vdisk.Disk, out string, o vdisk.ConvertOptions) vdisk.ConvertStats {
	t.Helper()
	return convertInto(t, src, out, vdisk.CreateOptions{Format: "raw"}, o)
}

// convertInto converts the disk src into a new image out, created with co
// (its size src's), and returns the stats, checked to add up.
func convertInto(t *testing.T, src *vdisk.Disk, out string, co vdisk.CreateOptions, o vdisk.ConvertOptions) vdisk.ConvertStats {
	t.Helper()
	co.Size = src.Size()
	dst, err := vdisk.Create(ctx, out, &co)
	if err != nil {
		t.Fatal(err)
	}
	var st vdisk.ConvertStats
	o.Stats = &st
	err = vdisk.Convert(ctx, dst, src, &o)
	if cerr := dst.CloseUnsynced(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	if st.Written+st.Offloaded+st.Zero+st.Skipped != src.Size() {
		t.Fatalf("stats %+v do not add up to the size %d", st, src.Size())
	}
	if st.Reflinked > st.Offloaded || st.Reflinked < 0 {
		t.Fatalf("stats %+v: reflinked is not part of offloaded", st)
	}
	return st
}

// allocatedFiles is the allocation of an image's files: name and the
// extent and data files named after it.
func allocatedFiles(t *testing.T, name string) int64 {
	base := strings.TrimSuffix(name, filepath.Ext(name))
	files, err := filepath.Glob(base + "*")
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, f := range files {
		if f == name || !strings.HasSuffix(f, ".raw") && (strings.HasPrefix(f, base+"-") || strings.HasPrefix(f, name+".")) {
			n += allocated(t, f)
		}
	}
	return n
}

// qemuSecret is the passphrase of the encrypted sources.
const qemuSecret = "offload-pass"

// convertSource makes, with qemu-img convert, an image of format fmt (with
// create options opts) holding the raw file's content.
func convertSource(t *testing.T, raw, fmt_, name string, opts ...string) {
	t.Helper()
	args := []string{"convert", "-q", "-f", "raw", "-O", fmt_}
	joined := strings.Join(opts, ",")
	if strings.Contains(joined, "key-secret") {
		args = append(args, "--object", "secret,id=sec0,data="+qemuSecret)
	}
	if joined != "" {
		args = append(args, "-o", joined)
	}
	if fmt_ == "qcow2" && strings.Contains(joined, "compression_type") {
		args = append(args, "-c")
	}
	qemutest.Img(t, append(args, raw, name)...)
}

// TestConvertOffloadFormats: every format whose data is stored byte for
// byte in a file (fixed and dynamic VHD and VDI, flat and hosted-sparse
// VMDK extents, qcow2 data clusters, in the image file or an external data
// file) converts to raw with every data byte copied by the kernel (none
// read or written by vdisk), the output identical to the source and to
// the read/write path's output; where the data is not stored verbatim
// (compressed qcow2 clusters, streamOptimized grains, encrypted clusters,
// LUKS) nothing is offloaded and everything is read and written.
func TestConvertOffloadFormats(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	rawName, data := offloadSource(t, dir)
	secret := []driver.KV{{Key: "encrypt.key-secret", Value: "sec0"}}
	luksSecret := []driver.KV{{Key: "key-secret", Value: "sec0"}}
	for _, c := range []struct {
		name, format string
		opts         []string
		open         []driver.KV
		offload      bool
	}{
		{"vpc-dynamic", "vpc", []string{"subformat=dynamic"}, nil, true},
		{"vpc-fixed", "vpc", []string{"subformat=fixed"}, nil, true},
		{"vdi-dynamic", "vdi", nil, nil, true},
		{"vdi-static", "vdi", []string{"static=on"}, nil, true},
		{"vmdk-monolithicSparse", "vmdk", nil, nil, true},
		{"vmdk-monolithicFlat", "vmdk", []string{"subformat=monolithicFlat"}, nil, true},
		{"vmdk-twoGbMaxExtentFlat", "vmdk", []string{"subformat=twoGbMaxExtentFlat"}, nil, true},
		{"vmdk-twoGbMaxExtentSparse", "vmdk", []string{"subformat=twoGbMaxExtentSparse"}, nil, true},
		{"qcow2", "qcow2", nil, nil, true},
		{"qcow2-4k-clusters", "qcow2", []string{"cluster_size=4096"}, nil, true},
		{"qcow2-extended-l2", "qcow2", []string{"extended_l2=on"}, nil, true},
		{"qcow2-data-file", "qcow2", []string{"data_file=DATA", "data_file_raw=on"}, nil, true},
		{"qcow2-compressed", "qcow2", []string{"compression_type=zlib"}, nil, false},
		{"vmdk-streamOptimized", "vmdk", []string{"subformat=streamOptimized"}, nil, false},
		{"qcow2-luks", "qcow2", []string{"encrypt.format=luks", "encrypt.key-secret=sec0", "encrypt.iter-time=50"}, secret, false},
		{"luks", "luks", []string{"key-secret=sec0", "iter-time=50"}, luksSecret, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			name := filepath.Join(dir, c.name+"."+c.format)
			opts := append([]string(nil), c.opts...)
			for i, o := range opts {
				opts[i] = strings.Replace(o, "DATA", name+".data", 1)
			}
			convertSource(t, rawName, c.format, name, opts...)
			sm := &driver.SecretMap{}
			sm.Set("sec0", []byte(qemuSecret))
			open := func() *vdisk.Disk {
				d, err := vdisk.Open(ctx, name, &vdisk.OpenOptions{Format: c.format, ReadOnly: true, Options: c.open, Secrets: sm})
				if err != nil {
					t.Fatal(err)
				}
				return d
			}
			runs := []bool{true, false}
			if !c.offload {
				runs = runs[:1] // (one is enough to see nothing offloaded; LUKS is slow)
			}
			for _, seq := range runs {
				src := open()
				out := filepath.Join(dir, fmt.Sprintf("%s-%v.raw", c.name, seq))
				st := convertToRaw(t, src, out, vdisk.ConvertOptions{Sequential: seq, Workers: 4, ChunkSize: 1 << 20})
				src.Close()
				if c.offload {
					// Every data byte went through the kernel; some formats
					// store a little more than the source's data runs (whole
					// clusters), never less.
					if st.Offloaded < data || st.Written != 0 || st.Read != 0 {
						t.Fatalf("sequential=%v: stats %+v; want at least %d offloaded and nothing read or written", seq, st, data)
					}
				} else if st.Offloaded != 0 || st.Written < data || st.Read < st.Written {
					t.Fatalf("sequential=%v: stats %+v; want nothing offloaded and at least %d written", seq, st, data)
				}
				if !qemutest.Compare(t, "raw", rawName, "raw", out) {
					t.Fatalf("sequential=%v: qemu-img compare: the output differs from the source", seq)
				}
				// Holes and unallocated runs stay holes; zeros the source
				// stores as data (a block's padding) are copied as stored.
				// (A VHD's data area is not 4 KiB-aligned in its file:
				// the zero fragments at a run's ends must not be copied.)
				if a, b := allocatedFiles(t, name), allocated(t, out); c.offload && b > a {
					t.Fatalf("sequential=%v: output allocates %d bytes, the source files %d", seq, b, a)
				}
			}
			if !c.offload {
				return
			}
			// The read/write path gives the same output.
			src := open()
			defer src.Close()
			out := filepath.Join(dir, c.name+"-nooffload.raw")
			st := convertToRaw(t, src, out, vdisk.ConvertOptions{Sequential: true, NoOffload: true})
			if st.Offloaded != 0 {
				t.Fatalf("NoOffload: stats %+v", st)
			}
			if !qemutest.Compare(t, "raw", filepath.Join(dir, c.name+"-true.raw"), "raw", out) {
				t.Fatal("qemu-img compare: offload and read/write outputs differ")
			}
		})
	}
}

// TestConvertOffloadChain: a qcow2 top over a shorter parent. The top's
// clusters are copied from the top's file; the runs the top does not hold
// fall through to the parent and are copied from the parent's file where
// it stores them verbatim (raw), but read and written where it does not
// (compressed qcow2); past the end of the short parent nothing is copied
// (zeros). The output is identical to qemu-img's view of the chain.
func TestConvertOffloadChain(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	for _, c := range []struct {
		name, format string
		compress     bool
	}{
		{"raw-parent", "raw", false},
		{"compressed-parent", "qcow2", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			praw := filepath.Join(dir, c.name+"-parent.raw")
			qemutest.Create(t, "raw", praw, "32M")
			qemutest.IO(t, "raw", praw, "write -P 0x41 0 4M", "write -P 0x42 8M 1M", "write -P 0x43 30M 2M")
			parent := praw
			if c.compress {
				parent = filepath.Join(dir, c.name+"-parent.qcow2")
				qemutest.Img(t, "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", praw, parent)
			}
			top := filepath.Join(dir, c.name+"-top.qcow2")
			qemutest.Create(t, "qcow2", top, "64M", "backing_file="+filepath.Base(parent), "backing_fmt="+c.format)
			// Top data: inside the parent, across its end, past it.
			qemutest.IO(t, "qcow2", top, "write -P 0x51 1M 1M", "write -P 0x52 31M 2M", "write -P 0x53 40M 64k")
			const topData = 1<<20 + 2<<20 + 64<<10
			// The parent shows through at 0-1M, 2-4M, 8-9M, 30-31M.
			const parentData = 1<<20 + 2<<20 + 1<<20 + 1<<20
			src, err := vdisk.Open(ctx, top, &vdisk.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer src.Close()
			if len(src.Layers()) != 2 {
				t.Fatalf("%d layers, want 2", len(src.Layers()))
			}
			out := filepath.Join(dir, c.name+".raw")
			st := convertToRaw(t, src, out, vdisk.ConvertOptions{Sequential: true, Workers: 4})
			want := vdisk.ConvertStats{Offloaded: topData + parentData, Zero: src.Size() - topData - parentData}
			if c.compress {
				want = vdisk.ConvertStats{Read: parentData, Written: parentData, Offloaded: topData, Zero: src.Size() - topData - parentData}
			}
			st.Elapsed, want.Elapsed = 0, 0
			if st != want {
				t.Fatalf("stats %+v, want %+v", st, want)
			}
			if !qemutest.Compare(t, "qcow2", top, "raw", out) {
				t.Fatal("qemu-img compare: the output differs from the chain")
			}
		})
	}
}

// TestVDIPinExtents: while a VDI image is pinned for a copy, a discard
// elsewhere (which packs the data blocks, moving others) waits; it runs
// once the pin is released.
func TestVDIPinExtents(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	name := filepath.Join(dir, "pin.vdi")
	qemutest.Create(t, "vdi", name, "8M")
	qemutest.IO(t, "vdi", name, "write -P 0x61 0 1M", "write -P 0x62 1M 1M", "write -P 0x63 7M 1M")
	d, err := vdisk.Open(ctx, name, &vdisk.OpenOptions{Format: "vdi"})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	p, ok := vdisk.As[vdisk.ExtentPinner](d.Top())
	if !ok {
		t.Fatal("the VDI image is not an ExtentPinner")
	}
	fe, ok := vdisk.As[vdisk.FileExtenter](d.Top())
	if !ok {
		t.Fatal("the VDI image is not a FileExtenter")
	}
	unpin := p.PinExtents()
	_, before, _, _, err := fe.FileExtent(7<<20, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- d.Discard(0, 1<<20) }()
	select {
	case err := <-done:
		unpin()
		t.Fatalf("the discard ran while the extents were pinned (%v)", err)
	case <-time.After(200 * time.Millisecond):
	}
	unpin()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	unpin = p.PinExtents()
	_, after, _, _, err := fe.FileExtent(7<<20, 1<<20)
	unpin()
	if err != nil {
		t.Fatal(err)
	}
	if after == before {
		t.Fatalf("block at 7M still at file offset %d after the discard packed the file; the test proves nothing", after)
	}
}
