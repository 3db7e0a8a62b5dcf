package parallels

import (
	"bytes"
	"encoding/binary"
	"errors"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// TestHostileHeaders: damaged or hostile header fields give a clear error
// naming the problem, without a big allocation.
func TestHostileHeaders(t *testing.T) {
	good := tinyImages(t)["ext"]
	le := binary.LittleEndian
	u32 := func(off int, v uint32) func([]byte) []byte {
		return func(b []byte) []byte { le.PutUint32(b[off:], v); return b }
	}
	u64 := func(off int, v uint64) func([]byte) []byte {
		return func(b []byte) []byte { le.PutUint64(b[off:], v); return b }
	}
	for _, c := range []struct {
		name   string
		mutate func([]byte) []byte
		want   error
		msg    string
	}{
		{"bad magic", func(b []byte) []byte { copy(b, "WithoutFreeSpacX"); return b }, driver.ErrCorrupt, "bad magic"},
		{"version 3", u32(16, 3), driver.ErrUnsupported, "version"},
		{"short file", func(b []byte) []byte { return b[:40] }, driver.ErrCorrupt, "too small"},
		{"zero tracks", u32(28, 0), driver.ErrCorrupt, "zero sectors"},
		{"huge tracks", u32(28, 0xFFFFFFFF), driver.ErrCorrupt, "too big"},
		{"huge bat_entries", u32(32, 0xFFFFFFFF), driver.ErrCorrupt, "past the end"},
		{"BAT past EOF", u32(32, 1000), driver.ErrCorrupt, "past the end"},
		{"nb_sectors overflowing", u64(36, 1<<62), driver.ErrCorrupt, "overflows"},
		{"size past the BAT", u64(36, 17), driver.ErrCorrupt, "larger than"},
		{"catenated sizes", func(b []byte) []byte {
			// tracks x bat_entries would overflow 64 bits in bytes if not bounded.
			le.PutUint32(b[28:], maxTracks)
			le.PutUint64(b[36:], 1<<60)
			return b
		}, driver.ErrCorrupt, "overflows"},
		{"data_off inside the BAT", u32(48, 0), driver.ErrCorrupt, "data offset is 0"},
	} {
		t.Run(c.name, func(t *testing.T) {
			st := memfs.New()
			st.WriteFile("/h.hds", c.mutate(bytes.Clone(good)))
			var ms0, ms1 runtime.MemStats
			runtime.ReadMemStats(&ms0)
			_, err := Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/h.hds", ReadOnly: true})
			runtime.ReadMemStats(&ms1)
			if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("got %v, want %v mentioning %q", err, c.want, c.msg)
			}
			if a := ms1.TotalAlloc - ms0.TotalAlloc; a > 1<<20 {
				t.Fatalf("open allocated %d bytes", a)
			}
		})
	}
	// data_off inside the BAT of an old image.
	old := oldMagicImage()
	le.PutUint32(old[48:], 0) // computed: fine
	st := memfs.New()
	st.WriteFile("/o.hds", old)
	if _, err := Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/o.hds", ReadOnly: true}); err != nil {
		t.Fatal(err)
	}
	b := bytes.Clone(old)
	le.PutUint32(b[32:], 200) // a BAT to sector 2, data at sector 1
	le.PutUint32(b[48:], 1)
	st.WriteFile("/o2.hds", b)
	if _, err := Format.Open(ctx, &driver.OpenParams{Storage: st, Name: "/o2.hds", ReadOnly: true}); !errors.Is(err, driver.ErrCorrupt) || !strings.Contains(err.Error(), "overlaps the BAT") {
		t.Fatalf("data_off inside the BAT: %v", err)
	}
}

