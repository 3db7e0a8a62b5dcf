package vhd_test

import (
	"bytes"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/storage/faultfs"
	"github.com/vdisk/vdisk/storage/memfs"
)

func reopener(st driver.Storage, name string, wantLayers *int) func(d *vdisk.Disk) (*vdisk.Disk, error) {
	return func(d *vdisk.Disk) (*vdisk.Disk, error) {
		if err := d.Close(); err != nil {
			return nil, err
		}
		nd, err := vdisk.Open(ctx, name, &vdisk.OpenOptions{Storage: st})
		if err == nil && wantLayers != nil && len(nd.Layers()) != *wantLayers {
			return nil, fmt.Errorf("reopened chain has %d layers, want %d", len(nd.Layers()), *wantLayers)
		}
		return nd, err
	}
}

func checkClean(t testing.TB, d *vdisk.Disk) {
	t.Helper()
	res, err := d.Check(ctx, driver.RepairNone)
	if err != nil || res.Corruptions+res.Leaks+res.CheckErrors != 0 {
		t.Fatalf("check: %+v %v %v", res, err, res.Messages)
	}
}

// TestModel runs >= 10^4 random operations (with reopen steps and
// parallel batches) on each kind of image in memory.
func TestModel(t *testing.T) {
	for _, c := range []struct {
		name  string
		size  int64
		ops   int
		maxIO int64
		opts  []string
	}{
		{"dynamic", 16 << 20, 10000, 64 << 10, nil},
		{"dynamic-4k", 3<<20 + 1536, 2500, 48 << 10, []string{"block_size=4K", "force_size=on"}},
		{"dynamic-512", 1 << 20, 1500, 8 << 10, []string{"block_size=512", "force_size=on"}},
		{"fixed", 8 << 20, 10000, 64 << 10, []string{"subformat=fixed"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			st := memfs.New()
			d := create(t, st, "/d.vhd", c.size, "", c.opts...)
			ops := c.ops
			if testing.Short() {
				ops = min(ops, 2000)
			}
			h := &model.Harness{Seed: 5, Ops: ops, MaxIO: c.maxIO, Reopen: reopener(st, "/d.vhd", nil)}
			d = h.Run(t, d, model.New(d.Size()))
			checkClean(t, d)
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestModelChain: a dynamic base and up to three differencing layers made
// on the fly, reopened through the recorded parent locators.
func TestModelChain(t *testing.T) {
	for _, c := range []struct {
		seed int64
		bs   string
		ops  int
	}{{1, "2M", 10000}, {2, "16K", 3000}} {
		seed, bs := c.seed, c.bs
		{
			t.Run(fmt.Sprintf("%d-%s", seed, bs), func(t *testing.T) {
				st := memfs.New()
				const size = 6 << 20
				m := model.New(size)
				base := create(t, st, "/vm/base.vhd", size, "", "force_size=on", "block_size="+bs)
				pat := bytes.Repeat([]byte{0xb7}, 300000)
				base.WriteAt(pat, size-300000-777)
				m.Write(pat, size-300000-777)
				base.WriteAt(pat[:5000], 1000)
				m.Write(pat[:5000], 1000)
				base.Close()
				d := create(t, st, "/vm/l1.vhd", 0, "base.vhd", "block_size="+bs)
				top, depth := "/vm/l1.vhd", 2
				h := &model.Harness{
					Seed: seed, Ops: c.ops, MaxIO: 64 << 10,
					Reopen: func(d *vdisk.Disk) (*vdisk.Disk, error) { return reopener(st, top, &depth)(d) },
					Snapshot: func(d *vdisk.Disk) (*vdisk.Disk, error) {
						if depth >= 4 {
							return nil, nil
						}
						if err := d.Close(); err != nil {
							return nil, err
						}
						depth++
						name := fmt.Sprintf("/vm/l%d.vhd", depth-1)
						nd, err := vdisk.Create(ctx, name, &vdisk.CreateOptions{Format: "vpc", Storage: st,
							Backing: strings.TrimPrefix(top, "/vm/"), BackingFormat: "vpc", Options: disktest.KVs("block_size=" + bs)})
						top = name
						return nd, err
					},
				}
				if testing.Short() {
					h.Ops = 2000
				}
				d = h.Run(t, d, m)
				if depth < 3 {
					t.Errorf("the chain never grew (depth %d)", depth)
				}
				checkClean(t, d)
				// The base was never written.
				b := openDisk(t, st, "/vm/base.vhd", true)
				got := make([]byte, len(pat))
				b.ReadAt(got, size-300000-777)
				b.Close()
				if !bytes.Equal(got, pat) {
					t.Fatal("base image content changed")
				}
				// Compacting the top keeps the content.
				if err := d.Compact(ctx, nil); err != nil {
					t.Fatal(err)
				}
				(&model.Harness{Seed: seed}).Verify(t, d, m)
				checkClean(t, d)
				if err := d.Close(); err != nil {
					t.Fatal(err)
				}
			})
		}
	}
}

// TestCrash: data flushed before a crash survives it and the image opens
// and checks clean, wherever the crash hits. A dry run counts the write
// operations of the workload after the flush; the crash then comes after
// every one of them (sampled evenly where there are more than crashPoints),
// and a crash point that is never reached fails the test. Every byte is
// checked: bytes not written after the flush keep their flushed value, and
// written ones read either that value or one of the values written over
// them since.
func TestCrash(t *testing.T) {
	const size = 8 << 20
	const crashPoints = 40 // per kind; three kinds
	type extra struct {
		off, n int64
		val    byte
	}
	// The workload after the flush: overlapping writes and zeroings.
	var post []extra
	for i := 0; i < 12; i++ {
		off := int64(i*277*1024) % (size - 100000)
		post = append(post, extra{off, 70000, byte(i + 1)}, extra{off + 300000, min(1<<20, size-off-300000), 0})
	}
	// setup builds the image, runs the model workload and flushes; it
	// returns the disk, the fault storage and the flushed content.
	setup := func(t *testing.T, kind string) (*vdisk.Disk, *faultfs.FS, []byte) {
		mem := memfs.New()
		m := model.New(size)
		if kind == "diff" {
			b := create(t, mem, "/base.vhd", size, "", "force_size=on")
			p := bytes.Repeat([]byte{0x3c}, 3<<20)
			if _, err := b.WriteAt(p, 1<<20); err != nil {
				t.Fatal(err)
			}
			m.Write(p, 1<<20)
			disktest.MustClose(t, b)
		}
		ffs := faultfs.New(mem)
		var d *vdisk.Disk
		switch kind {
		case "fixed":
			d = create(t, ffs, "/c.vhd", size, "", "subformat=fixed", "force_size=on")
		case "diff":
			d = create(t, ffs, "/c.vhd", 0, "base.vhd", "block_size=64K")
		default:
			d = create(t, ffs, "/c.vhd", size, "", "force_size=on", "block_size=64K")
		}
		h := &model.Harness{Seed: 7, Ops: 100, MaxIO: 64 << 10, NoDiscard: true}
		d = h.Run(t, d, m)
		if err := d.Flush(); err != nil {
			t.Fatal(err)
		}
		// The harness knows every byte it wrote; bytes it never touched
		// read zeros (or the base's content, which the model holds).
		return d, ffs, append([]byte(nil), m.Data...)
	}
	workload := func(d *vdisk.Disk) {
		for i, e := range post {
			if e.val != 0 {
				d.WriteAt(bytes.Repeat([]byte{e.val}, int(e.n)), e.off)
			} else {
				d.WriteZeroes(e.off, e.n, i%4 == 1)
			}
		}
		d.Flush()
		d.Close()
	}
	// allowed[i] is a bit set of the values byte i may read besides its
	// flushed value: bit v for value v (values are 0..12).
	allowed := make([]uint16, size)
	for _, e := range post {
		for j := e.off; j < e.off+e.n; j++ {
			allowed[j] |= 1 << e.val
		}
	}
	total := 0
	for _, kind := range []string{"dynamic", "fixed", "diff"} {
		t.Run(kind, func(t *testing.T) {
			d, ffs, _ := setup(t, kind)
			w0 := ffs.Writes()
			workload(d)
			n := ffs.Writes() - w0
			if n < 2 {
				t.Fatalf("the workload made only %d writes", n)
			}
			var points []int
			for k := 1; k <= min(n, crashPoints); k++ {
				points = append(points, 1+(k-1)*(n-1)/max(min(n, crashPoints)-1, 1))
			}
			for _, at := range points {
				d, ffs, flushed := setup(t, kind)
				ffs.CrashAfterWrites(at)
				workload(d)
				if !ffs.Crashed() {
					t.Fatalf("crash after write %d of %d was never reached", at, n)
				}
				total++
				dur := ffs.Durable()
				nd, err := vdisk.Open(ctx, "/c.vhd", &vdisk.OpenOptions{Storage: dur, ReadOnly: true})
				if err != nil {
					t.Fatalf("crash after write %d/%d: image does not open: %v", at, n, err)
				}
				got := disktest.ReadAll(t, nd)
				for i := range got {
					if got[i] != flushed[i] && (got[i] > 12 || allowed[i]&(1<<got[i]) == 0) {
						t.Fatalf("crash after write %d/%d: byte %d reads %#x; flushed %#x, written since: %016b", at, n, i, got[i], flushed[i], allowed[i])
					}
				}
				if res, err := nd.Check(ctx, driver.RepairNone); err != nil || res.Corruptions != 0 {
					t.Fatalf("crash after write %d/%d: check: %+v %v %v", at, n, res, err, res.Messages)
				}
				disktest.MustClose(t, nd)
			}
		})
	}
	if !t.Failed() && total < 100 {
		t.Fatalf("only %d crash points", total)
	}
}

// TestFaultsSurface: injected I/O errors come back as errors and do not
// break the image.
func TestFaultsSurface(t *testing.T) {
	mem := memfs.New()
	ffs := faultfs.New(mem)
	d := create(t, ffs, "/f.vhd", 8<<20, "", "block_size=64K")
	pat := bytes.Repeat([]byte{0x42}, 8192)
	if _, err := d.WriteAt(pat, 0); err != nil {
		t.Fatal(err)
	}
	ffs.FailWriteAfter(1, nil)
	if _, err := d.WriteAt(pat, 1<<20); err == nil {
		t.Fatal("injected write error was swallowed")
	}
	ffs.Reset()
	ffs.FailReadAfter(1, nil)
	got := make([]byte, 8192)
	if _, err := d.ReadAt(got, 0); err == nil {
		t.Fatal("injected read error was swallowed")
	}
	ffs.Reset()
	ffs.NoSpaceAfter(1000)
	if _, err := d.WriteAt(pat, 4<<20); err == nil {
		t.Fatal("ENOSPC was swallowed")
	}
	ffs.Reset()
	if _, err := d.ReadAt(got, 0); err != nil || !bytes.Equal(got, pat) {
		t.Fatalf("after faults: %v", err)
	}
	if _, err := d.WriteAt(pat, 4<<20); err != nil {
		t.Fatal(err)
	}
	d.ReadAt(got, 4<<20)
	if !bytes.Equal(got, pat) {
		t.Fatal("write after faults lost")
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	d = openDisk(t, mem, "/f.vhd", false)
	defer d.Close()
	if _, err := d.Check(ctx, driver.RepairAll); err != nil {
		t.Fatal(err)
	}
	checkClean(t, d)
	d.ReadAt(got, 4<<20)
	if !bytes.Equal(got, pat) {
		t.Fatal("data lost after repair")
	}
}

// TestConcurrentAllocFlushDiscard: blocks allocated in parallel while
// other goroutines flush and free blocks at the end of the file (which
// makes flush shrink the file) end up intact.
func TestConcurrentAllocFlushDiscard(t *testing.T) {
	st := memfs.New()
	const bs = 64 << 10
	d := create(t, st, "/p.vhd", 256*bs, "", "block_size=64K", "force_size=on")
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Add(2)
	go func() { // flusher
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
				if err := d.Flush(); err != nil {
					t.Error(err)
					return
				}
			}
		}
	}()
	go func() { // allocates and frees blocks 200..255
		defer wg.Done()
		p := bytes.Repeat([]byte{0xdd}, bs)
		for i := 0; i < 3000; i++ {
			b := int64(200 + i%56)
			if i%2 == 0 {
				d.WriteAt(p, b*bs)
			} else {
				d.Discard(b*bs, bs)
			}
		}
	}()
	var ww sync.WaitGroup
	for w := 0; w < 4; w++ {
		ww.Add(1)
		go func(w int) {
			defer ww.Done()
			// Churn: blocks are freed and allocated again many times; the
			// last pass writes every block.
			for i := 0; i < 450; i++ {
				b := int64(w*50 + i%50)
				if i < 400 && i%3 == 2 {
					d.Discard(b*bs, bs)
					continue
				}
				p := bytes.Repeat([]byte{byte(b)}, bs/2)
				if _, err := d.WriteAt(p, b*bs+bs/4); err != nil {
					t.Error(err)
				}
			}
		}(w)
	}
	ww.Wait()
	close(stop)
	wg.Wait()
	check := func(d *vdisk.Disk) {
		got := make([]byte, bs)
		for b := int64(0); b < 200; b++ {
			d.ReadAt(got, b*bs)
			want := make([]byte, bs)
			copy(want[bs/4:], bytes.Repeat([]byte{byte(b)}, bs/2))
			if !bytes.Equal(got, want) {
				t.Fatalf("block %d: %s", b, firstDiff(got, want))
			}
		}
	}
	check(d)
	checkClean(t, d)
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	d = openDisk(t, st, "/p.vhd", false)
	check(d)
	checkClean(t, d)
	d.Close()
}
