package vdi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// logRecorder collects warnings.
type logRecorder struct {
	mu   sync.Mutex
	msgs []string
}

func (r *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (r *logRecorder) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs = append(r.msgs, rec.Level.String()+" "+rec.Message)
	return nil
}
func (r *logRecorder) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *logRecorder) WithGroup(string) slog.Handler      { return r }
func (r *logRecorder) warned(sub string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, m := range r.msgs {
		if strings.HasPrefix(m, "WARN") && strings.Contains(m, sub) {
			return true
		}
	}
	return false
}

// TestParentByUUID: a differencing image records its parent's UUIDs only;
// the parent is found by UUID among the siblings whatever its name, or
// named explicitly; a modified parent gets a warning, a wrong one an error.
func TestParentByUUID(t *testing.T) {
	st := memfs.New()
	const size = 3 << 20
	base := createVDI(t, st, "/d/base.vdi", size, "")
	disktest.MustWrite(t, base, nil, disktest.Fill(1<<20, 1), 0)
	disktest.MustClose(t, base)
	top := createVDI(t, st, "/d/top.vdi", 0, "base.vdi")
	if top.Size() != size {
		t.Fatalf("diff size %d, want the parent's %d", top.Size(), size)
	}
	disktest.MustWrite(t, top, nil, disktest.Fill(4096, 2), 4096)
	ref := top.Top().ParentRef()
	bid, ok := vdisk.As[driver.Identifier](top.Layers()[1])
	if !ok {
		t.Fatal("the base is no driver.Identifier")
	}
	if ref == nil || ref.Name != "" || ref.UUID != bid.UUID() || ref.ModUUID != bid.ModificationUUID() {
		t.Fatalf("parent ref %+v, base %s/%s", ref, bid.UUID(), bid.ModificationUUID())
	}
	disktest.MustClose(t, top)
	want := make([]byte, size)
	copy(want, disktest.Fill(1<<20, 1))
	copy(want[4096:], disktest.Fill(4096, 2))

	// Renamed parent: found by UUID.
	if err := st.Rename("/d/base.vdi", "/d/zz-renamed.vdi"); err != nil {
		t.Fatal(err)
	}
	d := openVDI(t, st, "/d/top.vdi", true)
	if got := d.Layers()[1].Name; got != "/d/zz-renamed.vdi" {
		t.Fatalf("parent resolved to %s", got)
	}
	if !bytes.Equal(disktest.ReadAll(t, d), want) {
		t.Fatal("chain content differs")
	}
	disktest.MustClose(t, d)

	// Parent elsewhere: a clear ErrNotFound, unless named.
	if err := st.Rename("/d/zz-renamed.vdi", "/e/base.vdi"); err != nil {
		t.Fatal(err)
	}
	_, err := vdisk.Open(ctx, "/d/top.vdi", &vdisk.OpenOptions{Storage: st, ReadOnly: true})
	if !errors.Is(err, driver.ErrNotFound) || !strings.Contains(err.Error(), ref.UUID) {
		t.Fatalf("missing parent: %v", err)
	}
	d, err = vdisk.Open(ctx, "/d/top.vdi", &vdisk.OpenOptions{Storage: st, ReadOnly: true, Parents: []string{"/e/base.vdi"}})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(disktest.ReadAll(t, d), want) {
		t.Fatal("chain content differs with an explicit parent")
	}
	disktest.MustClose(t, d)

	// A different image named as the parent: UUID mismatch is an error.
	disktest.MustClose(t, createVDI(t, st, "/e/other.vdi", size, ""))
	_, err = vdisk.Open(ctx, "/d/top.vdi", &vdisk.OpenOptions{Storage: st, ReadOnly: true, Parents: []string{"/e/other.vdi"}})
	if !errors.Is(err, driver.ErrCorrupt) || !strings.Contains(err.Error(), "UUID") {
		t.Fatalf("wrong parent: %v", err)
	}

	// Modifying the parent changes its modification UUID: a warning.
	b := openVDI(t, st, "/e/base.vdi", false)
	disktest.MustWrite(t, b, nil, []byte{9}, 2<<20)
	disktest.MustClose(t, b)
	rec := &logRecorder{}
	d, err = vdisk.Open(ctx, "/d/top.vdi", &vdisk.OpenOptions{Storage: st, ReadOnly: true, Parents: []string{"/e/base.vdi"}, Logger: slog.New(rec)})
	if err != nil {
		t.Fatal(err)
	}
	disktest.MustClose(t, d)
	if !rec.warned("modified") {
		t.Fatalf("no warning about the modified parent: %q", rec.msgs)
	}
}

