package luks

import (
	"context"
	"io"
	"strconv"
	"sync"
	"time"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/luks"
	"github.com/vdisk/vdisk/internal/prealloc"
)

func init() { driver.Register(Format) }

var hashes = []string{"sha1", "sha224", "sha256", "sha384", "sha512"}

// Format is the luks format descriptor.
var Format = &driver.Format{
	Name:        "luks",
	Extensions:  []string{"luks"},
	Description: "LUKS encrypted volume (qemu luks, cryptsetup LUKS1/LUKS2)",
	Caps:        driver.CapCreateFixed | driver.CapZero | driver.CapResize | driver.CapWrite,
	CreateOptions: []driver.Option{
		{Name: "key-secret", Type: driver.TypeString, Doc: "id of the secret holding the passphrase (--object secret,id=ID,...)"},
		{Name: "cipher-alg", Type: driver.TypeEnum, Default: "aes-256", Values: []string{"aes-128", "aes-192", "aes-256"}, Doc: "cipher algorithm"},
		{Name: "cipher-mode", Type: driver.TypeEnum, Default: "xts", Values: []string{"xts", "cbc", "ecb"}, Doc: "cipher mode"},
		{Name: "ivgen-alg", Type: driver.TypeEnum, Default: "plain64", Values: []string{"plain", "plain64", "plain64be", "essiv"}, Doc: "IV generator"},
		{Name: "ivgen-hash-alg", Type: driver.TypeEnum, Default: "sha256", Values: hashes, Doc: "hash of the essiv IV generator"},
		{Name: "hash-alg", Type: driver.TypeEnum, Default: "sha256", Values: hashes, Doc: "PBKDF2 and anti-forensic hash"},
		{Name: "iter-time", Type: driver.TypeInt, Default: "2000", Min: 0, Max: 1 << 31, Doc: "time to spend on PBKDF2 when unlocking, in milliseconds (at least 1000 iterations)"},
		{Name: "preallocation", Type: driver.TypeEnum, Default: "off", Values: []string{"off", "metadata", "falloc", "full"},
			Doc: "preallocation mode (the payload is always written: encrypted zeros)"},
		{Name: "luks-version", Type: driver.TypeEnum, Default: "1", Values: []string{"1", "2"}, Doc: "LUKS header version: 1 (qemu's) or 2 (cryptsetup's default)"},
		{Name: "pbkdf", Type: driver.TypeEnum, Default: "pbkdf2", Values: []string{"pbkdf2", "argon2i", "argon2id"},
			Doc: "key slot derivation (argon2 needs luks-version=2)"},
		{Name: "pbkdf-memory", Type: driver.TypeInt, Default: "65536", Min: 8, Max: 4 << 20, Doc: "argon2 memory cost in KiB"},
		{Name: "pbkdf-time", Type: driver.TypeInt, Default: "4", Min: 1, Max: 1 << 20, Doc: "argon2 time cost (passes)"},
		{Name: "pbkdf-parallel", Type: driver.TypeInt, Default: "1", Min: 1, Max: 255, Doc: "argon2 parallelism"},
		{Name: "sector-size", Type: driver.TypeInt, Default: "512", Min: 512, Max: 4096, PowerOf2: true, Doc: "encryption sector size (512, or 4096 with luks-version=2)"},
	},
	OpenOptions: []driver.Option{
		{Name: "key-secret", Type: driver.TypeString, Doc: "id of the secret holding the passphrase"},
	},
	Probe:  probe,
	Create: create,
	Open:   open,
	Measure: func(p *driver.MeasureParams) (driver.MeasureResult, error) {
		h, err := headerSize(p.Options)
		if err != nil {
			return driver.MeasureResult{}, err
		}
		s := h + (p.Size+511)&^511
		return driver.MeasureResult{Required: s, FullyAllocated: s}, nil
	},
}

func probe(r io.ReaderAt, size int64) int {
	var b [8]byte
	if size < 8 {
		return 0
	}
	if _, err := r.ReadAt(b[:], 0); err != nil {
		return 0
	}
	if string(b[:6]) == luks.Magic && b[6] == 0 && (b[7] == 1 || b[7] == 2) {
		return 100
	}
	return 0
}

