package vdisk

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"testing"

	_ "github.com/vdisk/vdisk/format/qcow2"
	_ "github.com/vdisk/vdisk/format/raw"
	"github.com/vdisk/vdisk/storage/faultfs"
	"github.com/vdisk/vdisk/storage/memfs"
)

// TestConvertCompressedArena: a compressed convert lends its read slabs,
// carved from one huge-page arena, to the qcow2 compressor. With many
// workers the content arrives intact; the arena is freed once the target
// has given back every lent cluster, and not before: also when a target
// write fails midway and Convert returns while clusters are still in the
// compressor (a slab freed too early would crash the compressor reading
// it, or corrupt what it stores).
func TestConvertCompressedArena(t *testing.T) {
	ctx := context.Background()
	const size = 24 << 20
	st := memfs.New()
	src, err := Create(ctx, "/src.raw", &CreateOptions{Format: "raw", Size: size, Storage: st})
	if err != nil {
		t.Fatal(err)
	}
	// 64 KiB clusters of random, text-like and zero content.
	want := make([]byte, size)
	r := rand.New(rand.NewPCG(1, 2))
	for off := 0; off < size; off += 64 << 10 {
		c := want[off : off+64<<10]
		switch r.IntN(3) {
		case 0:
			for i := range c {
				c[i] = byte(r.Uint32())
			}
		case 1:
			var b bytes.Buffer
			for i := 0; b.Len() < len(c); i++ {
				fmt.Fprintf(&b, "%09d line of cluster %d\n", i, off>>16)
			}
			copy(c, b.Bytes())
		}
	}
	if _, err := src.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	for _, fail := range []bool{false, true} {
		fs := faultfs.New(st)
		dst, err := Create(ctx, "/dst.qcow2", &CreateOptions{Format: "qcow2", Size: size, Storage: fs})
		if err != nil {
			t.Fatal(err)
		}
		o := &ConvertOptions{Compress: true, Workers: 8}
		c, err := newConverter(dst, src, o)
		if err != nil {
			t.Fatal(err)
		}
		if c.lender == nil {
			t.Fatal("a compressed convert to qcow2 did not lend its slabs")
		}
		if fail {
			fs.FailWriteAfter(fs.Writes()+10, nil)
		}
		runErr := c.run(ctx, o)
		closeErr := dst.Close()
		if c.arena == nil || c.arena.Piece() != nil {
			t.Fatalf("fail=%v: no arena, or one still handing out pieces after Convert", fail)
		}
		if !c.arena.Freed() {
			t.Fatalf("fail=%v: the arena was not freed after the target closed", fail)
		}
		if fail {
			if runErr == nil && closeErr == nil {
				t.Fatal("a failed target write was not reported")
			}
			continue
		}
		if runErr != nil || closeErr != nil {
			t.Fatalf("convert: %v; close: %v", runErr, closeErr)
		}
		got, err := Open(ctx, "/dst.qcow2", &OpenOptions{Format: "qcow2", Storage: st})
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, size)
		if _, err := got.ReadAt(buf, 0); err != nil {
			t.Fatal(err)
		}
		got.Close()
		for off := 0; off < size; off += 64 << 10 {
			if !bytes.Equal(buf[off:off+64<<10], want[off:off+64<<10]) {
				t.Fatalf("cluster at %d differs after the convert", off)
			}
		}
		if err := st.Remove("/dst.qcow2"); err != nil {
			t.Fatal(err)
		}
	}
	src.Close()
}
