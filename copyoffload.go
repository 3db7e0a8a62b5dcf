package vdisk

import (
	"context"
	"errors"
	"io"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vdisk/vdisk/driver"
)

// Copy offload: a convert whose source runs are byte-for-byte extents of a
// local file and whose target can take bytes straight from a file (a raw
// image on osfs) copies those runs inside the kernel: FICLONERANGE where
// the file system shares blocks (nothing is copied at all), else
// copy_file_range(2) (no pass through user space; on NFS/SMB a server-side
// copy). This is qemu-img convert -C, done by default where it is safe:
// only plain data runs are offloaded (never compressed or encrypted ones,
// which FileExtent does not map), zero runs keep their sparse handling,
// and any refusal falls back to reading and writing.
//
// The two optional image interfaces below are meant for the driver SDK;
// they use only driver types so that drivers can implement them today.

// FileExtenter is implemented by images whose content is, over some runs,
// stored plainly in a file they own: raw images, fixed VHD and VDI data
// areas, flat VMDK extents, uncompressed unencrypted qcow2 clusters.
type FileExtenter interface {
	// FileExtent maps [off, off+n) of the image's own content (not its
	// parent's) to a file: bytes off.. are f's bytes fileOff.. for length
	// bytes (0 < length <= n). f is nil where the run is not stored plainly
	// (not allocated, compressed, encrypted, ...); length still says how
	// far that holds. holes reports that the range may contain holes of f
	// (reading as zeros) that the image's Status does not show, so the
	// caller asks f (driver.HoleSeeker) before copying.
	FileExtent(off, n int64) (f driver.File, fileOff, length int64, holes bool, err error)
}

// ExtentPinner is implemented by FileExtenter images whose stored runs
// can move inside their file while the Disk's range lock on those runs is
// held: a VDI image packs its data blocks (moving blocks of other ranges)
// when a discard elsewhere frees one. The converter pins the image before
// FileExtent and unpins it after the copy that used the answer, so the
// extent cannot go stale in between. FileExtent of such an image is only
// called while pinned, and must not wait for anything a pin holds off.
type ExtentPinner interface {
	PinExtents() (unpin func())
}

// FileCopier is implemented by images that can take a run of bytes
// straight from a file (copy_file_range), as a write of those bytes at off
// would store them.
type FileCopier interface {
	// CopyFrom copies n bytes of src from srcOff into the image at off and
	// returns the bytes copied. It fails with an error wrapping
	// driver.ErrUnsupported, having copied nothing, where it cannot (src
	// on another storage, a kernel or file system without the copy).
	CopyFrom(src driver.File, srcOff, off, n int64) (int64, error)
}

// ConvertStats counts what a Convert did, in bytes of virtual size (the
// JSON names are convert's --output json statistics, which add
// "copy-file-range-bytes", Offloaded - Reflinked, and "elapsed-seconds").
// Every byte of the source is counted once in Written, Offloaded, Zero or
// Skipped.
type ConvertStats struct {
	// Read is the data read from the source through vdisk (and then
	// written, or found to be zeros).
	Read int64 `json:"read-bytes"`
	// Written is the data written through the target's write path.
	Written int64 `json:"written-bytes"`
	// Offloaded is the data the kernel copied file to file (reflinked or
	// copy_file_range) without it passing through vdisk.
	Offloaded int64 `json:"offloaded-bytes"`
	// Reflinked is the part of Offloaded the file system shared between
	// the files (FICLONERANGE) instead of copying it.
	Reflinked int64 `json:"reflinked-bytes"`
	// Zero is the runs that read as zeros: left as holes on a zeroed
	// target, or written as zeroes on one that is not.
	Zero int64 `json:"zero-bytes"`
	// Skipped is data not copied because the target's backing holds it
	// (an incremental copy, ConvertOptions.Above).
	Skipped int64 `json:"skipped-bytes"`
	// Elapsed is the wall-clock time the convert took.
	Elapsed time.Duration `json:"-"`
}

