// Package faultfs wraps a driver.Storage to inject faults, for tests.
//
// An FS forwards everything to the storage it wraps, except when a rule
// says otherwise. Rules are set with methods (FailWriteAfter, FailReadAfter,
// ShortWrites, NoSpaceAfter, FailSync, CrashAfterWrites, KillAfterWrites)
// and cleared with Reset; all are safe to call concurrently with I/O.
//
// # Write operations
//
// The write rules and the Writes counter concern every operation that
// modifies a file through an open handle: WriteAt, Truncate, PunchHole,
// ZeroRange and Allocate. Each counts as one write. ShortWrites applies to
// WriteAt only; the NoSpaceAfter budget is consumed by WriteAt (the bytes
// written) and Allocate (the bytes asked for, all or nothing). Opening,
// reading, seeking and syncing are not writes.
//
// # Injected errors
//
// Injected errors are *driver.Error values naming the file and wrapping the
// rule's error; the default ones wrap both ErrInjected and a syscall.Errno
// (syscall.EIO, or syscall.ENOSPC for the space budget), so errors.Is works
// with either. A failed read returns 0 bytes and scribbles over the buffer,
// so that a caller ignoring the error reads garbage rather than plausible
// data.
//
// # Crashes and durability
//
// CrashAfterWrites simulates a power failure: once the chosen write has
// happened, every later write operation, Sync, Remove, Rename and
// Open with Create or Truncate fails with ErrCrashed. Reads keep working.
//
// KillAfterWrites simulates a process crash instead (the writer killed by
// SIGKILL while the kernel lives on): it stops the world after the chosen
// write the same way, but nothing is lost, since the kernel keeps every
// write(2) that returned. The wrapped storage then holds exactly the writes
// up to and including the chosen one; that, not Durable, is what to
// inspect. Later operations fail with ErrKilled.
//
// When the wrapped storage is a *memfs.FS, the FS also tracks what would
// survive a crash, and Durable returns it: a fresh memfs holding, for every
// file, its content as of its last successful Sync. The model is:
//
//   - The state of the wrapped memfs when New is called is durable.
//   - Data operations (WriteAt, Truncate, PunchHole, ZeroRange, Allocate,
//     and the truncation of Open with Truncate) are logged per file and
//     become durable when a Sync of that file (through any of its handles)
//     succeeds. A Sync makes only that file's operations durable. Failed
//     syncs make nothing durable and keep the operations pending.
//   - Metadata operations are durable at once: a file created by Open with
//     Create exists in the durable image immediately, empty (its content
//     arrives with its first Sync); Remove and Rename are durable when they
//     succeed. This models a journaling file system.
//
// Operations made on the wrapped memfs directly, bypassing the FS, are not
// tracked. With any other wrapped storage nothing is tracked and Durable
// returns a storage whose every method fails with driver.ErrUnsupported.
//
// # Optional interfaces
//
// Files returned by Open always implement driver.HoleSeeker,
// driver.ZeroRanger, driver.Allocator and driver.AllocatedSizer. They
// forward to the wrapped file when it implements them; otherwise SeekData
// and SeekHole report the whole file as data, ZeroRange writes zeros, and
// Allocate and AllocatedSize fail with driver.ErrUnsupported.
package faultfs

import (
	"errors"
	"strings"
	"sync"
	"syscall"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/memfs"
)

// ErrCrashed is returned by every modifying operation after a simulated
// crash (see CrashAfterWrites).
var ErrCrashed = errors.New("faultfs: simulated crash: storage is gone")

// ErrKilled is returned by every modifying operation after a simulated
// process kill (see KillAfterWrites).
var ErrKilled = errors.New("faultfs: simulated process kill: the writer is gone")

// ErrInjected is wrapped by the default errors the rules inject.
var ErrInjected = errors.New("faultfs: injected fault")

// injectedErr is a default injected error: it matches ErrInjected and its
// errno.
type injectedErr struct{ errno syscall.Errno }

func (e *injectedErr) Error() string   { return "injected fault: " + e.errno.Error() }
func (e *injectedErr) Unwrap() []error { return []error{ErrInjected, e.errno} }

// IOError returns a new injected I/O error, matching ErrInjected and
// syscall.EIO. It is the default of the rules that take an error.
func IOError() error { return &injectedErr{errno: syscall.EIO} }

// FS is a fault-injecting wrapper of a driver.Storage. Create it with New.
type FS struct {
	inner driver.Storage

	mu          sync.Mutex // guards the rules and counters below
	writes      int
	reads       int
	syncs       int
	failWriteAt int // sequence number of the first failing write; 0: none
	failWriteEr error
	failReadAt  int
	failReadEr  error
	short       bool
	spaceLeft   int64 // negative: unlimited
	syncErr     error
	crashAt     int // sequence number of the last write before the crash; 0: none
	crashed     bool
	killed      bool // the crash is a process kill: completed writes stay

	// Durability tracking, when inner is a *memfs.FS.
	mem     *memfs.FS
	durMu   sync.Mutex // guards durable, nodes and node names; after node.mu
	durable *memfs.FS
	nodes   map[string]*node // cleaned name → file
}

