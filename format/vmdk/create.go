package vmdk

import (
	"context"
	"fmt"
	"math/rand/v2"
	"path"
	"strings"

	"github.com/vdisk/vdisk/driver"
)

// splitSize is the extent size of the twoGbMaxExtent subformats.
const splitSize = 0x80000000

// defaultGrain is the grain size of created sparse extents (128 sectors,
// as qemu and VMware). Tests lower it to make tiny fuzz seeds.
var defaultGrain int64 = 64 << 10

// createGTEs and createDescSectors are the grain table entries and the
// embedded descriptor room of created sparse extents (qemu's 512 and 20);
// tests lower them to make tiny fuzz seeds.
var (
	createGTEs        int64 = 512
	createDescSectors int64 = 20
)

// createParams are the validated create options.
type createParams struct {
	subformat   string
	adapter     string
	hwversion   string
	tools       string
	zeroedGrain bool
}

func create(ctx context.Context, p *driver.CreateParams) (driver.Image, error) {
	if p.Size < 0 || p.Size > maxSectors*sectorSize {
		return nil, driver.OptionErrorf("invalid VMDK size %d", p.Size)
	}
	size := (p.Size + sectorSize - 1) &^ (sectorSize - 1)
	c, err := createOptions(p.Options)
	if err != nil {
		return nil, err
	}
	flat := strings.HasSuffix(c.subformat, "Flat")
	split := strings.HasPrefix(c.subformat, "twoGb")
	stream := c.subformat == "streamOptimized"
	if flat && c.zeroedGrain {
		return nil, driver.OptionErrorf("a flat image cannot enable zeroed grains")
	}
	d := &newDesc{c: c, flat: flat, size: size, parentCID: 0xffffffff}
	if p.ParentRef != nil {
		if err := d.setParent(p, flat || stream); err != nil {
			return nil, err
		}
	}
	files := &createFiles{p: p, flag: driver.ReadWrite | driver.Create | driver.Truncate}
	if !p.Overwrite {
		files.flag = driver.ReadWrite | driver.Create | driver.Excl
	}
	d.cid = rand.Uint32()
	for d.cid == 0xffffffff || d.cid == 0xfffffffe {
		d.cid = rand.Uint32()
	}
	if !split && !flat {
		im, err := files.monolithic(d, stream)
		if err != nil {
			return files.fail(err)
		}
		if im != nil {
			return im, nil
		}
	} else if err := files.extents(d, split); err != nil {
		return files.fail(err)
	}
	img, err := open(ctx, &driver.OpenParams{Storage: p.Storage, Name: p.Name, Logger: p.Logger})
	if err != nil {
		return files.fail(err)
	}
	img.(*image).cidDone = true // a new image has a fresh CID already
	return img, nil
}

// createOptions reads the create options, with qemu's defaults.
func createOptions(o driver.Values) (createParams, error) {
	c := createParams{subformat: o.String("subformat"), adapter: o.String("adapter_type"),
		hwversion: o.String("hwversion"), tools: o.String("toolsversion"), zeroedGrain: o.Bool("zeroed_grain")}
	if c.subformat == "" {
		c.subformat = "monolithicSparse"
	}
	if c.adapter == "" {
		c.adapter = "ide"
	}
	if c.hwversion == "undefined" {
		c.hwversion = ""
	}
	if o.Bool("compat6") {
		if c.hwversion != "" {
			return c, driver.OptionErrorf("compat6 cannot be enabled with hwversion set")
		}
		c.hwversion = "6"
	}
	if c.hwversion == "" {
		c.hwversion = "4"
	}
	if c.tools == "" {
		c.tools = "2147483647"
	}
	return c, nil
}

// newDesc is the descriptor of an image being created.
type newDesc struct {
	c         createParams
	flat      bool
	size      int64
	cid       uint32
	parentCID uint32
	hint      string // the parent's file name
	ext       strings.Builder
}

