package vhdx

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/model"
	"github.com/vdisk/vdisk/internal/qemutest"
)

// TestQemuAcceptsOurImages: dynamic and fixed images vdisk makes (every
// block size class, log size, zero state, 4 KiB sectors, odd sizes),
// written at random with zeroes and discards, pass qemu-img check, compare
// equal to the model's content, and take qemu-io writes that read back in
// vdisk.
func TestQemuAcceptsOurImages(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	for i, c := range []struct {
		name string
		size int64
		opts []string
	}{
		{"dynamic", 40 << 20, nil},
		{"dynamic-1M", 24 << 20, []string{"block_size=1M"}},
		{"dynamic-256M", 257 << 20, []string{"block_size=256M"}},
		{"log-3M", 16 << 20, []string{"log_size=3M", "block_size=2M"}},
		{"zero-off", 16 << 20, []string{"block_state_zero=off", "block_size=1M"}},
		{"fixed", 20 << 20, []string{"subformat=fixed", "block_size=1M"}},
		{"fixed-zero-off", 12 << 20, []string{"subformat=fixed", "block_state_zero=off"}},
		{"sector-4k", 16 << 20, []string{"logical_sector_size=4096", "block_size=1M"}},
		{"odd-size", 3146240, []string{"block_size=1M"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := filepath.Join(dir, c.name+".vhdx")
			d := createVHDX(t, nil, f, c.size, "", disktest.KVs(c.opts...)...)
			m := model.New(d.Size())
			rng := rand.New(rand.NewPCG(uint64(i), 1))
			for k := 0; k < 40; k++ {
				n := rng.Int64N(3<<20) + 1
				if rng.IntN(3) == 0 {
					n = (n/512 + 1) * 512
				}
				n = min(n, d.Size())
				off := rng.Int64N(d.Size() - n + 1)
				switch rng.IntN(10) {
				case 0:
					if err := d.WriteZeroes(off, n, rng.IntN(2) == 0); err != nil {
						t.Fatal(err)
					}
					m.Zero(off, n)
				case 1:
					if err := d.Discard(off, n); err != nil {
						t.Fatal(err)
					}
					m.Discard(off, n)
				case 2:
					if err := d.Flush(); err != nil {
						t.Fatal(err)
					}
				default:
					p := disktest.Fill(int(n), byte(k+1))
					disktest.MustWrite(t, d, m, p, off)
				}
			}
			got := disktest.ReadAll(t, d)
			if bad := m.Check(got, 0); bad >= 0 {
				t.Fatalf("byte %d differs from the model", bad)
			}
			m.Learn(got, 0)
			disktest.MustClose(t, d)
			if c.name == "sector-4k" {
				// qemu opens only 512-byte logical sectors (ENOTSUP).
				d2 := openVHDX(t, nil, f, true)
				if got := disktest.ReadAll(t, d2); !bytes.Equal(got, m.Data) {
					t.Fatal("reopened image differs from the model")
				}
				disktest.MustClose(t, d2)
				return
			}
			qemutest.Check(t, "vhdx", f)
			raw := f + ".raw"
			if err := os.WriteFile(raw, m.Data, 0o644); err != nil {
				t.Fatal(err)
			}
			if !qemutest.Compare(t, "vhdx", f, "raw", raw) {
				t.Fatal("qemu-img compare: the image differs from the model")
			}
			// qemu-io writes into our image; vdisk reads them.
			qemutest.IO(t, "vhdx", f, "write -P 0x5a 4096 8192", fmt.Sprintf("write -P 0x5b %d 4096", d.Size()-4096))
			copy(m.Data[4096:], disktest.Fill(8192, 0x5a))
			copy(m.Data[d.Size()-4096:], disktest.Fill(4096, 0x5b))
			qemutest.Check(t, "vhdx", f)
			d2, err := vdisk.Open(ctx, f, &vdisk.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			if got := disktest.ReadAll(t, d2); !bytes.Equal(got, m.Data) {
				t.Fatal("vdisk reads qemu-io's writes wrong")
			}
			disktest.MustClose(t, d2)
		})
	}
}
