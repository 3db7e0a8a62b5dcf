package nbdstore_test

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/nbd"
)

// chainQcow2 builds base.qcow2 <- top.qcow2 in dir: data in the base
// only, data in the top over base data, zeros in the top over base data,
// zeros allocated in the base, zeros written as data in the top, and
// ranges no layer holds. It returns top's path.
func chainQcow2(t testing.TB, dir string) string {
	t.Helper()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	qemutest.Create(t, "qcow2", base, "4M")
	qemutest.IO(t, "qcow2", base, "write -P 1 0 64k", "write -P 2 1M 64k", "write -z 2M 64k", "write -P 4 3584k 128k")
	qemutest.Img(t, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
	qemutest.IO(t, "qcow2", top, "write -P 3 64k 64k", "write -z 1M 64k", "write -P 0 3M 64k", "write -P 5 3648k 64k")
	return top
}

// presentMap is, per 4 KiB, whether the range is present (held by some
// layer) as a map says.
type presentMap []bool

func (m presentMap) set(start, length int64, present bool) {
	for o := start; o < start+length; o += 4096 {
		m[o/4096] = present
	}
}

// TestAllocationDepth: over qemu-nbd -A, vdisk's map of nbd:// reports as
// unallocated exactly what no layer of the served chain holds (qemu-img
// map's "present" on the local chain, nbdinfo's qemu:allocation-depth 0)
// and reads what qemu reads; without -A, with allocation-depth=off, or
// from nbdkit, everything is present.
func TestAllocationDepth(t *testing.T) {
	qemutest.Require(t, "qemu-nbd", "nbdinfo")
	dir := t.TempDir()
	top := chainQcow2(t, dir)
	const size = 4 << 20
	// Oracle 1: qemu-img map of the local chain.
	want := make(presentMap, size/4096)
	for _, e := range qemutest.Map(t, "qcow2", top) {
		want.set(e.Start, e.Length, e.Present)
	}
	flat := filepath.Join(dir, "flat.raw")
	qemutest.Img(t, "convert", "-f", "qcow2", "-O", "raw", top, flat)
	wantData, err := os.ReadFile(flat)
	if err != nil {
		t.Fatal(err)
	}
	_, urlA := qemuNBD(t, "qcow2", top, "-r", "-A")
	_, urlPlain := qemuNBD(t, "qcow2", top, "-r")
	// Oracle 2: nbdinfo's qemu:allocation-depth map of the same export.
	out, err := exec.Command("nbdinfo", "--json", "--map=qemu:allocation-depth", urlA).Output()
	if err != nil {
		t.Fatalf("nbdinfo: %v", err)
	}
	var depth []struct {
		Offset int64 `json:"offset"`
		Length int64 `json:"length"`
		Type   int64 `json:"type"`
	}
	if err := json.Unmarshal(out, &depth); err != nil {
		t.Fatalf("nbdinfo output %s: %v", out, err)
	}
	fromDepth := make(presentMap, size/4096)
	for _, e := range depth {
		fromDepth.set(e.Offset, e.Length, e.Type != 0)
	}
	if d := firstDiffBool(fromDepth, want); d >= 0 {
		t.Fatalf("the oracles disagree at %d: nbdinfo depth says present=%v, qemu-img map %v", d*4096, fromDepth[d], want[d])
	}
	absent := 0
	for _, p := range want {
		if !p {
			absent++
		}
	}
	if absent == 0 || absent == len(want) {
		t.Fatalf("a chain with %d of %d blocks absent tests nothing", absent, len(want))
	}
	allPresent := make(presentMap, size/4096)
	allPresent.set(0, size, true)
	_, urlKit := nbdkit(t, "memory", "4M")
	tests := []struct {
		name string
		url  string
		opts map[string]string
		want presentMap
		data []byte
	}{
		{"qemu-nbd -A", urlA, nil, want, wantData},
		{"qemu-nbd -A, allocation-depth=off", urlA, map[string]string{"allocation-depth": "off"}, allPresent, wantData},
		{"qemu-nbd without -A", urlPlain, nil, allPresent, wantData},
		{"nbdkit", urlKit, nil, allPresent, make([]byte, size)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := openRaw(t, tt.url, true, &vdisk.OpenOptions{StorageOptions: tt.opts})
			got := make(presentMap, size/4096)
			var states []string
			err := d.Map(context.Background(), 0, size, func(e vdisk.Extent) error {
				got.set(e.Start, e.Length, e.Present())
				// A range that is not held must read as zeros.
				if !e.Present() {
					for i := e.Start; i < e.Start+e.Length; i++ {
						if tt.data[i] != 0 {
							t.Errorf("unallocated run [%d,+%d) reads %#x at %d", e.Start, e.Length, tt.data[i], i)
							break
						}
					}
				}
				states = append(states, e.State.String())
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if i := firstDiffBool(got, tt.want); i >= 0 {
				t.Fatalf("at %d: present=%v, want %v (runs %v)", i*4096, got[i], tt.want[i], states)
			}
			if b := readAll(t, d); firstDiff(b, tt.data) >= 0 {
				t.Fatalf("reads differ at %d", firstDiff(b, tt.data))
			}
			t.Logf("runs: %s", strings.Join(states, " "))
		})
	}
}

func firstDiffBool(a, b presentMap) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// TestAllocationDepthOwnServer: vdisk's own server offers
// qemu:allocation-depth for a chain it serves; the client's map of it
// matches qemu-img map of the local chain.
func TestAllocationDepthOwnServer(t *testing.T) {
	dir := t.TempDir()
	top := chainQcow2(t, dir)
	const size = 4 << 20
	want := make(presentMap, size/4096)
	for _, e := range qemutest.Map(t, "qcow2", top) {
		want.set(e.Start, e.Length, e.Present)
	}
	d, err := vdisk.Open(context.Background(), top, &vdisk.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	sock := filepath.Join(t.TempDir(), "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	srv := &nbd.Server{Persistent: true, Exports: []*nbd.Export{{Name: "c", Disk: d, ReadOnly: true}}}
	go func() { done <- srv.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	r := openRaw(t, "nbd+unix:///c?socket="+sock, true, nil)
	got := make(presentMap, size/4096)
	if err := r.Map(context.Background(), 0, size, func(e vdisk.Extent) error {
		got.set(e.Start, e.Length, e.Present())
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if i := firstDiffBool(got, want); i >= 0 {
		t.Fatalf("at %d: present=%v, want %v", i*4096, got[i], want[i])
	}
	local := readAll(t, d)
	if b := readAll(t, r); firstDiff(b, local) >= 0 {
		t.Fatalf("reads differ at %d", firstDiff(b, local))
	}
}
