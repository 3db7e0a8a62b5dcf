package iscsistore

import (
	"context"
	"io"
	"sync"
	"sync/atomic"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/rangelock"
	"github.com/vdisk/vdisk/iscsi"
)

// File is an open LUN.
type File struct {
	name  string
	sess  *iscsi.Session
	d     *iscsi.Disk
	ro    bool
	size  int64
	bs    int64
	chunk int64 // bytes per READ/WRITE command: MaxBurstLength in blocks
	locks rangelock.Locker
	// holes: deallocated blocks read zeros, so GET LBA STATUS can report
	// them as holes; cleared when the target turns out not to have it.
	holes  atomic.Bool
	closed atomic.Bool
	// onClose, if set, runs once at Close (the storage forgets the file).
	onClose func()
}

// parallel bounds the commands one request keeps in flight.
const parallel = 8

func openFile(ctx context.Context, st *Storage, ro bool) (*File, error) {
	name := st.loc.String()
	cfg, err := st.config()
	if err != nil {
		return nil, err
	}
	defer wipeAuth(&cfg)
	s, err := iscsi.Dial(ctx, cfg)
	if err != nil {
		return nil, mapError(err, "open", name, -1)
	}
	d, err := iscsi.OpenDisk(ctx, s, st.loc.LUN)
	if err != nil {
		s.Close()
		return nil, mapError(err, "open", name, -1)
	}
	bs := int64(d.BlockSize)
	chunk := int64(s.Params().MaxBurstLength) / bs * bs
	chunk = max(chunk, bs)
	f := &File{name: name, sess: s, d: d, ro: ro, size: d.Size(), bs: bs, chunk: chunk}
	f.holes.Store(d.LBPME && d.LBPRZ)
	return f, nil
}

// Name is the URL without a password.
func (f *File) Name() string { return f.name }

// Disk exposes the LUN (INQUIRY data, provisioning).
func (f *File) Disk() *iscsi.Disk { return f.d }

// Session exposes the initiator session (tests count reconnects).
func (f *File) Session() *iscsi.Session { return f.sess }

// Size is the LUN's capacity.
func (f *File) Size() (int64, error) { return f.size, nil }

func (f *File) ctx() context.Context { return context.Background() }

func (f *File) alive(op string, off int64) error {
	if f.closed.Load() {
		return driver.Errorf(driver.ErrClosed, f.name, off, "%s after close", op)
	}
	return nil
}

// blocks returns the whole-block cover of [off, off+n).
func (f *File) blocks(off, n int64) (int64, int64) {
	a := off / f.bs * f.bs
	b := (off + n + f.bs - 1) / f.bs * f.bs
	return a, b
}

