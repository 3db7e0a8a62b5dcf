package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"slices"
	"sync"

	"github.com/vdisk/vdisk/driver"
)

// vdtest is a tiny differencing format registered only in tests, so that the
// commands' generic paths (backing chains, cluster sizes, format-specific
// information, snapshots, non-raw targets) run before real formats exist.
//
// Layout: a 4 KiB header ("VDTEST01" and JSON, zero padded), then the
// virtual disk at offset 4096 + guest offset, allocated per 64 KiB cluster.
const (
	vdtMagic   = "VDTEST01"
	vdtHeader  = 4096
	vdtCluster = 64 << 10
)

type vdtMeta struct {
	Size       int64             `json:"size"`
	Backing    string            `json:"backing,omitempty"`
	BackingFmt string            `json:"backing_fmt,omitempty"`
	Alloc      []int64           `json:"alloc,omitempty"`
	Snapshots  []driver.Snapshot `json:"snapshots,omitempty"`
	Label      string            `json:"label,omitempty"`

	// The optional interfaces of testfmt_ops_test.go keep their state here.
	SnapAlloc     map[string][]int64 `json:"snap_alloc,omitempty"` // by snapshot ID
	UUID          string             `json:"uuid,omitempty"`
	ModUUID       string             `json:"mod_uuid,omitempty"`
	ParentUUID    string             `json:"parent_uuid,omitempty"`
	ParentModUUID string             `json:"parent_mod_uuid,omitempty"`
	PCHS          *driver.CHS        `json:"pchs,omitempty"`
	LCHS          *driver.CHS        `json:"lchs,omitempty"`
	Comment       string             `json:"comment,omitempty"`
	// Leaks and CheckErrors are injected by tests; Check reports them.
	Leaks       int `json:"leaks,omitempty"`
	CheckErrors int `json:"check_errors,omitempty"`
}

type vdtSpecific struct {
	Version           int    `json:"version"`
	AllocatedClusters int    `json:"allocated-clusters"`
	Label             string `json:"label,omitempty"`
}

func init() {
	driver.Register(&driver.Format{
		Name:        "vdtest",
		Aliases:     []string{"vdt"},
		Extensions:  []string{"vdtest"},
		Description: "test-only differencing format",
		Caps: driver.CapCreateDynamic | driver.CapDiff | driver.CapSnapshots | driver.CapWrite |
			driver.CapResize | driver.CapCheck | driver.CapCompact | driver.CapUUID,
		CreateOptions: []driver.Option{
			{Name: "label", Type: driver.TypeString, Doc: "free text stored in the header"},
			{Name: "cluster_size", Type: driver.TypeSize, Default: "64k", Min: 65536, Max: 65536, PowerOf2: true, Doc: "cluster size"},
		},
		Probe: func(r io.ReaderAt, size int64) int {
			b := make([]byte, len(vdtMagic))
			if _, err := r.ReadAt(b, 0); err != nil || string(b) != vdtMagic {
				return 0
			}
			return 100
		},
		Create: vdtCreate,
		Open:   vdtOpen,
	})
}

type vdtImage struct {
	mu    sync.Mutex
	f     driver.File
	ro    bool
	meta  vdtMeta
	alloc map[int64]bool
	// modDone: the modification UUID changed in this read-write session
	// (on the first write, as VDI does).
	modDone bool
}

func vdtCreate(ctx context.Context, p *driver.CreateParams) (driver.Image, error) {
	flag := driver.ReadWrite | driver.Create | driver.Truncate
	if !p.Overwrite {
		flag |= driver.Excl
	}
	f, err := p.Storage.Open(p.Name, flag)
	if err != nil {
		return nil, err
	}
	im := &vdtImage{f: f, meta: vdtMeta{Size: p.Size, Label: p.Options.String("label")}, alloc: map[int64]bool{}}
	im.meta.UUID = vdtUUID()
	if p.ParentRef != nil {
		im.meta.Backing, im.meta.BackingFmt = p.ParentRef.Name, p.ParentRef.Format
		im.meta.ParentUUID, im.meta.ParentModUUID = p.ParentRef.UUID, p.ParentRef.ModUUID
	}
	if err := im.writeHeader(); err != nil {
		f.Close()
		return nil, err
	}
	return im, nil
}

func vdtOpen(ctx context.Context, p *driver.OpenParams) (driver.Image, error) {
	flag := driver.ReadOnly
	if !p.ReadOnly {
		flag = driver.ReadWrite
	}
	f, err := p.Storage.Open(p.Name, flag)
	if err != nil {
		return nil, err
	}
	im, err := vdtLoad(f)
	if err != nil {
		f.Close()
		return nil, driver.Corruptf(p.Name, 0, "bad vdtest header: %v", err)
	}
	im.ro = p.ReadOnly
	return im, nil
}