// node tracks one file for durability.
type node struct {
	mu      sync.Mutex // orders the file's operations and its log
	pending []op       // guarded by mu

	name    string // guarded by FS.durMu
	removed bool   // guarded by FS.durMu
}

type opKind uint8

const (
	opWrite opKind = iota
	opTruncate
	opPunch
	opZero
	opAlloc
)

// op is a logged data operation, replayed on the durable image on Sync.
type op struct {
	kind   opKind
	off, n int64
	data   []byte
}

var _ driver.Storage = (*FS)(nil)

// New wraps inner. With a *memfs.FS, it also tracks durability (see
// Durable); the current content of inner counts as durable.
func New(inner driver.Storage) *FS {
	fsys := &FS{inner: inner, spaceLeft: -1}
	if m, ok := inner.(*memfs.FS); ok {
		fsys.mem = m
		fsys.durable = m.Clone()
		fsys.nodes = make(map[string]*node)
	}
	return fsys
}

// Inner returns the wrapped storage.
func (fsys *FS) Inner() driver.Storage { return fsys.inner }

// FailWriteAfter makes the n-th write operation from now, and every later
// one, fail with err (IOError() if nil) without modifying anything: writes
// 1 to n-1 succeed. n < 1 counts as 1 (the next write fails).
func (fsys *FS) FailWriteAfter(n int, err error) {
	if err == nil {
		err = IOError()
	}
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	fsys.failWriteAt = fsys.writes + max(n, 1)
	fsys.failWriteEr = err
}

// FailReadAfter makes the n-th ReadAt from now, and every later one, fail
// with err (IOError() if nil). n < 1 counts as 1.
func (fsys *FS) FailReadAfter(n int, err error) {
	if err == nil {
		err = IOError()
	}
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	fsys.failReadAt = fsys.reads + max(n, 1)
	fsys.failReadEr = err
}

// ShortWrites, when on, makes every WriteAt write only the first half of
// its bytes (rounded down) and return io.ErrShortWrite.
func (fsys *FS) ShortWrites(on bool) {
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	fsys.short = on
}

// NoSpaceAfter gives the storage a budget of bytes from now: a WriteAt that
// would take the bytes written past it writes what fits and fails with an
// error wrapping syscall.ENOSPC, as does every later one; an Allocate that
// does not fit fails whole. FreeSpace reports at most the budget left. A
// negative budget removes the limit.
func (fsys *FS) NoSpaceAfter(bytes int64) {
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	fsys.spaceLeft = max(bytes, -1)
}

// FailSync makes every Sync fail with err (IOError() if nil); nothing
// becomes durable. Reset clears it.
func (fsys *FS) FailSync(err error) {
	if err == nil {
		err = IOError()
	}
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	fsys.syncErr = err
}

// CrashAfterWrites simulates a crash right after the n-th write operation
// from now (which succeeds); n <= 0 crashes now. See the package comment.
func (fsys *FS) CrashAfterWrites(n int) {
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	fsys.killed = false
	if n <= 0 {
		fsys.crashed = true
		return
	}
	fsys.crashAt = fsys.writes + n
}

// KillAfterWrites simulates a process kill right after the n-th write
// operation from now (which succeeds); n <= 0 kills now. Every completed
// write stays in the wrapped storage (the kernel's page cache keeps what a
// killed process wrote); every later write operation, Sync, Remove, Rename
// and Open with Create or Truncate fails with ErrKilled, so the wrapped
// storage stays frozen as it was after write n, whatever the writer does
// next. See the package comment.
func (fsys *FS) KillAfterWrites(n int) {
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	fsys.killed = true
	if n <= 0 {
		fsys.crashed = true
		return
	}
	fsys.crashAt = fsys.writes + n
}

// deadErrLocked is the error of an operation after the crash or kill; the
// caller holds mu.
func (fsys *FS) deadErrLocked() error {
	if fsys.killed {
		return ErrKilled
	}
	return ErrCrashed
}

// Crashed reports whether the simulated crash (or kill) has happened.
func (fsys *FS) Crashed() bool {
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	return fsys.crashed
}