// TestModificationUUID: refreshed once per open-for-write session, on the
// first change, and not by a read-only session.
func TestModificationUUID(t *testing.T) {
	st := memfs.New()
	d := createVDI(t, st, "/m.vdi", 2<<20, "")
	im := topImage(d)
	m0 := im.ModificationUUID()
	disktest.MustWrite(t, d, nil, []byte{1}, 0)
	m1 := im.ModificationUUID()
	disktest.MustWrite(t, d, nil, []byte{2}, 1<<20)
	if err := d.Discard(1<<20, 1<<20); err != nil {
		t.Fatal(err)
	}
	if m1 == m0 || im.ModificationUUID() != m1 {
		t.Fatalf("session: %s -> %s -> %s", m0, m1, im.ModificationUUID())
	}
	disktest.MustClose(t, d)
	d = openVDI(t, st, "/m.vdi", true)
	if got := topImage(d).ModificationUUID(); got != m1 {
		t.Fatalf("on disk %s, want %s", got, m1)
	}
	disktest.ReadAll(t, d)
	disktest.MustClose(t, d)
	d = openVDI(t, st, "/m.vdi", false)
	if got := topImage(d).ModificationUUID(); got != m1 {
		t.Fatal("opening for write changed the modification UUID")
	}
	disktest.MustWrite(t, d, nil, []byte{3}, 5)
	m2 := topImage(d).ModificationUUID()
	disktest.MustClose(t, d)
	if m2 == m1 {
		t.Fatal("a second session kept the modification UUID")
	}
}

// TestMetadata: identifier, geometry and comment setters round-trip
// through the file; info's format-specific JSON uses dashed names.
func TestMetadata(t *testing.T) {
	st := memfs.New()
	d := createVDI(t, st, "/meta.vdi", 10<<20, "", driver.KV{Key: "comment", Value: "hello, vdi"})
	im := topImage(d)
	if im.Comment() != "hello, vdi" {
		t.Fatalf("comment %q", im.Comment())
	}
	const u1, u2, u3, u4 = "01234567-89ab-cdef-0123-456789abcdef", "11111111-2222-3333-4444-555555555555",
		"{aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee}", "99999999-8888-7777-6666-555555555555"
	for _, err := range []error{im.SetUUID(u1), im.SetModificationUUID(u2), im.SetParentUUID(u3), im.SetParentModificationUUID(u4),
		im.SetPCHS(driver.CHS{Cylinders: 20, Heads: 16, Sectors: 63}), im.SetLCHS(driver.CHS{Cylinders: 10, Heads: 255, Sectors: 63}),
		im.SetComment(strings.Repeat("c", 255))} {
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := im.SetComment(strings.Repeat("c", 256)); !errors.Is(err, driver.ErrInvalidOption) {
		t.Fatalf("long comment: %v", err)
	}
	if err := im.SetUUID("not-a-uuid"); !errors.Is(err, driver.ErrInvalidOption) {
		t.Fatalf("bad uuid: %v", err)
	}
	disktest.MustWrite(t, d, nil, []byte{1}, 0) // must not replace the explicit modification UUID
	disktest.MustClose(t, d)
	d = openVDI(t, st, "/meta.vdi", true)
	im = topImage(d)
	if im.UUID() != u1 || im.ModificationUUID() != u2 || im.ParentUUID() != "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee" || im.ParentModificationUUID() != u4 {
		t.Fatalf("uuids %s %s %s %s", im.UUID(), im.ModificationUUID(), im.ParentUUID(), im.ParentModificationUUID())
	}
	if g, ok := im.PCHS(); !ok || g != (driver.CHS{Cylinders: 20, Heads: 16, Sectors: 63}) {
		t.Fatalf("pchs %+v %v", g, ok)
	}
	if g, ok := im.LCHS(); !ok || g != (driver.CHS{Cylinders: 10, Heads: 255, Sectors: 63}) {
		t.Fatalf("lchs %+v %v", g, ok)
	}
	if im.Parent() != nil {
		t.Fatal("a dynamic image with a parent UUID set reports a parent")
	}
	js, err := json.Marshal(im.Info().Specific)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{`"uuid":"` + u1, `"modification-uuid":"` + u2, `"parent-uuid":"aaaa`, `"parent-modification-uuid":"` + u4,
		`"type":"dynamic"`, `"block-size":1048576`, `"allocated-blocks":1`, `"blocks":10`, `"comment":"ccc`, `"lchs":{"cylinders":10`, `"pchs":{`} {
		if !strings.Contains(string(js), k) {
			t.Errorf("info JSON lacks %s: %s", k, js)
		}
	}
	if err := im.SetComment("x"); !errors.Is(err, driver.ErrReadOnly) {
		t.Fatalf("read-only set: %v", err)
	}
	disktest.MustClose(t, d)

	// Reparent: standalone and back.
	base := createVDI(t, st, "/p/base.vdi", 4<<20, "")
	disktest.MustWrite(t, base, nil, disktest.Fill(4096, 5), 0)
	disktest.MustClose(t, base)
	top := createVDI(t, st, "/p/top.vdi", 0, "base.vdi")
	disktest.MustClose(t, top)
	d = openVDI(t, st, "/p/top.vdi", false)
	pref := d.Top().ParentRef()
	if err := d.SetParent(nil); err != nil {
		t.Fatal(err)
	}
	disktest.MustClose(t, d)
	d = openVDI(t, st, "/p/top.vdi", false)
	if len(d.Layers()) != 1 || d.Top().ParentRef() != nil || disktest.ReadAll(t, d)[0] != 0 {
		t.Fatal("standalone image still has a parent")
	}
	if err := d.SetParent(pref); err != nil {
		t.Fatal(err)
	}
	disktest.MustClose(t, d)
	d = openVDI(t, st, "/p/top.vdi", true)
	if len(d.Layers()) != 2 || disktest.ReadAll(t, d)[0] != 5 {
		t.Fatal("reparented image does not read through its parent")
	}
	disktest.MustClose(t, d)
}