func vdtLoad(f driver.File) (*vdtImage, error) {
	b := make([]byte, vdtHeader)
	if err := driver.ReadFullAt(f, b, 0); err != nil {
		return nil, err
	}
	if string(b[:len(vdtMagic)]) != vdtMagic {
		return nil, io.ErrUnexpectedEOF
	}
	im := &vdtImage{f: f, alloc: map[int64]bool{}}
	if err := json.Unmarshal(bytes.TrimRight(b[len(vdtMagic):], "\x00"), &im.meta); err != nil {
		return nil, err
	}
	for _, c := range im.meta.Alloc {
		im.alloc[c] = true
	}
	return im, nil
}

func (im *vdtImage) writeHeader() error {
	im.meta.Alloc = im.meta.Alloc[:0]
	for c := range im.alloc {
		im.meta.Alloc = append(im.meta.Alloc, c)
	}
	slices.Sort(im.meta.Alloc)
	j, err := json.Marshal(im.meta)
	if err != nil {
		return err
	}
	b := make([]byte, vdtHeader)
	copy(b, vdtMagic)
	if len(j) > vdtHeader-len(vdtMagic) {
		return driver.Unsupportedf(im.f.Name(), "header too large")
	}
	copy(b[len(vdtMagic):], j)
	_, err = im.f.WriteAt(b, 0)
	return err
}

func (im *vdtImage) Size() int64 { return im.meta.Size }

func (im *vdtImage) isAlloc(c int64) bool {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.alloc[c]
}

func (im *vdtImage) Status(off, n int64) (driver.Extent, error) {
	first := im.isAlloc(off / vdtCluster)
	end := off
	for end < off+n && im.isAlloc(end/vdtCluster) == first {
		end = (end/vdtCluster + 1) * vdtCluster
	}
	length := min(end, off+n) - off
	if first {
		return driver.Extent{State: driver.Data, Length: length, Offset: vdtHeader + off}, nil
	}
	return driver.Extent{State: driver.Unallocated, Length: length, Offset: -1}, nil
}

// pieces calls fn for each part of [off, off+len(p)) within one cluster.
func pieces(p []byte, off int64, fn func(c int64, q []byte, off int64) error) error {
	for len(p) > 0 {
		c := off / vdtCluster
		n := min(int64(len(p)), (c+1)*vdtCluster-off)
		if err := fn(c, p[:n], off); err != nil {
			return err
		}
		p, off = p[n:], off+n
	}
	return nil
}

func (im *vdtImage) ReadAt(p []byte, off int64) (int, error) {
	err := pieces(p, off, func(c int64, q []byte, off int64) error {
		if im.isAlloc(c) {
			return driver.ReadFullAt(im.f, q, vdtHeader+off)
		}
		clear(q) // only Data runs are asked for
		return nil
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

func (im *vdtImage) WriteAt(p []byte, off int64) (int, error) {
	if im.ro {
		return 0, driver.ErrReadOnly
	}
	im.mu.Lock()
	if !im.modDone {
		im.meta.ModUUID, im.modDone = vdtUUID(), true
	}
	im.mu.Unlock()
	// Copy on write: a cluster this image does not hold is written whole;
	// the container fills the rest of a partial one from the chain.
	start, end := off, off+int64(len(p))
	if c := start / vdtCluster; start%vdtCluster != 0 && !im.isAlloc(c) {
		start = c * vdtCluster
	}
	if c := (end - 1) / vdtCluster; end%vdtCluster != 0 && end != im.meta.Size && !im.isAlloc(c) {
		end = min((c+1)*vdtCluster, im.meta.Size)
	}
	if start != off || end != off+int64(len(p)) {
		return 0, driver.NeedFill("vdtest", start, end)
	}
	err := pieces(p, off, func(c int64, q []byte, off int64) error {
		if !im.isAlloc(c) {
			if _, err := im.f.WriteAt(q, vdtHeader+off); err != nil {
				return err
			}
			im.mu.Lock()
			im.alloc[c] = true
			im.mu.Unlock()
			return nil
		}
		_, err := im.f.WriteAt(q, vdtHeader+off)
		return err
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

func (im *vdtImage) Flush() error {
	if im.ro {
		return nil
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := im.writeHeader(); err != nil {
		return err
	}
	return im.f.Sync()
}

func (im *vdtImage) Close() error {
	err := im.Flush()
	if cerr := im.f.Close(); err == nil {
		err = cerr
	}
	return err
}

func (im *vdtImage) Info() driver.Info {
	im.mu.Lock()
	defer im.mu.Unlock()
	return driver.Info{Format: "vdtest", VirtualSize: im.meta.Size, ClusterSize: vdtCluster,
		Specific: vdtSpecific{Version: 1, AllocatedClusters: len(im.alloc), Label: im.meta.Label}}
}

func (im *vdtImage) Parent() *driver.ParentRef {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.meta.Backing == "" {
		return nil
	}
	return &driver.ParentRef{Name: im.meta.Backing, Format: im.meta.BackingFmt, UUID: im.meta.ParentUUID, ModUUID: im.meta.ParentModUUID}
}