// setParent records the parent of p in the descriptor; noParent says the
// subformat cannot have one.
func (d *newDesc) setParent(p *driver.CreateParams, noParent bool) error {
	if noParent {
		return driver.Unsupportedf(p.Name, "a %s image cannot have a backing file", d.c.subformat)
	}
	if p.ParentInfo != nil && !strings.EqualFold(p.ParentInfo.Format, "vmdk") {
		return driver.Unsupportedf(p.Name, "the backing file of a VMDK image must be a VMDK image, not %s", p.ParentInfo.Format)
	}
	if p.ParentInfo != nil {
		if v, ok := hex32(p.ParentInfo.UUID); ok && p.ParentInfo.UUID != "" {
			d.parentCID = v
		}
	}
	d.hint = p.ParentRef.Name
	if strings.ContainsAny(d.hint, "\"\r\n") {
		return driver.OptionErrorf("backing file name %q cannot be recorded in a VMDK descriptor", d.hint)
	}
	return nil
}

// extent adds the extent line of an extent of sectors sectors in file.
func (d *newDesc) extent(sectors int64, file string) {
	if d.flat {
		fmt.Fprintf(&d.ext, "RW %d FLAT \"%s\" 0\n", sectors, file)
	} else {
		fmt.Fprintf(&d.ext, "RW %d SPARSE \"%s\"\n", sectors, file)
	}
}

// text is the descriptor with the extent lines added so far.
func (d *newDesc) text() []byte {
	c := d.c
	heads := int64(16)
	if c.adapter != "ide" {
		heads = 255
	}
	parent := ""
	if d.hint != "" {
		parent = fmt.Sprintf("parentFileNameHint=\"%s\"\n", d.hint)
	}
	return fmt.Appendf(nil, "# Disk DescriptorFile\nversion=1\nCID=%08x\nparentCID=%08x\ncreateType=\"%s\"\n%s\n"+
		"# Extent description\n%s\n# The Disk Data Base\n#DDB\n\n"+
		"ddb.virtualHWVersion = \"%s\"\nddb.geometry.cylinders = \"%d\"\nddb.geometry.heads = \"%d\"\nddb.geometry.sectors = \"63\"\n"+
		"ddb.adapterType = \"%s\"\nddb.toolsVersion = \"%s\"\n",
		d.cid, d.parentCID, c.subformat, parent, d.ext.String(), c.hwversion, d.size/(63*heads*sectorSize), heads, c.adapter, c.tools)
}

// createFiles makes the files of an image being created, and removes them
// again when the creation fails.
type createFiles struct {
	p    *driver.CreateParams
	flag driver.OpenFlag
	made []string
}

func (cf *createFiles) open(name string) (driver.File, error) {
	f, err := cf.p.Storage.Open(name, cf.flag)
	if err != nil {
		return nil, err
	}
	cf.made = append(cf.made, name)
	return f, nil
}

// fail removes the files made and returns err.
func (cf *createFiles) fail(err error) (driver.Image, error) {
	for _, n := range cf.made {
		cf.p.Storage.Remove(n)
	}
	return nil, err
}

// monolithic creates a monolithicSparse or streamOptimized image: one
// sparse file with the descriptor embedded. A streamOptimized image is
// returned open (it is written as it goes).
func (cf *createFiles) monolithic(d *newDesc, stream bool) (driver.Image, error) {
	p := cf.p
	d.extent(d.size/sectorSize, path.Base(p.Name))
	f, err := cf.open(p.Name)
	if err != nil {
		return nil, err
	}
	desc := d.text()
	if stream {
		im, err := createStream(p, f, d.size, desc, d.c.zeroedGrain)
		if err != nil {
			f.Close()
			return nil, err
		}
		return im, nil
	}
	err = initSparse(f, p.Name, d.size, desc, d.c.zeroedGrain)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return nil, err
}

