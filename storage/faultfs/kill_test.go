package faultfs

import (
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/memfs"
)

// TestKill: a process kill keeps every completed write, synced or not, and
// freezes the storage after the chosen write.
func TestKill(t *testing.T) {
	mem := memfs.New()
	ffs := New(mem)
	a := mustOpen(t, ffs, "a", driver.ReadWrite|driver.Create)
	mustWrite(t, a, []byte("synced-a"), 0)
	mustSync(t, a)
	mustWrite(t, a, []byte("UNSYNC"), 0)
	ffs.KillAfterWrites(2)
	mustWrite(t, a, []byte("x"), 8) // write 1 after the rule
	if ffs.Crashed() {
		t.Fatal("killed too early")
	}
	mustWrite(t, a, []byte("y"), 9) // write 2: the last one
	if !ffs.Crashed() {
		t.Fatal("not killed after the chosen write")
	}
	checks := map[string]error{}
	_, checks["write"] = a.WriteAt([]byte("z"), 0)
	checks["sync"] = a.Sync()
	checks["truncate"] = a.Truncate(0)
	checks["punch"] = a.PunchHole(0, 1)
	checks["zero"] = a.(driver.ZeroRanger).ZeroRange(0, 1)
	checks["allocate"] = a.(driver.Allocator).Allocate(0, 10)
	checks["remove"] = ffs.Remove("a")
	checks["rename"] = ffs.Rename("a", "c")
	_, checks["create"] = ffs.Open("new", driver.ReadWrite|driver.Create)
	for op, err := range checks {
		if !errors.Is(err, ErrKilled) || errors.Is(err, ErrCrashed) {
			t.Errorf("%s after kill: %v, want ErrKilled", op, err)
		}
	}
	// The wrapped storage holds every completed write, unsynced ones too.
	if got, _ := mem.ReadFile("a"); string(got) != "UNSYNC-axy" {
		t.Fatalf("frozen content %q", got)
	}
	// A later power-loss crash is not a kill.
	ffs.Reset()
	ffs.CrashAfterWrites(0)
	if _, err := a.WriteAt([]byte("q"), 0); !errors.Is(err, ErrCrashed) {
		t.Fatalf("crash after reset: %v", err)
	}
}

// TestKillNow: n <= 0 kills at once, nothing more is written.
func TestKillNow(t *testing.T) {
	mem := memfs.New()
	ffs := New(mem)
	f := mustOpen(t, ffs, "a", driver.ReadWrite|driver.Create)
	mustWrite(t, f, []byte("kept"), 0)
	ffs.KillAfterWrites(0)
	if _, err := f.WriteAt([]byte("x"), 0); !errors.Is(err, ErrKilled) {
		t.Fatalf("write: %v", err)
	}
	if got, _ := mem.ReadFile("a"); string(got) != "kept" {
		t.Fatalf("content %q", got)
	}
}

// TestKillConcurrent: with writers racing, the storage holds exactly n
// writes after a kill after n.
func TestKillConcurrent(t *testing.T) {
	mem := memfs.New()
	ffs := New(mem)
	const n = 37
	ffs.KillAfterWrites(n)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			f, err := ffs.Open(fmt.Sprintf("f%d", g), driver.ReadWrite|driver.Create)
			if err != nil {
				return // killed before the create
			}
			defer f.Close()
			for i := int64(0); ; i++ {
				if _, err := f.WriteAt([]byte{1}, i); err != nil {
					return
				}
			}
		})
	}
	wg.Wait()
	total := 0
	for _, name := range mem.Names() {
		b, _ := mem.ReadFile(name)
		total += len(b)
	}
	if total != n {
		t.Fatalf("%d bytes written, want %d", total, n)
	}
}