// damaged builds an image with a bad BAT: cluster 0 data, cluster 1 past
// the end of the file, cluster 2 a duplicate of cluster 0, cluster 5 data;
// plus a leaked tail and the dirty flag.
func damaged(t *testing.T) (img []byte, want []byte) {
	st := memfs.New()
	const cs = 4096
	d := createPrl(t, st, "/d.hds", 8*cs, driver.KV{Key: "cluster_size", Value: "4k"}, driver.KV{Key: "prealloc-size", Value: "0"})
	disktest.MustWrite(t, d, nil, disktest.Fill(cs, 0xA0), 0)
	disktest.MustWrite(t, d, nil, disktest.Fill(cs, 0xA5), 5*cs)
	disktest.MustClose(t, d)
	b, _ := st.ReadFile("/d.hds")
	le := binary.LittleEndian
	e0 := le.Uint32(b[headerSize:])
	le.PutUint32(b[headerSize+4:], 1000)     // past EOF
	le.PutUint32(b[headerSize+8:], e0)       // duplicate
	le.PutUint32(b[44:], inuseMagic)         // dirty
	b = append(b, make([]byte, 3*cs+100)...) // leaked tail
	want = make([]byte, 8*cs)
	copy(want, disktest.Fill(cs, 0xA0))
	copy(want[2*cs:], disktest.Fill(cs, 0xA0))
	copy(want[5*cs:], disktest.Fill(cs, 0xA5))
	return b, want
}

// TestRepair: a damaged, dirty image opens read-only and reads correctly
// (unusable entries read zeros), check reports every problem; a read-write
// open repairs it as qemu does (the duplicate gets its own copy, bad
// entries are cleared, the tail is cut) and qemu-img check is clean.
func TestRepair(t *testing.T) {
	qemutest.Require(t)
	b, want := damaged(t)
	st := memfs.New()
	st.WriteFile("/d.hds", b)
	d := openPrl(t, st, "/d.hds", true)
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
		t.Fatal("read-only content of the damaged image")
	}
	if !d.Top().Info().Dirty {
		t.Fatal("dirty flag not shown")
	}
	res, err := d.Check(ctx, driver.RepairNone)
	if err != nil || res.Corruptions != 3 || res.Leaks != 4 {
		t.Fatalf("check: %+v %v %q", res, err, res.Messages)
	}
	disktest.MustClose(t, d)

	d = openPrl(t, st, "/d.hds", false, small...)
	if d.Top().Info().Dirty {
		t.Fatal("still dirty after the repair")
	}
	if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
		t.Fatal("content after the repair")
	}
	res, err = d.Check(ctx, driver.RepairNone)
	if err != nil || res.Corruptions+res.Leaks != 0 || res.CorruptionsFixed != 3 || res.LeaksFixed != 4 {
		t.Fatalf("check after the repair on open: %+v %v %q", res, err, res.Messages)
	}
	// The duplicate now has its own cluster: writing one leaves the other.
	disktest.MustWrite(t, d, nil, disktest.Fill(10, 0x11), 2*4096)
	copy(want[2*4096:], disktest.Fill(10, 0x11))
	disktest.MustClose(t, d)
	img := disktest.SaveTo(t, st, "/d.hds", t.TempDir())
	qemutest.Check(t, "parallels", img)
	ref := filepath.Join(filepath.Dir(img), "want.raw")
	disktest.WriteFile(t, ref, want)
	if !qemutest.Compare(t, "parallels", img, "raw", ref) {
		t.Fatal("qemu-img compare after the repair")
	}

	// Off the cluster grid (sector units of the original format): reads
	// zeros, check finds it, the repair clears it.
	old := oldMagicImage()
	binary.LittleEndian.PutUint32(old[headerSize+4*5:], 1+3) // data_off is sector 1
	st.WriteFile("/u.hds", old)
	d = openPrl(t, st, "/u.hds", true)
	res, err = d.Check(ctx, driver.RepairNone)
	if err != nil || res.Corruptions != 1 || !strings.Contains(strings.Join(res.Messages, ";"), "not cluster aligned") {
		t.Fatalf("check of the unaligned entry: %+v %v %q", res, err, res.Messages)
	}
	if e, _ := d.Status(5*8192, 8192); e.State != driver.Unallocated {
		t.Fatalf("unaligned cluster shows as %v", e.State)
	}
	disktest.MustClose(t, d)
	d = openPrl(t, st, "/u.hds", false, small...)
	res, err = d.Check(ctx, driver.RepairNone)
	if err != nil || res.Corruptions+res.Leaks != 0 {
		t.Fatalf("check after the repair: %+v %v %q", res, err, res.Messages)
	}
	disktest.MustClose(t, d)
	qemutest.Check(t, "parallels", disktest.SaveTo(t, st, "/u.hds", t.TempDir()))
}