// convStats is the converter's live counters.
type convStats struct {
	read, written, offloaded, zero, skipped atomic.Int64
	start                                   time.Time
	// cloned reads the target's count of reflinked bytes (nil: none).
	cloned      func() int64
	clonedStart int64
}

// begin starts the clock and notes the target's reflink count.
func (s *convStats) begin(dst *Disk) {
	s.start = time.Now()
	if c, ok := dst.Top().img.(cloneCounter); ok {
		s.cloned = c.ClonedBytes
		s.clonedStart = c.ClonedBytes()
	}
}

func (s *convStats) result() ConvertStats {
	r := ConvertStats{Read: s.read.Load(), Written: s.written.Load(), Offloaded: s.offloaded.Load(), Zero: s.zero.Load(), Skipped: s.skipped.Load()}
	if !s.start.IsZero() {
		r.Elapsed = time.Since(s.start)
	}
	if s.cloned != nil {
		r.Reflinked = min(max(s.cloned()-s.clonedStart, 0), r.Offloaded)
	}
	return r
}

// cloneCounter is a FileCopier that counts the bytes it shared by
// reflink rather than copied (raw on osfs).
type cloneCounter interface {
	ClonedBytes() int64
}

// setupPieces decides how data jobs run. offload: the target top can copy
// from files and nothing has to look at the bytes (no compression, no
// forced full allocation). pieces: data jobs are split by what the source
// stores where (offload, or a source layer whose file extents may hold
// holes its Status does not show: those read as zeros without reading).
func (c *converter) setupPieces() {
	if c.cw != nil || c.zd < 0 || c.o.Above > 0 {
		return
	}
	if _, ok := c.dst.Top().img.(FileCopier); ok && !c.o.NoOffload {
		c.offload, c.pieces = true, true
		return
	}
	for _, l := range c.src.Layers() {
		if _, ok := l.img.(FileExtenter); ok {
			c.pieces = true
		}
	}
}

// pieceKind is what offloadPiece found at the start of a range.
type pieceKind int

const (
	pieceCopied   pieceKind = iota // copied by the kernel
	pieceZero                      // reads as zeros: nothing to copy
	pieceFallback                  // not a plain file extent: read and write it
	pieceNeedTurn                  // would copy, but the write turn is not held yet
)

// offloadJob copies a data job's range with the kernel where it can,
// falling back to convertJob for the pieces it cannot (and, after a
// refusal, for the rest of the convert).
func (c *converter) offloadJob(ctx context.Context, j convJob, buf []byte) error {
	// Copies happen under the source's locks, which must not be held while
	// waiting for a turn: a piece that would copy first comes back for the
	// turn, then runs again. Pieces read and written take their turn
	// after reading (convertJob), so reads still run in parallel.
	turn := !c.o.Sequential
	end := j.off + j.n
	for p := j.off; p < end; {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		kind, n := pieceFallback, end-p
		if c.pieces {
			var err error
			kind, n, err = c.offloadPiece(p, end-p, turn)
			if err == nil && kind == pieceNeedTurn {
				if !c.seq.wait(j.seq) {
					return ctx.Err()
				}
				turn = true
				continue
			}
			if errors.Is(err, driver.ErrUnsupported) {
				// Refused (another file system, no kernel support): the
				// rest of the convert reads and writes.
				c.noOffload.Store(true)
				kind, n = pieceFallback, end-p
			} else if err != nil {
				return err
			}
		}
		switch kind {
		case pieceCopied:
			c.stats.offloaded.Add(n)
		case pieceZero:
			c.stats.zero.Add(n)
			if c.o.TargetNotZero {
				if !turn && !c.seq.wait(j.seq) {
					return ctx.Err()
				}
				turn = true
				if err := c.dst.WriteZeroes(p, n, true); err != nil {
					return err
				}
			}
		case pieceFallback:
			turn = turn || c.o.Sequential // convertJob takes it
			sub := convJob{seq: j.seq, off: p, n: n, data: true}
			if err := convertJob(ctx, c.dst, c.src, sub, buf[p-j.off:p-j.off+n], c.zd, c.o, c.seq.wait, &c.stats); err != nil {
				return err
			}
		}
		p += n
	}
	// Every job takes its turn, even one that wrote nothing: the turns
	// count finished jobs (work calls finish after each).
	if !turn && !c.seq.wait(j.seq) {
		return ctx.Err()
	}
	return nil
}