// Reset clears every rule, the crash state and the counters. The content of
// the storage and the durable image are left as they are.
func (fsys *FS) Reset() {
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	fsys.writes, fsys.reads, fsys.syncs = 0, 0, 0
	fsys.failWriteAt, fsys.failWriteEr = 0, nil
	fsys.failReadAt, fsys.failReadEr = 0, nil
	fsys.short = false
	fsys.spaceLeft = -1
	fsys.syncErr = nil
	fsys.crashAt, fsys.crashed, fsys.killed = 0, false, false
}

// Writes returns the number of write operations attempted since New or
// Reset, including failed ones.
func (fsys *FS) Writes() int {
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	return fsys.writes
}

// Reads returns the number of ReadAt calls since New or Reset.
func (fsys *FS) Reads() int {
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	return fsys.reads
}

// Syncs returns the number of Sync calls since New or Reset, including
// failed ones.
func (fsys *FS) Syncs() int {
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	return fsys.syncs
}

// beginWrite accounts one write operation of n bytes and decides its fate:
// it returns how many bytes may be written and the error to report
// afterwards (or at once when allowed is 0). partial says whether the
// operation can do part of its work (WriteAt); consumes whether it uses
// space; short whether ShortWrites applies.
func (fsys *FS) beginWrite(n int64, partial, consumes, short bool) (allowed int64, err error) {
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	fsys.writes++
	if fsys.crashed {
		return 0, fsys.deadErrLocked()
	}
	seq := fsys.writes
	if fsys.crashAt > 0 && seq >= fsys.crashAt {
		fsys.crashed = true // this write still happens
	}
	if fsys.failWriteAt > 0 && seq >= fsys.failWriteAt {
		return 0, fsys.failWriteEr
	}
	allowed = n
	if short && fsys.short && n > 0 {
		allowed, err = n/2, errShortWrite
	}
	if consumes && fsys.spaceLeft >= 0 && allowed > fsys.spaceLeft {
		allowed, err = fsys.spaceLeft, &injectedErr{errno: syscall.ENOSPC}
		if !partial {
			allowed = 0
		}
	}
	if consumes && fsys.spaceLeft >= 0 {
		fsys.spaceLeft -= allowed
	}
	return allowed, err
}

func (fsys *FS) beginRead() error {
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	fsys.reads++
	if fsys.failReadAt > 0 && fsys.reads >= fsys.failReadAt {
		return fsys.failReadEr
	}
	return nil
}

func (fsys *FS) beginSync() error {
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	fsys.syncs++
	if fsys.crashed {
		return fsys.deadErrLocked()
	}
	return fsys.syncErr
}

// checkCrashed fails metadata changes after a crash or kill.
func (fsys *FS) checkCrashed(op, name string) error {
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	if fsys.crashed {
		return &driver.Error{Op: op, File: name, Offset: -1, Err: fsys.deadErrLocked()}
	}
	return nil
}

// Open opens name on the wrapped storage. After a crash, Create and
// Truncate opens fail with ErrCrashed.
func (fsys *FS) Open(name string, flag driver.OpenFlag) (driver.File, error) {
	if flag&(driver.Create|driver.Truncate) != 0 {
		if err := fsys.checkCrashed("open", name); err != nil {
			return nil, err
		}
	}
	if fsys.mem == nil {
		f, err := fsys.inner.Open(name, flag)
		if err != nil {
			return nil, err
		}
		return &file{fs: fsys, inner: f}, nil
	}
	// Truncation is done below as a logged operation.
	trunc := flag&driver.Truncate != 0 && flag&driver.ReadWrite != 0
	if trunc {
		flag &^= driver.Truncate
	}
	key := memfs.CleanName(name)
	fsys.durMu.Lock()
	f, err := fsys.inner.Open(name, flag)
	if err != nil {
		fsys.durMu.Unlock()
		return nil, err
	}
	nd := fsys.nodes[key]
	if nd == nil {
		nd = &node{name: key}
		fsys.nodes[key] = nd
	}
	if flag&driver.Create != 0 {
		if _, err := fsys.durable.Stat(key); errors.Is(err, driver.ErrNotFound) {
			// The directory entry is durable at once; the content is not.
			_ = fsys.durable.WriteFile(key, nil)
		}
	}
	fsys.durMu.Unlock()
	wf := &file{fs: fsys, inner: f, node: nd}
	if trunc {
		nd.mu.Lock()
		err := f.Truncate(0)
		if err == nil {
			nd.pending = append(nd.pending, op{kind: opTruncate})
		}
		nd.mu.Unlock()
		if err != nil {
			f.Close()
			return nil, err
		}
	}
	return wf, nil
}