// ReadAt reads any byte range; a short read at the end is io.EOF.
func (f *File) ReadAt(p []byte, off int64) (int, error) {
	if err := f.alive("read", off); err != nil {
		return 0, err
	}
	if off < 0 {
		return 0, driver.Errorf(driver.ErrOutOfRange, f.name, off, "negative offset")
	}
	if off >= f.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := min(int64(len(p)), f.size-off)
	if n == 0 {
		return 0, nil
	}
	a, b := f.blocks(off, n)
	lk := f.locks.Lock(a, b-a, false)
	defer f.locks.Unlock(lk)
	var err error
	if a == off && b == off+n {
		err = f.readBlocks(p[:n], a)
	} else {
		buf := make([]byte, b-a)
		if err = f.readBlocks(buf, a); err == nil {
			copy(p, buf[off-a:off-a+n])
		}
	}
	if err != nil {
		return 0, err
	}
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

// readBlocks reads whole blocks at byte offset a, in chunk-sized commands
// kept in flight together.
func (f *File) readBlocks(p []byte, a int64) error {
	return f.split(p, a, "read", func(q []byte, off int64) error {
		return f.d.Read(f.ctx(), uint64(off/f.bs), q)
	})
}

func (f *File) writeBlocks(p []byte, a int64) error {
	return f.split(p, a, "write", func(q []byte, off int64) error {
		return f.d.Write(f.ctx(), uint64(off/f.bs), q)
	})
}

func (f *File) split(p []byte, a int64, op string, do func(q []byte, off int64) error) error {
	if int64(len(p)) <= f.chunk {
		return mapError(do(p, a), op, f.name, a)
	}
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		first    error
		firstOff int64
		sem      = make(chan struct{}, parallel)
	)
	for i := int64(0); i < int64(len(p)); i += f.chunk {
		q := p[i:min(int64(len(p)), i+f.chunk)]
		off := a + i
		sem <- struct{}{}
		mu.Lock()
		failed := first != nil
		mu.Unlock()
		if failed {
			// Do not start more commands after one failed: a lost
			// target would make each of them wait out the login retries.
			<-sem
			break
		}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			if err := do(q, off); err != nil {
				mu.Lock()
				if first == nil || off < firstOff {
					first, firstOff = err, off
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return mapError(first, op, f.name, firstOff)
}

// WriteAt writes any byte range inside the LUN; partial blocks at the
// edges are read, patched and written back under the range lock.
func (f *File) WriteAt(p []byte, off int64) (int, error) {
	if err := f.alive("write", off); err != nil {
		return 0, err
	}
	if f.ro {
		return 0, driver.Errorf(driver.ErrReadOnly, f.name, off, "opened read-only")
	}
	n := int64(len(p))
	if off < 0 || off > f.size || n > f.size-off {
		return 0, driver.Errorf(driver.ErrOutOfRange, f.name, off, "write of %d bytes beyond the %d-byte LUN (an iSCSI LUN does not grow)", n, f.size)
	}
	if n == 0 {
		return 0, nil
	}
	a, b := f.blocks(off, n)
	lk := f.locks.Lock(a, b-a, true)
	defer f.locks.Unlock(lk)
	if err := f.writeLocked(p, off, a, b); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (f *File) writeLocked(p []byte, off, a, b int64) error {
	n := int64(len(p))
	if a == off && b == off+n {
		return f.writeBlocks(p, a)
	}
	// Head and tail blocks that p covers only in part.
	if b-a <= 2*f.bs || b-a <= f.chunk {
		buf := make([]byte, b-a)
		if err := f.edges(buf, a, b, off, n); err != nil {
			return err
		}
		copy(buf[off-a:], p)
		return f.writeBlocks(buf, a)
	}
	ha, hb := a, a+f.bs
	ta, tb := b-f.bs, b
	if off > ha {
		head := make([]byte, f.bs)
		if err := f.readBlocks(head, ha); err != nil {
			return err
		}
		copy(head[off-ha:], p[:hb-off])
		if err := f.writeBlocks(head, ha); err != nil {
			return err
		}
		p, off = p[hb-off:], hb
	}
	if end := off + int64(len(p)); end < tb {
		tail := make([]byte, f.bs)
		if err := f.readBlocks(tail, ta); err != nil {
			return err
		}
		copy(tail, p[ta-off:])
		if err := f.writeBlocks(tail, ta); err != nil {
			return err
		}
		p = p[:ta-off]
	}
	return f.writeBlocks(p, off)
}

// edges reads the first and last block of [a, b) into buf where
// [off, off+n) does not cover them whole.
func (f *File) edges(buf []byte, a, b, off, n int64) error {
	if off > a {
		if err := f.readBlocks(buf[:f.bs], a); err != nil {
			return err
		}
	}
	if off+n < b && (b-f.bs > a || off == a) {
		if err := f.readBlocks(buf[b-a-f.bs:], b-f.bs); err != nil {
			return err
		}
	}
	return nil
}

// Truncate cannot change a LUN; truncating to its own size is a no-op.
func (f *File) Truncate(size int64) error {
	if size == f.size {
		return nil
	}
	return driver.Errorf(driver.ErrUnsupported, f.name, size, "an iSCSI LUN of %d bytes cannot be resized to %d", f.size, size)
}

// Sync flushes the target's write cache.
func (f *File) Sync() error {
	if err := f.alive("sync", -1); err != nil {
		return err
	}
	return mapError(f.d.Sync(f.ctx()), "sync", f.name, -1)
}

// Close logs out.
func (f *File) Close() error {
	if f.closed.Swap(true) {
		return nil
	}
	// A failed logout still closes the connection, and the LUN holds
	// nothing of ours that it could lose, so it is not an error.
	_ = f.sess.Close()
	if f.onClose != nil {
		f.onClose()
	}
	return nil
}
