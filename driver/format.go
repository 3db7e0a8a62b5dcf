package driver

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strings"
	"sync"
)

// Cap is a format capability bit (VD's backend capabilities).
type Cap uint32

const (
	CapCreateFixed   Cap = 1 << iota // preallocated images
	CapCreateDynamic                 // growing (sparse) images
	CapCreateSplit                   // images split into several files
	CapDiff                          // differencing images (a parent)
	CapDiscard                       // Discarder
	CapZero                          // efficient Zeroer
	CapResize                        // Resizer
	CapCompress                      // compressed clusters
	CapSnapshots                     // internal snapshots
	CapNetwork                       // network disk (no file)
	CapUUID                          // records UUIDs
	CapCheck                         // Checker
	CapCompact                       // Compacter
	CapWrite                         // writable at all
)

var capNames = []struct {
	c    Cap
	name string
}{
	{CapCreateFixed, "create-fixed"},
	{CapCreateDynamic, "create-dynamic"},
	{CapCreateSplit, "create-split"},
	{CapDiff, "diff"},
	{CapDiscard, "discard"},
	{CapZero, "write-zeroes"},
	{CapResize, "resize"},
	{CapCompress, "compress"},
	{CapSnapshots, "snapshots"},
	{CapNetwork, "network"},
	{CapUUID, "uuid"},
	{CapCheck, "check"},
	{CapCompact, "compact"},
	{CapWrite, "write"},
}

// Names lists the capability names set in c.
func (c Cap) Names() []string {
	var out []string
	for _, n := range capNames {
		if c&n.c != 0 {
			out = append(out, n.name)
		}
	}
	return out
}

func (c Cap) String() string { return strings.Join(c.Names(), ",") }

// Probe scores how sure a format is that r holds one of its images: 0 means
// no, 100 means a definite magic with a valid header. Probes read only what
// they need and must not fail on short or hostile input.
type Probe func(r io.ReaderAt, size int64) int

// Format describes one image format driver.
type Format struct {
	// Name is qemu's name for the format ("raw", "qcow2", "vpc", ...).
	Name    string
	Aliases []string
	// Extensions lists file extensions without the dot.
	Extensions  []string
	Description string
	Caps        Cap
	// CreateOptions and OpenOptions declare the accepted -o keys.
	CreateOptions []Option
	OpenOptions   []Option
	// Probe is nil for formats that are never probed (raw: the fallback).
	Probe  Probe
	Create func(ctx context.Context, p *CreateParams) (Image, error)
	Open   func(ctx context.Context, p *OpenParams) (Image, error)
	// Measure computes the file size a new image needs (qemu-img measure);
	// nil when the format cannot tell.
	Measure func(p *MeasureParams) (MeasureResult, error)
}

// MeasureParams describes the content a new image would hold.
type MeasureParams struct {
	// Size is the virtual size.
	Size int64
	// Options are the format's create options, validated.
	Options Values
	// Allocated returns how many bytes of the source's data fall into
	// distinct aligned units of unit bytes (data runs rounded out to unit
	// boundaries, zero and unallocated runs not counted). Nil when
	// measuring by size alone (an empty image of that size, as qemu-img
	// measure --size means it).
	Allocated func(unit int64) (int64, error)
	// SourceBitmaps lists the source's persistent dirty bitmaps when its
	// format can store them (SourceHasBitmaps); qcow2 then reports the
	// space copying them would take (qemu-img measure's "bitmaps").
	SourceBitmaps    []Bitmap
	SourceHasBitmaps bool
}

// Bitmap describes a persistent dirty bitmap.
type Bitmap struct {
	Name        string
	Granularity int64
	// Size is the number of bytes of virtual disk the bitmap covers.
	Size int64
}

// BitmapLister is implemented by images of formats that store persistent
// dirty bitmaps (qcow2).
type BitmapLister interface {
	PersistentBitmaps() ([]Bitmap, error)
}

// MeasureResult is qemu-img measure's answer, in bytes.
type MeasureResult struct {
	// Bitmaps, when not nil, is the space the source's persistent bitmaps
	// would take in addition (both formats store bitmaps).
	Bitmaps        *int64 `json:"bitmaps,omitempty"`
	Required       int64  `json:"required"`
	FullyAllocated int64  `json:"fully-allocated"`
}

var (
	regMu   sync.RWMutex
	formats = map[string]*Format{}
	aliases = map[string]string{}
)

// Register makes a format available. It panics on a duplicate name, as
// database/sql.Register does; call it from an init function.
func Register(f *Format) {
	regMu.Lock()
	defer regMu.Unlock()
	if f == nil || f.Name == "" || f.Open == nil {
		panic("driver: Register of an incomplete format")
	}
	key := strings.ToLower(f.Name)
	if _, dup := formats[key]; dup {
		panic("driver: Register called twice for format " + f.Name)
	}
	formats[key] = f
	for _, a := range f.Aliases {
		aliases[strings.ToLower(a)] = key
	}
}

// Lookup finds a format by name or alias (case-insensitive).
func Lookup(name string) (*Format, error) {
	regMu.RLock()
	defer regMu.RUnlock()
	key := strings.ToLower(name)
	if a, ok := aliases[key]; ok {
		key = a
	}
	if f, ok := formats[key]; ok {
		return f, nil
	}
	names := make([]string, 0, len(formats))
	for n := range formats {
		names = append(names, n)
	}
	sort.Strings(names)
	return nil, Errorf(ErrNotFound, "", -1, "unknown format %q (known: %s)", name, strings.Join(names, ", "))
}

// Formats lists the registered formats sorted by name.
func Formats() []*Format {
	regMu.RLock()
	defer regMu.RUnlock()
	out := make([]*Format, 0, len(formats))
	for _, f := range formats {
		out = append(out, f)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// ProbeResult is the best-scoring format for some content.
type ProbeResult struct {
	Format *Format
	Score  int
}

// ProbeAll runs every registered probe over r and returns the formats that
// matched, best first (ties broken by name for determinism). Raw never
// appears: it has no probe.
func ProbeAll(r io.ReaderAt, size int64) []ProbeResult {
	var out []ProbeResult
	for _, f := range Formats() {
		if f.Probe == nil {
			continue
		}
		if s := safeProbe(f, r, size); s > 0 {
			out = append(out, ProbeResult{f, s})
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Score > out[j].Score })
	return out
}

func safeProbe(f *Format, r io.ReaderAt, size int64) (score int) {
	defer func() {
		if recover() != nil {
			score = 0
		}
	}()
	s := f.Probe(r, size)
	if s < 0 {
		return 0
	}
	if s > 100 {
		return 100
	}
	return s
}

// String returns a one-line description.
func (f *Format) String() string {
	return fmt.Sprintf("%s (%s)", f.Name, f.Caps)
}
