package raw_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/memfs"
)

// fixedStorage holds files that cannot change size, as an NBD export or
// an iSCSI LUN.
type fixedStorage struct{ *memfs.FS }

func (s fixedStorage) Open(name string, flag driver.OpenFlag) (driver.File, error) {
	f, err := s.FS.Open(name, flag)
	if err != nil {
		return nil, err
	}
	return fixedFile{f}, nil
}

type fixedFile struct{ driver.File }

func (f fixedFile) Truncate(size int64) error {
	if cur, err := f.Size(); err != nil || cur != size {
		return driver.Unsupportedf(f.Name(), "the size is fixed")
	}
	return nil
}

// TestCreateOnFixedSize: creating a raw image of another size on a file
// that cannot be resized fails before anything of it is punched; at its
// own size it succeeds and reads zeros.
func TestCreateOnFixedSize(t *testing.T) {
	st := fixedStorage{memfs.New()}
	data := bytes.Repeat([]byte{0x77}, 1<<20)
	if err := st.WriteFile("/lun", data); err != nil {
		t.Fatal(err)
	}
	_, err := vdisk.Create(ctx, "/lun", &vdisk.CreateOptions{Format: "raw", Size: 2 << 20, Overwrite: true, Storage: st})
	if !errors.Is(err, driver.ErrUnsupported) {
		t.Fatalf("create of another size: %v", err)
	}
	got, err := st.ReadFile("/lun")
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("a failed create changed the file: %v", err)
	}
	d, err := vdisk.Create(ctx, "/lun", &vdisk.CreateOptions{Format: "raw", Size: 1 << 20, Overwrite: true, Storage: st})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	buf := make([]byte, 1<<20)
	if _, err := d.ReadAt(buf, 0); err != nil || !driver.IsZero(buf) {
		t.Fatalf("create at the file's own size does not read zeros: %v", err)
	}
}