// image is an open LUKS volume.
type image struct {
	f        driver.File
	name     string
	readOnly bool
	hdr      *luks.Header
	c        *luks.SectorCipher // nil when opened for info without a key
	ss       int64              // encryption sector size
	payload  int64

	mu   sync.RWMutex // guards size
	size int64

	// hmu serializes key slot changes; secrets and keySecret re-open a
	// slot for Amend so the volume key need not stay in memory.
	hmu       sync.Mutex
	secrets   driver.Secrets
	keySecret string
	slot      int // the slot that opened the volume
}

// specFromOptions builds the cipher spec and key length from qemu's option
// values.
func specFromOptions(o driver.Values) (luks.Spec, int, error) {
	alg := o.String("cipher-alg")
	bits := map[string]int{"aes-128": 16, "aes-192": 24, "aes-256": 32}[alg]
	s := luks.Spec{Alg: "aes", Mode: o.String("cipher-mode"), IVGen: o.String("ivgen-alg")}
	if s.Mode == "ecb" {
		s.IVGen = ""
	}
	if s.IVGen == "essiv" {
		s.IVHash = o.String("ivgen-hash-alg")
	}
	if s.Mode == "xts" {
		bits *= 2
	}
	if _, err := luks.ParseSpec(s.Alg, s.ModeString()); err != nil {
		return s, 0, driver.OptionErrorf("luks: %v", err)
	}
	return s, bits, nil
}

// headerSize is the payload offset a new volume gets.
func headerSize(o driver.Values) (int64, error) {
	if o.String("luks-version") == "2" {
		return 16 << 20, nil
	}
	_, kb, err := specFromOptions(o)
	if err != nil {
		return 0, err
	}
	return 4096 + 8*((int64(kb)*luks.Stripes+4095)&^4095), nil
}

func secret(s driver.Secrets, id, name string) ([]byte, error) {
	if id == "" {
		return nil, driver.Errorf(driver.ErrInvalidOption, name, -1, "a LUKS volume needs key-secret=ID naming the secret with its passphrase")
	}
	return driver.LookupSecret(s, id)
}

func create(ctx context.Context, p *driver.CreateParams) (driver.Image, error) {
	if p.ParentRef != nil {
		return nil, driver.Unsupportedf(p.Name, "luks volumes cannot have a backing file")
	}
	o := p.Options
	spec, kb, err := specFromOptions(o)
	if err != nil {
		return nil, err
	}
	mode := o.String("preallocation")
	if err := prealloc.Check("luks", mode, prealloc.Metadata, prealloc.Falloc, prealloc.Full); err != nil {
		return nil, err
	}
	co := luks.CreateOptions{Version: 1, Cipher: spec, KeyBytes: kb, Hash: o.String("hash-alg"),
		IterTime: time.Duration(o.Int("iter-time")) * time.Millisecond, SectorSize: int(o.Int("sector-size"))}
	if kdf := o.String("pbkdf"); kdf != "pbkdf2" {
		if o.String("luks-version") != "2" {
			return nil, driver.OptionErrorf("luks: pbkdf=%s needs luks-version=2", kdf)
		}
		co.KDF, co.ArgonMemoryKiB, co.ArgonTime, co.ArgonThreads = kdf, int(o.Int("pbkdf-memory")), int(o.Int("pbkdf-time")), int(o.Int("pbkdf-parallel"))
	}
	if o.String("luks-version") == "2" {
		co.Version = 2
	} else if co.SectorSize != 512 {
		return nil, driver.OptionErrorf("luks: sector-size=%d needs luks-version=2", co.SectorSize)
	}
	if p.Size%int64(co.SectorSize) != 0 {
		return nil, driver.OptionErrorf("luks: size %d is not a multiple of the %d-byte sector", p.Size, co.SectorSize)
	}
	pass, err := secret(p.Secrets, o.String("key-secret"), p.Name)
	if err != nil {
		return nil, err
	}
	defer driver.Wipe(pass)
	flag := driver.ReadWrite | driver.Create | driver.Truncate
	if !p.Overwrite {
		flag |= driver.Excl
	}
	f, err := p.Storage.Open(p.Name, flag)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (driver.Image, error) {
		f.Close()
		return nil, err
	}
	hdr, key, err := luks.Create(f, co, pass)
	if err != nil {
		return fail(err)
	}
	c, err := hdr.NewCipher(key)
	driver.Wipe(key)
	if err != nil {
		return fail(err)
	}
	im := &image{f: f, name: p.Name, hdr: hdr, c: c, ss: int64(hdr.SectorSize), payload: hdr.PayloadOffset,
		secrets: p.Secrets, keySecret: o.String("key-secret")}
	if err := im.grow(ctx, 0, p.Size, mode); err != nil {
		return fail(err)
	}
	return im, nil
}