// offloadPiece looks at the run of the source starting at off (at most n
// bytes) and copies it with the kernel if it is a plain file extent. It
// returns what it found and the length of that piece.
func (c *converter) offloadPiece(off, n int64, turn bool) (pieceKind, int64, error) {
	src := c.src
	src.mu.RLock()
	defer src.mu.RUnlock()
	if err := src.check(off, n); err != nil {
		return 0, 0, err
	}
	r := src.lockRange(off, n, false)
	defer src.locks.Unlock(r)
	e, err := src.statusFrom(0, off, n)
	if err != nil {
		return 0, 0, err
	}
	if e.Length <= 0 || e.Length > n {
		return 0, 0, driver.Errorf(driver.ErrCorrupt, src.name(), off, "status returned a run of %d bytes for %d", e.Length, n)
	}
	if !e.IsData() {
		return pieceZero, e.Length, nil
	}
	l := src.layers[e.Depth]
	fe, ok := l.img.(FileExtenter)
	if !ok || e.Compressed {
		return pieceFallback, e.Length, nil
	}
	if p, ok := l.img.(ExtentPinner); ok {
		unpin := p.PinExtents()
		defer unpin()
	}
	f, foff, length, holes, err := fe.FileExtent(off, e.Length)
	if err != nil {
		return 0, 0, driver.WithFile(err, "map", l.Name)
	}
	if length <= 0 || length > e.Length || foff < 0 {
		return 0, 0, driver.Errorf(driver.ErrCorrupt, l.Name, off, "file extent of %d bytes at %d for a run of %d", length, foff, e.Length)
	}
	if f == nil {
		return pieceFallback, length, nil
	}
	kind := pieceCopied
	if !c.offload || c.noOffload.Load() {
		kind = pieceFallback
	}
	if hs, ok := f.(driver.HoleSeeker); ok && holes {
		// A hole of the file inside a data run (a VHD block written
		// partly) reads as zeros: copying it would allocate it.
		if end, ok := c.seeks.dataAt(f, foff); ok {
			length = min(length, end-foff)
		} else {
			data, err := hs.SeekData(foff)
			if errors.Is(err, io.EOF) {
				return pieceZero, length, nil
			} else if err != nil {
				return 0, 0, driver.WithFile(err, "seek data", l.Name)
			}
			if data > foff {
				return pieceZero, min(length, data-foff), nil
			}
			hole, err := hs.SeekHole(foff)
			if err != nil {
				return 0, 0, driver.WithFile(err, "seek hole", l.Name)
			}
			if hole > foff {
				length = min(length, hole-foff)
				c.seeks.learn(f, foff, hole)
			}
		}
	}
	if holes {
		// The file's holes are file-block aligned, which the run's
		// granules need not be (a VHD's data area starts 512 bytes into
		// its block): a piece may start or end with a fragment of a
		// granule holding only the zeros around a hole. Copying that
		// fragment would allocate the target's granule for nothing.
		zk, zn, err := c.zeroFragment(f, foff, off, length)
		if err != nil {
			return 0, 0, driver.WithFile(err, "read", l.Name)
		}
		if zk {
			return pieceZero, zn, nil
		}
		length = zn
	}
	if kind == pieceFallback {
		return kind, length, nil
	}
	if !turn {
		return pieceNeedTurn, length, nil
	}
	done, err := c.dst.copyFrom(f, foff, off, length)
	if err != nil {
		return 0, 0, err
	}
	if done == 0 {
		// The file ends early (it shrank?): let the read path judge.
		return pieceFallback, length, nil
	}
	return pieceCopied, done, nil
}