// extents creates an image whose descriptor file names its extent files:
// one flat extent, or (split) extents of at most 2 GiB, flat or sparse.
func (cf *createFiles) extents(d *newDesc, split bool) error {
	p := cf.p
	dir, base := path.Dir(p.Name), path.Base(p.Name)
	prefix, postfix := base, ""
	if i := strings.LastIndexByte(base, '.'); i >= 0 {
		prefix, postfix = base[:i], base[i:]
	}
	extSize := d.size
	if split {
		extSize = splitSize
	}
	for i, done := 1, int64(0); done < d.size; i++ {
		cur := min(d.size-done, extSize)
		var name string
		switch {
		case split && d.flat:
			name = fmt.Sprintf("%s-f%03d%s", prefix, i, postfix)
		case split:
			name = fmt.Sprintf("%s-s%03d%s", prefix, i, postfix)
		default:
			name = prefix + "-flat" + postfix
		}
		full := path.Join(dir, name)
		f, err := cf.open(full)
		if err != nil {
			return err
		}
		if d.flat {
			err = f.Truncate(cur)
		} else {
			err = initSparse(f, full, cur, nil, d.c.zeroedGrain)
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return driver.WithFile(err, "create extent", full)
		}
		d.extent(cur/sectorSize, name)
		done += cur
	}
	f, err := cf.open(p.Name)
	if err != nil {
		return err
	}
	_, err = f.WriteAt(d.text(), 0)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return driver.WithFile(err, "write descriptor", p.Name)
	}
	return nil
}

// sparseLayout computes qemu's layout of a hosted sparse extent of size
// bytes: header, descriptor (20 sectors), redundant directory and its
// tables, directory and its tables, grains from a grain boundary.
func sparseLayout(size int64, zeroed, compressed bool) (h header, gdSectors, gtSectors, gtCount int64) {
	h.version = 1
	if zeroed {
		h.version = 2
	}
	h.flags = flagNL | flagRGD
	if zeroed {
		h.flags |= flagZeroGrain
	}
	if compressed {
		h.version = 3
		h.flags |= flagCompressed | flagMarkers
		h.compress = compressDeflate
	}
	h.capacity = uint64(size / sectorSize)
	h.grainSize = uint64(defaultGrain / sectorSize)
	h.numGTEs = uint32(createGTEs)
	grains := (size + defaultGrain - 1) / defaultGrain
	gtSectors = (createGTEs*4 + sectorSize - 1) / sectorSize
	gtCount = (grains + createGTEs - 1) / createGTEs
	gdSectors = (gtCount*4 + sectorSize - 1) / sectorSize
	h.descOffset = 1
	h.descSize = uint64(createDescSectors)
	h.rgdOffset = h.descOffset + h.descSize
	h.gdOffset = h.rgdOffset + uint64(gdSectors+gtSectors*gtCount)
	g := h.grainSize
	h.overhead = (h.gdOffset + uint64(gdSectors+gtSectors*gtCount) + g - 1) / g * g
	return
}

// initSparse writes a new hosted sparse extent: the header, the descriptor
// (if any), both grain directories pointing at zeroed, preallocated grain
// tables (holes), and the file extended to the first grain.
func initSparse(f driver.File, name string, size int64, desc []byte, zeroed bool) error {
	h, gdSectors, gtSectors, gtCount := sparseLayout(size, zeroed, false)
	if int64(len(desc)) > int64(h.descSize)*sectorSize {
		return driver.OptionErrorf("descriptor of %d bytes does not fit in %d sectors", len(desc), h.descSize)
	}
	if err := f.Truncate(int64(h.overhead) * sectorSize); err != nil {
		return err
	}
	if _, err := f.WriteAt(h.encode(), 0); err != nil {
		return err
	}
	if len(desc) > 0 {
		if _, err := f.WriteAt(desc, sectorSize); err != nil {
			return err
		}
	}
	for _, dirOff := range []uint64{h.rgdOffset, h.gdOffset} {
		gd := make([]byte, gdSectors*sectorSize)
		for i := int64(0); i < gtCount; i++ {
			putLE32(gd[i*4:], uint32(int64(dirOff)+gdSectors+i*gtSectors))
		}
		if _, err := f.WriteAt(gd, int64(dirOff)*sectorSize); err != nil {
			return err
		}
	}
	return nil
}

func putLE32(b []byte, v uint32) {
	b[0], b[1], b[2], b[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
}
