package vhdx

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/disktest"
	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/memfs"
)

// packSparse encodes an image as its size and its non-zero 512-byte
// sectors, so that multi-MiB seeds stay a few KiB for the fuzzer:
// 8 bytes of file size, then runs of (4-byte sector index, 2-byte sector
// count, the sectors).
func packSparse(b []byte) []byte {
	out := binary.LittleEndian.AppendUint64(nil, uint64(len(b)))
	const s = 512
	for i := 0; i < len(b); {
		if driver.IsZero(b[i:min(i+s, len(b))]) {
			i += s
			continue
		}
		j := i
		for j < len(b) && j-i < 60000*s && !driver.IsZero(b[j:min(j+s, len(b))]) {
			j += s
		}
		j = min(j, len(b))
		n := (j - i + s - 1) / s
		out = binary.LittleEndian.AppendUint32(out, uint32(i/s))
		out = binary.LittleEndian.AppendUint16(out, uint16(n))
		out = append(out, b[i:j]...)
		out = append(out, make([]byte, n*s-(j-i))...)
		i = j
	}
	return out
}

// maxFuzzFile bounds the files the fuzzer builds: the status walk visits
// every block the BAT (inside the file) can describe.
const maxFuzzFile = 12 << 20

// unpackSparse writes what packSparse encoded into file f (sizes bounded
// by maxFuzzFile).
func unpackSparse(data []byte, f driver.File) {
	if len(data) < 8 {
		f.WriteAt(data, 0)
		return
	}
	size := int64(binary.LittleEndian.Uint64(data) % maxFuzzFile)
	f.Truncate(size)
	data = data[8:]
	for len(data) >= 6 {
		off := int64(binary.LittleEndian.Uint32(data)) * 512 % maxFuzzFile
		n := int(binary.LittleEndian.Uint16(data[4:])) * 512
		data = data[6:]
		n = min(n, len(data))
		f.WriteAt(data[:n], off)
		data = data[n:]
	}
}

// FuzzOpen: any input that opens reads its whole disk without error and
// its status runs tile the disk, with zero runs reading zeros. Seeds are
// made at test time (packed by packSparse): qemu-img/qemu-io images (dynamic, fixed, 1M blocks)
// and vdisk's own (dynamic with a log entry left to replay, a
// differencing image), each a few MiB (VHDX's smallest file is 4 MiB).
func FuzzOpen(f *testing.F) {
	qemutest.Require(f)
	// Not f.TempDir, and not in the fuzzer's workers (which fuzz what the
	// coordinator sends them): the fuzzer kills its workers when the time
	// is up, before their cleanups run.
	dir, err := os.MkdirTemp("", "vdisk-vhdx-seeds-")
	if err != nil {
		f.Fatal(err)
	}
	qemuSeeds := []struct{ size, opts, cmd string }{
		{"3M", "block_size=1M", "write -P 0x41 1M 5000"},
		{"2M", "subformat=fixed,block_size=1M", "write -P 0x42 4096 4096"},
	}
	if qemutest.FuzzWorker() {
		qemuSeeds = nil
	}
	for i, c := range qemuSeeds {
		p := filepath.Join(dir, "q.vhdx")
		qemutest.Create(f, "vhdx", p, c.size, c.opts)
		qemutest.IO(f, "vhdx", p, c.cmd)
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(packSparse(b))
		_ = i
	}
	os.RemoveAll(dir)
	b := smallImage(f)
	f.Add(packSparse(b))
	g := newGUID()
	withLog := append([]byte(nil), b...)
	rewriteHeaders(withLog, func(h *header) { h.logGUID = g })
	copy(withLog[mib:], encodeEntry(3, 0, g, int64(len(b)), int64(len(b)), []logWrite{{tBATOff, make([]byte, 4096)}}))
	f.Add(packSparse(withLog))
	f.Fuzz(fuzzOpen)
}

func fuzzOpen(t *testing.T, data []byte) {
	{
		mem := memfs.New()
		fl, _ := mem.Open("/f.vhdx", driver.ReadWrite|driver.Create)
		unpackSparse(data, fl)
		fl.Close()
		for _, ro := range []bool{true, false} {
			im, err := Format.Open(ctx, &driver.OpenParams{Storage: mem, Name: "/f.vhdx", ReadOnly: ro})
			if err != nil {
				continue
			}
			size := im.Size()
			buf := make([]byte, 1<<20)
			for off := int64(0); off < size; {
				e, err := im.Status(off, size-off)
				if err != nil {
					break // a damaged entry: an error, never a panic
				}
				if e.Length <= 0 || e.Length > size-off {
					t.Fatalf("status at %d: run of %d", off, e.Length)
				}
				for p := off; p < off+e.Length && e.State == driver.Data; {
					n := min(int64(len(buf)), off+e.Length-p)
					if _, err := im.ReadAt(buf[:n], p); err != nil {
						t.Fatalf("read of a data run at %d: %v", p, err)
					}
					p += n
				}
				off += e.Length
			}
			if !ro {
				im.WriteAt(disktest.Fill(1000, 7), 0)
				// Reorganising a hostile image fails or works, never
				// panics: grow (maybe moving the BAT), shrink back,
				// compact.
				r := im.(driver.Resizer)
				if r.Resize(ctx, size+mib, "") == nil {
					r.Resize(ctx, size, "")
				}
				im.(driver.Compacter).Compact(ctx, nil)
			}
			im.Close()
		}
	}
}