// dataRuns remembers, per source file, a run SEEK_HOLE found to be data,
// so that the pieces inside it need no lseek. On a file with unwritten
// extents in the page cache (preallocated, or left by XFS's speculative
// preallocation, and read once) the kernel answers SEEK_HOLE by walking
// the cached pages up to the next real hole, up to the file's end: asked
// again for every piece, that is quadratic (a 2 GiB VHD made by qemu-img on
// XFS took 5.8 s to convert, 2.8 ms per lseek). Only data is remembered:
// should the file change meanwhile, a run remembered as data that became a
// hole is copied as the zeros it reads, never skipped.
type dataRuns struct {
	mu   sync.Mutex
	runs map[driver.File][2]int64 // [start, end) of data
}

// keyable reports whether f can be a map key: a File of a storage from
// outside may be a struct value that Go cannot compare (it is then not
// remembered, rather than panic).
func keyable(f driver.File) bool { return reflect.TypeOf(f).Comparable() }

// dataAt returns the end of the remembered data run holding off.
func (d *dataRuns) dataAt(f driver.File, off int64) (int64, bool) {
	if !keyable(f) {
		return 0, false
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	r, ok := d.runs[f]
	if !ok || off < r[0] || off >= r[1] {
		return 0, false
	}
	return r[1], true
}

// learn records that f holds data in [start, end), joined to the run known
// before where the two meet.
func (d *dataRuns) learn(f driver.File, start, end int64) {
	if !keyable(f) {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.runs == nil {
		d.runs = map[driver.File][2]int64{}
	}
	if r, ok := d.runs[f]; ok && start <= r[1] && r[0] <= end {
		start, end = min(start, r[0]), max(end, r[1])
	}
	d.runs[f] = [2]int64{start, end}
}

// copyFrom copies n bytes of f from foff into the top at off through the
// top's FileCopier, under the locks and bookkeeping of a write.
func (d *Disk) copyFrom(f driver.File, foff, off, n int64) (int64, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if err := d.writable(); err != nil {
		return 0, err
	}
	if err := d.check(off, n); err != nil {
		return 0, err
	}
	top := d.layers[0]
	cp, ok := top.img.(FileCopier)
	if !ok {
		return 0, driver.Errorf(ErrUnsupported, top.Name, off, "format %s cannot copy from files", top.Format.Name)
	}
	h := d.lockRange(off, n, true)
	defer d.locks.Unlock(h)
	d.markDirty(off, n)
	done, err := cp.CopyFrom(f, foff, off, n)
	return done, driver.WithFile(err, "copy", top.Name)
}

// maxFragment bounds the zero detection granule zeroFragment reads at a
// piece's ends.
const maxFragment = 64 << 10

// zeroFragment looks at the ends of the piece [off, off+n) stored at foff
// of f, where they are fragments of zero detection granules (ConvertOptions
// ZeroDetect). A leading fragment of zeros is a zero piece of its own
// (zero true, zn its length); otherwise zn is the piece's length without a
// trailing fragment of zeros (read again as its own piece next).
func (c *converter) zeroFragment(f driver.File, foff, off, n int64) (zero bool, zn int64, err error) {
	zd := c.zd
	if zd <= 0 || zd > maxFragment || (off%zd == 0 && (off+n)%zd == 0) {
		return false, n, nil
	}
	buf := make([]byte, min(n, zd))
	isZero := func(at, k int64) (bool, error) {
		b := buf[:k]
		got, err := f.ReadAt(b, foff+at)
		if got < len(b) && (err == nil || errors.Is(err, io.EOF)) {
			clear(b[got:]) // past the end of the file: zeros
			err = nil
		}
		return err == nil && driver.IsZero(b), err
	}
	// The first granule's part: a fragment unless it is a whole granule.
	g := min(n, zd-off%zd)
	if g < zd {
		z, err := isZero(0, g)
		if err != nil || z {
			return z, g, err
		}
	}
	// The last granule's part, when it is not the first's.
	if t := (off + n) % zd; t != 0 && n-t >= g {
		z, err := isZero(n-t, t)
		if err != nil {
			return false, 0, err
		}
		if z {
			return false, n - t, nil
		}
	}
	return false, n, nil
}
