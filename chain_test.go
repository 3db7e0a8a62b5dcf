package vdisk_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	_ "github.com/vdisk/vdisk/format/raw"
	"github.com/vdisk/vdisk/internal/model"
	_ "github.com/vdisk/vdisk/internal/testdrv"
	"github.com/vdisk/vdisk/storage/faultfs"
	"github.com/vdisk/vdisk/storage/memfs"
)

var ctx = context.Background()

func mustCreate(t testing.TB, st driver.Storage, name, format string, size int64, backing string) *vdisk.Disk {
	t.Helper()
	bf := ""
	if backing != "" {
		bf = "" // probe (never raw)
	}
	d, err := vdisk.Create(ctx, name, &vdisk.CreateOptions{Format: format, Size: size, Backing: backing, BackingFormat: bf, Storage: st})
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	return d
}

func TestModelRaw(t *testing.T) {
	st := memfs.New()
	const size = 8 << 20
	d := mustCreate(t, st, "/disk.raw", "raw", size, "")
	h := &model.Harness{
		Seed: 1, Ops: 10000, MaxIO: 128 << 10,
		Reopen: func(d *vdisk.Disk) (*vdisk.Disk, error) {
			if err := d.Close(); err != nil {
				return nil, err
			}
			return vdisk.Open(ctx, "/disk.raw", &vdisk.OpenOptions{Format: "raw", Storage: st})
		},
	}
	d = h.Run(t, d, model.New(size))
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestModelChain runs the model over a raw base with up to three testdiff
// layers created on the fly (snapshot steps), with reopen through the
// recorded parent references. The base is smaller than the layers above it.
func TestModelChain(t *testing.T) {
	for _, seed := range []int64{1, 2, 3} {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			st := memfs.New()
			const size = 4 << 20
			m := model.New(size)
			base := mustCreate(t, st, "/base.raw", "raw", size-8192, "")
			pat := bytes.Repeat([]byte{0xb7}, 300000)
			if _, err := base.WriteAt(pat, size-8192-300000); err != nil {
				t.Fatal(err)
			}
			m.Write(pat, size-8192-300000)
			base.Close()
			d, err := vdisk.Create(ctx, "/l1.tdf", &vdisk.CreateOptions{Format: "testdiff", Size: size, Backing: "base.raw", BackingFormat: "raw", Storage: st})
			if err != nil {
				t.Fatal(err)
			}
			g := &model.Chain{Storage: st, Format: "testdiff", Ext: "tdf", RecordFormat: true, MaxDepth: 3, Top: "/l1.tdf", Depth: 1}
			h := &model.Harness{Seed: seed, Ops: 10000, MaxIO: 64 << 10, Reopen: g.Reopen, Snapshot: g.Snapshot}
			d = h.Run(t, d, m)
			if g.Depth < 2 {
				t.Errorf("the chain never grew (depth %d)", g.Depth)
			}
			// The base and lower layers were never written.
			b, err := vdisk.Open(ctx, "/base.raw", &vdisk.OpenOptions{Format: "raw", ReadOnly: true, Storage: st})
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(pat))
			b.ReadAt(got, size-8192-300000)
			if !bytes.Equal(got, pat) {
				t.Fatal("base image content changed")
			}
			b.Close()
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestBackingSafety(t *testing.T) {
	st := memfs.New()
	mustCreate(t, st, "/dir/base.raw", "raw", 1<<20, "").Close()
	mustCreate(t, st, "/other/base.raw", "raw", 1<<20, "").Close()

	// A raw backing file without a recorded format is not guessed.
	_, err := vdisk.Create(ctx, "/dir/top.tdf", &vdisk.CreateOptions{Format: "testdiff", Backing: "base.raw", Storage: st})
	if !errors.Is(err, vdisk.ErrUnsupported) || !strings.Contains(err.Error(), "not opened as raw") {
		t.Fatalf("unrecorded raw backing: err = %v", err)
	}
	if _, serr := st.Stat("/dir/top.tdf"); serr == nil {
		t.Fatal("failed create left a file behind")
	}

	// ".." leaving the directory is refused on open unless allowed.
	d, err := vdisk.Create(ctx, "/dir/esc.tdf", &vdisk.CreateOptions{Format: "testdiff", Backing: "../other/base.raw", BackingFormat: "raw", AllowUnsafeBacking: true, Storage: st})
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	if _, err := vdisk.Open(ctx, "/dir/esc.tdf", &vdisk.OpenOptions{Storage: st}); !errors.Is(err, vdisk.ErrInvalidOption) {
		t.Fatalf("escaping backing: err = %v", err)
	}
	d, err = vdisk.Open(ctx, "/dir/esc.tdf", &vdisk.OpenOptions{Storage: st, AllowUnsafeBacking: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := d.Layers()[1].Name; got != "/other/base.raw" {
		t.Fatalf("parent resolved to %q", got)
	}
	d.Close()

	// A loop in the chain is ErrCorrupt, not a hang.
	mustCreate(t, st, "/loop/y.tdf", "testdiff", 1<<20, "").Close()
	if d, err = vdisk.Create(ctx, "/loop/x.tdf", &vdisk.CreateOptions{Format: "testdiff", Backing: "y.tdf", BackingFormat: "testdiff", Storage: st}); err != nil {
		t.Fatal(err)
	}
	d.Close()
	if d, err = vdisk.Create(ctx, "/loop/z.tdf", &vdisk.CreateOptions{Format: "testdiff", Backing: "x.tdf", BackingFormat: "testdiff", Storage: st}); err != nil {
		t.Fatal(err)
	}
	d.Close()
	if err := st.Remove("/loop/y.tdf"); err != nil {
		t.Fatal(err)
	}
	if err := st.Rename("/loop/z.tdf", "/loop/y.tdf"); err != nil {
		t.Fatal(err)
	}
	if _, err := vdisk.Open(ctx, "/loop/x.tdf", &vdisk.OpenOptions{Storage: st}); !errors.Is(err, vdisk.ErrCorrupt) || !strings.Contains(err.Error(), "loops") {
		t.Fatalf("loop: err = %v", err)
	}

	// A missing parent is ErrNotFound naming both files.
	if err := st.Remove("/loop/y.tdf"); err != nil {
		t.Fatal(err)
	}
	_, err = vdisk.Open(ctx, "/loop/x.tdf", &vdisk.OpenOptions{Storage: st})
	if !errors.Is(err, vdisk.ErrNotFound) || !strings.Contains(err.Error(), "x.tdf") || !strings.Contains(err.Error(), "y.tdf") {
		t.Fatalf("missing parent: err = %v", err)
	}
}

func TestFaultSurfacesAsError(t *testing.T) {
	mem := memfs.New()
	ffs := faultfs.New(mem)
	d := mustCreate(t, ffs, "/f.tdf", "testdiff", 1<<20, "")
	pat := bytes.Repeat([]byte{0x42}, 8192)
	if _, err := d.WriteAt(pat, 0); err != nil {
		t.Fatal(err)
	}
	ffs.FailReadAfter(1, nil)
	got := make([]byte, 8192)
	if _, err := d.ReadAt(got, 0); err == nil {
		t.Fatal("injected read error was swallowed")
	}
	ffs.Reset()
	ffs.FailWriteAfter(1, nil)
	if _, err := d.WriteAt(pat, 65536); err == nil {
		t.Fatal("injected write error was swallowed")
	}
	ffs.Reset()
	if _, err := d.ReadAt(got, 0); err != nil || !bytes.Equal(got, pat) {
		t.Fatalf("after faults: err=%v, data intact=%v", err, bytes.Equal(got, pat))
	}
	d.Close()
}

func TestConvertKeepsHolesAndFlattens(t *testing.T) {
	st := memfs.New()
	const size = 16 << 20
	base := mustCreate(t, st, "/b.raw", "raw", size, "")
	m := model.New(size)
	w := func(d *vdisk.Disk, c byte, off, n int64) {
		p := bytes.Repeat([]byte{c}, int(n))
		if _, err := d.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		m.Write(p, off)
	}
	w(base, 1, 0, 1<<20)
	w(base, 0, 4<<20, 1<<20) // explicit zeros: must not allocate the target
	w(base, 2, 9<<20+100, 5000)
	base.Close()
	top, err := vdisk.Create(ctx, "/t.tdf", &vdisk.CreateOptions{Format: "testdiff", Backing: "b.raw", BackingFormat: "raw", Storage: st})
	if err != nil {
		t.Fatal(err)
	}
	w(top, 3, 512<<10, 1<<20)
	for _, seq := range []bool{false, true} {
		dst := mustCreate(t, st, "/out.raw", "raw", size, "")
		var last int64
		err := vdisk.Convert(ctx, dst, top, &vdisk.ConvertOptions{Sequential: seq, Workers: 3, Progress: func(done, total int64) {
			if done < last || total != size {
				t.Errorf("progress went %d -> %d of %d", last, done, total)
			}
			last = done
		}})
		if err != nil {
			t.Fatal(err)
		}
		if last != size {
			t.Errorf("progress ended at %d, want %d", last, size)
		}
		(&model.Harness{Seed: -1}).Verify(t, dst, m)
		var alloc int64
		dst.Map(ctx, 0, size, func(e vdisk.Extent) error {
			if e.IsData() {
				alloc += e.Length
			}
			return nil
		})
		// 1.5 MiB of data plus 5000 bytes spread over at most two 64 KiB pages.
		if alloc > (1<<20)+(512<<10)+(128<<10) {
			t.Errorf("sequential=%v: target has %d bytes allocated; holes and zeros were not kept sparse", seq, alloc)
		}
		res, err := vdisk.Compare(ctx, dst, top, nil)
		if err != nil || !res.Identical {
			t.Fatalf("compare: %+v %v", res, err)
		}
		dst.Close()
		st.Remove("/out.raw")
	}
	top.Close()
}

func TestCompareFindsDifference(t *testing.T) {
	st := memfs.New()
	a := mustCreate(t, st, "/a.raw", "raw", 4<<20, "")
	b := mustCreate(t, st, "/b.raw", "raw", 5<<20, "")
	res, err := vdisk.Compare(ctx, a, b, nil)
	if err != nil || !res.Identical {
		t.Fatalf("empty images of different sizes: %+v %v", res, err)
	}
	if res, _ := vdisk.Compare(ctx, a, b, &vdisk.CompareOptions{Strict: true}); !res.SizeMismatch {
		t.Fatal("strict compare ignored the size difference")
	}
	b.WriteAt([]byte{9}, 3<<20+777)
	res, err = vdisk.Compare(ctx, a, b, nil)
	if err != nil || res.Identical || res.Offset != 3<<20+512 {
		t.Fatalf("compare: %+v %v, want mismatch at %d", res, err, 3<<20+512)
	}
	b.WriteAt([]byte{0}, 3<<20+777)
	b.WriteAt([]byte{7}, 4<<20+1)
	res, err = vdisk.Compare(ctx, a, b, nil)
	if err != nil || res.Identical || res.Offset != 4<<20 {
		t.Fatalf("compare tail: %+v %v", res, err)
	}
}