// Remove removes name from the wrapped storage; it is durable at once.
func (fsys *FS) Remove(name string) error {
	if err := fsys.checkCrashed("remove", name); err != nil {
		return err
	}
	if fsys.mem == nil {
		return fsys.inner.Remove(name)
	}
	fsys.durMu.Lock()
	defer fsys.durMu.Unlock()
	if err := fsys.inner.Remove(name); err != nil {
		return err
	}
	key := memfs.CleanName(name)
	_ = fsys.durable.Remove(key)
	if nd := fsys.nodes[key]; nd != nil {
		nd.removed = true
		delete(fsys.nodes, key)
	}
	return nil
}

// Rename renames a file or directory on the wrapped storage; it is durable
// at once.
func (fsys *FS) Rename(oldName, newName string) error {
	if err := fsys.checkCrashed("rename", oldName); err != nil {
		return err
	}
	if fsys.mem == nil {
		return fsys.inner.Rename(oldName, newName)
	}
	fsys.durMu.Lock()
	defer fsys.durMu.Unlock()
	if err := fsys.inner.Rename(oldName, newName); err != nil {
		return err
	}
	cold, cnew := memfs.CleanName(oldName), memfs.CleanName(newName)
	if cold == cnew {
		return nil
	}
	_ = fsys.durable.Rename(cold, cnew)
	if nd := fsys.nodes[cnew]; nd != nil { // replaced
		nd.removed = true
		delete(fsys.nodes, cnew)
	}
	if nd := fsys.nodes[cold]; nd != nil {
		delete(fsys.nodes, cold)
		nd.name = cnew
		fsys.nodes[cnew] = nd
		return nil
	}
	prefix := cold + "/"
	moved := make(map[string]*node)
	for k, nd := range fsys.nodes {
		if rest, ok := strings.CutPrefix(k, prefix); ok {
			delete(fsys.nodes, k)
			nd.name = cnew + "/" + rest
			moved[nd.name] = nd
		}
	}
	for k, nd := range moved {
		fsys.nodes[k] = nd
	}
	return nil
}

// Stat forwards to the wrapped storage.
func (fsys *FS) Stat(name string) (driver.FileInfo, error) { return fsys.inner.Stat(name) }

// List forwards to the wrapped storage.
func (fsys *FS) List(dir string) ([]string, error) { return fsys.inner.List(dir) }

// FreeSpace reports the wrapped storage's free space, capped by the
// NoSpaceAfter budget left.
func (fsys *FS) FreeSpace(name string) (int64, error) {
	n, err := fsys.inner.FreeSpace(name)
	if err != nil {
		return n, err
	}
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	if fsys.spaceLeft >= 0 {
		n = min(n, fsys.spaceLeft)
	}
	return n, nil
}

// Durable returns a fresh in-memory storage holding what would survive a
// crash now: every file as of its last successful Sync (see the package
// comment). It needs the wrapped storage to be a *memfs.FS; otherwise every
// method of the returned storage fails with driver.ErrUnsupported.
func (fsys *FS) Durable() driver.Storage {
	if fsys.mem == nil {
		return unsupported{}
	}
	fsys.durMu.Lock()
	defer fsys.durMu.Unlock()
	return fsys.durable.Clone()
}

// syncNode makes nd's pending operations durable. The caller holds nd.mu.
func (fsys *FS) syncNode(nd *node) error {
	pending := nd.pending
	nd.pending = nil
	fsys.durMu.Lock()
	defer fsys.durMu.Unlock()
	if nd.removed || len(pending) == 0 {
		return nil
	}
	df, err := fsys.durable.Open(nd.name, driver.ReadWrite|driver.Create|driver.NoLock)
	if err != nil {
		return err
	}
	defer df.Close()
	for _, o := range pending {
		switch o.kind {
		case opWrite:
			_, err = df.WriteAt(o.data, o.off)
		case opTruncate:
			err = df.Truncate(o.off)
		case opPunch:
			err = df.PunchHole(o.off, o.n)
		case opZero:
			err = df.(driver.ZeroRanger).ZeroRange(o.off, o.n)
		case opAlloc:
			err = df.(driver.Allocator).Allocate(o.off, o.n)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// unsupported is the Durable of an FS that does not track durability.
type unsupported struct{}

func unsupportedErr(name string) error {
	return driver.Unsupportedf(name, "faultfs: Durable needs the wrapped storage to be a *memfs.FS")
}

func (unsupported) Open(name string, _ driver.OpenFlag) (driver.File, error) {
	return nil, unsupportedErr(name)
}
func (unsupported) Remove(name string) error             { return unsupportedErr(name) }
func (unsupported) Rename(oldName, newName string) error { return unsupportedErr(oldName) }
func (unsupported) Stat(name string) (driver.FileInfo, error) {
	return driver.FileInfo{}, unsupportedErr(name)
}
func (unsupported) FreeSpace(name string) (int64, error) { return 0, unsupportedErr(name) }
func (unsupported) List(dir string) ([]string, error)    { return nil, unsupportedErr(dir) }
