package luks

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/storage/faultfs"
	"github.com/vdisk/vdisk/storage/memfs"
)

const crashSize = 256 << 10

// crashWorkload writes 120 random pieces, flushing after every tenth, and
// returns the content as of the last flush that completed.
func crashWorkload(d *vdisk.Disk) []byte {
	rng := rand.New(rand.NewPCG(1, 2))
	cur := make([]byte, crashSize)
	flushed := append([]byte(nil), cur...)
	for i := 0; i < 120; i++ {
		n := rng.IntN(9000) + 1
		off := rng.Int64N(crashSize - int64(n))
		p := make([]byte, n)
		for j := range p {
			p[j] = byte(rng.Uint32())
		}
		if _, err := d.WriteAt(p, off); err != nil {
			return flushed
		}
		copy(cur[off:], p)
		if i%10 == 9 {
			if err := d.Flush(); err != nil {
				return flushed
			}
			copy(flushed, cur)
		}
	}
	return flushed
}

// TestCrash: a crash after any write of a workload leaves a volume that
// opens with its passphrase and reads what was flushed (sectors are
// rewritten in place, one write each: no metadata is at stake).
func TestCrash(t *testing.T) {
	base := memfs.New()
	d := createLUKS(t, base, "/c.luks", crashSize, "crash")
	disktest.MustClose(t, d)
	img, err := base.ReadFile("/c.luks")
	if err != nil {
		t.Fatal(err)
	}
	run := func(crashAt int) (*faultfs.FS, []byte, int) {
		st := memfs.New()
		st.WriteFile("/c.luks", img)
		fs := faultfs.New(st)
		d := mustOpen(t, fs, "/c.luks", "crash", false)
		if crashAt > 0 {
			fs.CrashAfterWrites(crashAt)
		}
		want := crashWorkload(d)
		d.CloseUnsynced()
		return fs, want, fs.Writes()
	}
	_, _, total := run(0)
	if total < 100 {
		t.Fatalf("the workload made only %d writes", total)
	}
	for k := 1; k <= total; k++ {
		fs, want, _ := run(k)
		if !fs.Crashed() {
			t.Fatalf("crash point %d never reached", k)
		}
		d := mustOpen(t, fs.Durable(), "/c.luks", "crash", true)
		if got := disktest.ReadAll(t, d); !bytes.Equal(got, want) {
			t.Fatalf("crash after write %d: content differs from what was flushed", k)
		}
		disktest.MustClose(t, d)
	}
	t.Logf("%d crash points", total)
}

// TestKillDuringAmend: a process killed after any write of an amend that
// adds a key slot and then erases the old one leaves a volume that one of
// the two passphrases opens, with its content intact, for LUKS1 and LUKS2.
func TestKillDuringAmend(t *testing.T) {
	for _, v := range []string{"1", "2"} {
		base := memfs.New()
		d := createLUKS(t, base, "/a.luks", 64<<10, "old", "luks-version="+v)
		data := disktest.Fill(64<<10, 0x5c)
		disktest.MustWrite(t, d, nil, data, 0)
		disktest.MustClose(t, d)
		img, _ := base.ReadFile("/a.luks")
		amend := func(killAt int) (*memfs.FS, *faultfs.FS) {
			st := memfs.New()
			st.WriteFile("/a.luks", img)
			fs := faultfs.New(st)
			sm := secrets("sec0", "old", "sec1", "new")
			d, err := vdisk.Open(ctx, "/a.luks", &vdisk.OpenOptions{Format: "luks", Storage: fs, Secrets: sm, Options: disktest.KVs("key-secret=sec0")})
			if err != nil {
				t.Fatal(err)
			}
			if killAt > 0 {
				fs.KillAfterWrites(killAt)
			}
			if err := d.Amend(ctx, disktest.KVs("state=active,new-secret=sec1,iter-time=0")); err == nil {
				d.Amend(ctx, disktest.KVs("state=inactive,keyslot=0"))
			}
			d.CloseUnsynced()
			return st, fs
		}
		_, fs := amend(0)
		total := fs.Writes()
		if total < 4 {
			t.Fatalf("v%s: the amend made %d writes", v, total)
		}
		for k := 1; k <= total; k++ {
			st, fs := amend(k)
			if !fs.Crashed() {
				t.Fatalf("v%s: kill point %d never reached", v, k)
			}
			var d *vdisk.Disk
			var err error
			for _, pass := range []string{"new", "old"} {
				if d, err = openLUKS(st, "/a.luks", pass, true); err == nil {
					break
				}
			}
			if err != nil {
				t.Fatalf("v%s: killed after write %d of %d: no passphrase opens the volume: %v", v, k, total, err)
			}
			if got := disktest.ReadAll(t, d); !bytes.Equal(got, data) {
				t.Fatalf("v%s: killed after write %d: content changed", v, k)
			}
			disktest.MustClose(t, d)
		}
		// Afterwards only the new passphrase opens it.
		st, _ := amend(0)
		if _, err := openLUKS(st, "/a.luks", "old", true); err == nil {
			t.Fatalf("v%s: the erased passphrase still opens the volume", v)
		}
		mustOpen(t, st, "/a.luks", "new", true).Close()
	}
}
