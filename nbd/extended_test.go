package nbd

import (
	"bytes"
	"testing"
)

// TestExtendedHeaders runs reads (sparse, as OFFSET_DATA and OFFSET_HOLE
// chunks), writes, zeroes, trims, flushes and block status (as
// BLOCK_STATUS_EXT) with extended headers between the client and the
// server, and checks the same content and status as with compact ones.
func TestExtendedHeaders(t *testing.T) {
	dir := t.TempDir()
	p := newRaw(t, dir, 16<<20, map[int64][]byte{
		0:       bytes.Repeat([]byte{1}, 4096),
		1 << 20: bytes.Repeat([]byte{2}, 64<<10),
		8 << 20: bytes.Repeat([]byte{3}, 1<<20),
	})
	d := openDisk(t, p, false)
	defer d.Close()
	ts := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: d}, {Name: "ro", Disk: d, ReadOnly: true}}})
	ctxs := []string{ContextBaseAllocation, ContextAllocationDepth}
	c := ts.dial(t, &ClientOptions{ExtendedHeaders: true, MetaContexts: ctxs})
	compact := ts.dial(t, &ClientOptions{MetaContexts: ctxs})
	if !c.Extended() || !c.Structured() || compact.Extended() {
		t.Fatalf("extended %v structured %v; compact client extended %v", c.Extended(), c.Structured(), compact.Extended())
	}
	if len(c.Contexts()) != 2 {
		t.Fatalf("contexts %v", c.Contexts())
	}
	w := bytes.Repeat([]byte("extended"), 4096)
	if _, err := c.WriteAt(w, 3<<20+5); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteZeroes(8<<20+4096, 8192, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Trim(8<<20+65536, 65536, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	a, b := make([]byte, 16<<20), make([]byte, 16<<20)
	if _, err := c.ReadAt(a, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := compact.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) || !bytes.Equal(a[3<<20+5:3<<20+5+len(w)], w) {
		t.Fatal("reads with extended and compact headers differ")
	}
	for _, name := range ctxs {
		if got, want := fullStatus(t, c, name, false), fullStatus(t, compact, name, false); !equalExt(got, want) {
			t.Errorf("%s: extended %v, compact %v", name, got, want)
		}
	}
	// Errors come as error chunks.
	_, err := c.BlockStatus(16<<20-512, 1024, 0)
	wantErrno(t, err, EINVAL, "block status past the end")
	wantErrno(t, c.WriteZeroes(16<<20-1, 2, 0), ENOSPC, "write zeroes past the end")
	ro := ts.dial(t, &ClientOptions{ExportName: "ro", ExtendedHeaders: true})
	wantErrno(t, ro.Trim(0, 4096, 0), EPERM, "trim on read-only")
	// A 64-bit effect length on an 8 GiB export: block status answers
	// for less, a trim refuses it.
	big := openDisk(t, newRaw(t, t.TempDir(), 8<<30, nil), false)
	defer big.Close()
	ts2 := serve(t, &Server{Persistent: true, Exports: []*Export{{Disk: big}}})
	bc := ts2.dial(t, &ClientOptions{ExtendedHeaders: true, MetaContexts: ctxs})
	st, err := bc.do(t.Context(), cmdBlockStatus, 0, 0, 6<<30, nil)
	if err != nil {
		t.Fatalf("block status of 6 GiB: %v", err)
	}
	if l := st.status[ContextBaseAllocation]; len(l) == 0 || l[0].Flags != StateHole|StateZero {
		t.Fatalf("block status of 6 GiB: %v", l)
	}
	_, err = bc.do(t.Context(), cmdTrim, 0, 0, 5<<30, nil)
	wantErrno(t, err, EOVERFLOW, "trim of 5 GiB")
	// Without extended headers the client refuses such lengths itself.
	if _, err := compact.do(t.Context(), cmdTrim, 0, 0, 5<<30, nil); err == nil {
		t.Fatal("a compact client sent a 5 GiB length")
	}
}
