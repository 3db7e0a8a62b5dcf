package luks

import (
	"context"
	"time"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/luks"
)

// amendOptions are qemu's luks amend options (qemu-img amend -o
// state=active,new-secret=ID[,keyslot=N][,iter-time=MS] or
// state=inactive,keyslot=N|old-secret=ID).
var amendOptions = []driver.Option{
	{Name: "state", Type: driver.TypeEnum, Values: []string{"active", "inactive"}, Doc: "make key slots active (add a passphrase) or inactive (erase)"},
	{Name: "new-secret", Type: driver.TypeString, Doc: "secret id of the passphrase to add (state=active)"},
	{Name: "old-secret", Type: driver.TypeString, Doc: "erase every slot this secret's passphrase opens (state=inactive)"},
	{Name: "keyslot", Type: driver.TypeInt, Default: "-1", Min: -1, Max: 31, Doc: "the key slot to set or erase"},
	{Name: "iter-time", Type: driver.TypeInt, Default: "2000", Min: 0, Max: 1 << 31, Doc: "PBKDF2 time of the new slot, in milliseconds"},
}

// Amend adds or erases key slots. Adding needs the volume key: the image
// opens a slot again with its own key-secret rather than keeping the key.
func (im *image) Amend(ctx context.Context, kvs []driver.KV) error {
	o, err := driver.ParseOptions("luks", amendOptions, kvs)
	if err != nil {
		return err
	}
	if im.readOnly {
		return driver.Errorf(driver.ErrReadOnly, im.name, -1, "image opened read-only")
	}
	im.hmu.Lock()
	defer im.hmu.Unlock()
	slot := int(o.Int("keyslot"))
	switch o.String("state") {
	case "active":
		if o.String("new-secret") == "" || o.String("old-secret") != "" {
			return driver.OptionErrorf("luks amend: state=active takes new-secret=ID (and optionally keyslot, iter-time)")
		}
		return im.addSlot(ctx, slot, o)
	case "inactive":
		if (slot < 0) == (o.String("old-secret") == "") || o.String("new-secret") != "" {
			return driver.OptionErrorf("luks amend: state=inactive takes keyslot=N or old-secret=ID")
		}
		return im.eraseSlots(slot, o.String("old-secret"))
	}
	return driver.OptionErrorf("luks amend: give state=active or state=inactive")
}

func (im *image) addSlot(ctx context.Context, slot int, o driver.Values) error {
	h := im.hdr
	if slot < 0 {
		if slot = h.FreeSlot(); slot < 0 {
			return driver.OptionErrorf("luks amend: all %d key slots are active", h.MaxSlots())
		}
	}
	if slot >= h.MaxSlots() || h.Slot(slot) != nil {
		return driver.OptionErrorf("luks amend: key slot %d is active or out of range [0, %d)", slot, h.MaxSlots())
	}
	newPass, err := secret(im.secrets, o.String("new-secret"), im.name)
	if err != nil {
		return err
	}
	defer driver.Wipe(newPass)
	pass, err := secret(im.secrets, im.keySecret, im.name)
	if err != nil {
		return err
	}
	key, _, err := h.Unlock(im.f, pass, im.name)
	driver.Wipe(pass)
	if err != nil {
		return err
	}
	defer driver.Wipe(key)
	hash := h.Digest.Hash
	if h.Version == 1 {
		hash = h.Hash
	}
	iters, err := luks.Calibrate(hash, h.KeyBytes, time.Duration(o.Int("iter-time"))*time.Millisecond)
	if err != nil {
		return err
	}
	if err := h.SetSlot(im.f, slot, key, newPass, luks.KDF{Type: "pbkdf2", Hash: hash, Iterations: iters}, nil); err != nil {
		return driver.WithFile(err, "amend", im.name)
	}
	return im.f.Sync()
}

func (im *image) eraseSlots(slot int, oldSecret string) error {
	h := im.hdr
	var ids []int
	if slot >= 0 {
		if h.Slot(slot) == nil {
			return driver.OptionErrorf("luks amend: key slot %d is not active", slot)
		}
		ids = []int{slot}
	} else {
		pass, err := secret(im.secrets, oldSecret, im.name)
		if err != nil {
			return err
		}
		ids, err = h.SlotsOpenedBy(im.f, pass)
		driver.Wipe(pass)
		if err != nil {
			return err
		}
		if len(ids) == 0 {
			return driver.OptionErrorf("luks amend: the passphrase of secret %q opens no key slot", oldSecret)
		}
	}
	if len(ids) >= h.ActiveSlots() {
		return driver.OptionErrorf("luks amend: erasing key slot(s) %v would leave no active slot and lose the data irreversibly; refusing", ids)
	}
	for _, id := range ids {
		if err := h.KillSlot(im.f, id, nil); err != nil {
			return driver.WithFile(err, "amend", im.name)
		}
	}
	return im.f.Sync()
}