func open(ctx context.Context, p *driver.OpenParams) (driver.Image, error) {
	flag := driver.ReadOnly
	if !p.ReadOnly {
		flag = driver.ReadWrite
	}
	if p.Direct {
		flag |= driver.Direct
	}
	f, err := p.Storage.Open(p.Name, flag)
	if err != nil {
		return nil, err
	}
	im, err := openFile(p, f)
	if err != nil {
		f.Close()
		return nil, err
	}
	return im, nil
}

func openFile(p *driver.OpenParams, f driver.File) (*image, error) {
	fsize, err := f.Size()
	if err != nil {
		return nil, err
	}
	hdr, err := luks.Read(f, fsize, p.Name)
	if err != nil {
		return nil, err
	}
	im := &image{f: f, name: p.Name, readOnly: p.ReadOnly, hdr: hdr, ss: int64(hdr.SectorSize), payload: hdr.PayloadOffset,
		secrets: p.Secrets, keySecret: p.Options.String("key-secret"), slot: -1}
	if hdr.PayloadOffset < hdr.HeaderEnd() {
		return nil, driver.Corruptf(p.Name, -1, "payload offset %d lies inside the %d-byte header", hdr.PayloadOffset, hdr.HeaderEnd())
	}
	for _, s := range hdr.Slots {
		// Writing the payload must never overwrite key material.
		if s.Active && s.Offset < hdr.PayloadOffset+max(hdr.DataSize, fsize) && hdr.PayloadOffset < s.Offset+s.Size {
			return nil, driver.Corruptf(p.Name, -1, "key slot %d area [%d, +%d) overlaps the payload at %d", s.ID, s.Offset, s.Size, hdr.PayloadOffset)
		}
	}
	im.size = im.sizeFor(fsize)
	if im.keySecret == "" && p.InfoOnly {
		return im, nil // info shows the header without unlocking it
	}
	pass, err := secret(p.Secrets, im.keySecret, p.Name)
	if err != nil {
		return nil, err
	}
	key, slot, err := hdr.Unlock(f, pass, p.Name)
	driver.Wipe(pass)
	if err != nil {
		return nil, err
	}
	im.slot = slot
	im.c, err = hdr.NewCipher(key)
	driver.Wipe(key)
	if err != nil {
		return nil, driver.Unsupportedf(p.Name, "%v", err)
	}
	return im, nil
}

// sizeFor is the virtual size a file of fsize bytes holds: the payload in
// whole sectors (or the segment's fixed size, when it fits).
func (im *image) sizeFor(fsize int64) int64 {
	n := max(fsize-im.payload, 0)
	if d := im.hdr.DataSize; d >= 0 {
		n = min(n, d)
	}
	return n / im.ss * im.ss
}

func (im *image) Size() int64 {
	im.mu.RLock()
	defer im.mu.RUnlock()
	return im.size
}

func (im *image) Parent() *driver.ParentRef { return nil }

func (im *image) Flush() error {
	if im.readOnly {
		return nil
	}
	return im.f.Sync()
}

func (im *image) Close() error { return im.f.Close() }

// cipherName is qemu's cipher-alg for the volume.
func (im *image) cipherAlg() string {
	kb := im.hdr.KeyBytes
	if im.hdr.Cipher.Mode == "xts" {
		kb /= 2
	}
	return im.hdr.Cipher.Alg + "-" + strconv.Itoa(kb*8)
}
