package vdisk

import (
	"os"
	"strconv"
	"strings"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/vboxcrypt"
)

// VirtualBox disk encryption (the VD crypt filter) for VDI, VMDK and VHD:
// see internal/vboxcrypt. The keys below are taken out of an image's
// options before its driver sees them.
//
// Open (-o / --image-opts):
//
//	keystore=BASE64|PATH  the medium's CRYPT/KeyStore property, or a .vbox /
//	                      VirtualBox.xml file it is read from (by the
//	                      image's UUID), or a file holding the base64 text
//	key-secret=ID         the secret holding the password
//
// Create (-o on create/convert):
//
//	vbox-encrypt=AES-XTS256-PLAIN64|AES-XTS128-PLAIN64
//	key-secret=ID         the secret holding the new password
//	vbox-keystore-out=PATH  where the medium's <HardDisk> element for the
//	                      .vbox media registry is written, with its
//	                      CRYPT/KeyId and CRYPT/KeyStore properties (also a
//	                      valid keystore=PATH for opening)
//	vbox-key-id=NAME      CRYPT/KeyId (the password's name; default ID)
//	vbox-iter-count=N     PBKDF2 iterations (default 20000, VirtualBox's
//	                      minimum; it benchmarks 250 ms)

// vboxKey spells an option key with '-' (--image-opts hands '_').
func vboxKey(k string) string { return strings.ReplaceAll(k, "_", "-") }

// DriverCreateOptions returns the create options the format's driver
// sees: kvs without the VirtualBox encryption keys (vbox-encrypt,
// key-secret, vbox-keystore-out, vbox-key-id, vbox-iter-count), which
// Create handles; an error when those are incomplete or misplaced. For
// callers that validate options before creating (the CLI).
func DriverCreateOptions(format string, kvs []driver.KV) ([]driver.KV, error) {
	rest, _, err := vboxCreateOptions(format, kvs)
	return rest, err
}

// vboxFormats are the formats VirtualBox's filter is used with.
func vboxFormat(format string) bool {
	switch format {
	case "vdi", "vmdk", "vpc":
		return true
	}
	return false
}

type vboxOpen struct {
	keystore, secret string
}

// vboxOpenOptions takes the filter's open keys out of kvs.
func vboxOpenOptions(format string, kvs []driver.KV) ([]driver.KV, *vboxOpen) {
	if !vboxFormat(format) {
		return kvs, nil
	}
	var vo vboxOpen
	var rest []driver.KV
	found := false
	for _, kv := range kvs {
		switch vboxKey(kv.Key) {
		case "keystore":
			vo.keystore, found = kv.Value, true
		case "key-secret":
			vo.secret, found = kv.Value, true
		default:
			rest = append(rest, kv)
		}
	}
	if !found {
		return kvs, nil
	}
	return rest, &vo
}

// vboxWrapOpen puts the filter over a freshly opened image: with the key
// store and password of vo, or with the cipher a child layer handed down
// (the whole chain shares one DEK, as VirtualBox's filter sits on the disk).
func vboxWrapOpen(img driver.Image, name, format string, vo *vboxOpen, fl *layerFlags) (driver.Image, error) {
	if fl.vbox == nil && vo == nil {
		return img, nil
	}
	if fl.infoOnly && fl.vbox == nil {
		return img, nil
	}
	c := fl.vbox
	if c == nil {
		if vo.keystore == "" || vo.secret == "" {
			return nil, driver.Errorf(ErrInvalidOption, name, -1, "a VirtualBox-encrypted image needs both keystore= (the CRYPT/KeyStore property or the .vbox file) and key-secret=")
		}
		uuid := ""
		if id, ok := img.(driver.Identifier); ok && format != "vmdk" { // a VMDK's identifier is its CID
			uuid = id.UUID()
		}
		text, src, err := vboxKeyStoreText(vo.keystore, uuid, name)
		if err != nil {
			return nil, err
		}
		st, err := vboxcrypt.Decode(src, text)
		if err != nil {
			return nil, err
		}
		pw, err := driver.LookupSecret(fl.secrets, vo.secret)
		if err != nil {
			return nil, driver.WithFile(err, "open", name)
		}
		dek, err := st.Unlock(name, pw)
		driver.Wipe(pw)
		if err != nil {
			return nil, err
		}
		c, err = vboxcrypt.NewCipher(st.Cipher, dek)
		driver.Wipe(dek)
		if err != nil {
			return nil, driver.Corruptf(name, -1, "%v", err)
		}
	}
	w, err := vboxcrypt.Wrap(img, name, c)
	if err != nil {
		return nil, err
	}
	fl.vbox = c
	return w, nil
}

// vboxKeyStoreText resolves keystore=: an existing file is a VirtualBox
// settings file (XML) or holds the base64 text; anything else is the text.
func vboxKeyStoreText(v, uuid, image string) (text, source string, err error) {
	fi, serr := os.Stat(v)
	if serr != nil || !fi.Mode().IsRegular() {
		return v, image, nil
	}
	if fi.Size() > 64<<20 {
		return "", "", driver.Errorf(ErrInvalidOption, v, -1, "key store file is larger than 64 MiB")
	}
	b, err := os.ReadFile(v)
	if err != nil {
		return "", "", driver.Errorf(ErrNotFound, v, -1, "key store file: %v", err)
	}
	if strings.HasPrefix(strings.TrimSpace(string(b)), "<") {
		p, err := vboxcrypt.FindKeyStore(v, uuid, image)
		if err != nil {
			return "", "", err
		}
		return p.KeyStore, v, nil
	}
	return string(b), v, nil
}

type vboxCreate struct {
	cipher, secret, out, keyID string
	iter                       int
}

// vboxCreateOptions takes the filter's create keys out of kvs.
func vboxCreateOptions(format string, kvs []driver.KV) ([]driver.KV, *vboxCreate, error) {
	var vc vboxCreate
	var rest []driver.KV
	found := false
	for _, kv := range kvs {
		switch vboxKey(kv.Key) {
		case "vbox-encrypt":
			vc.cipher, found = kv.Value, true
		case "vbox-keystore-out":
			vc.out = kv.Value
		case "vbox-key-id":
			vc.keyID = kv.Value
		case "vbox-iter-count":
			n, err := strconv.Atoi(kv.Value)
			if err != nil {
				return nil, nil, driver.OptionErrorf("vbox-iter-count=%q is not a number", kv.Value)
			}
			vc.iter = n
		case "key-secret":
			if vboxFormat(format) {
				vc.secret = kv.Value
			} else {
				rest = append(rest, kv)
			}
		default:
			rest = append(rest, kv)
		}
	}
	if !found {
		if vc.out != "" || vc.keyID != "" || vc.iter != 0 {
			return nil, nil, driver.OptionErrorf("vbox-keystore-out, vbox-key-id and vbox-iter-count go with vbox-encrypt=")
		}
		if vc.secret != "" {
			return nil, nil, driver.OptionErrorf("key-secret= on a %s image goes with vbox-encrypt= (VirtualBox encryption)", format)
		}
		return kvs, nil, nil
	}
	if !vboxFormat(format) {
		return nil, nil, driver.OptionErrorf("vbox-encrypt is VirtualBox's disk encryption, for vdi, vmdk and vpc images, not %s", format)
	}
	if vboxcrypt.KeyLenOf(vc.cipher) == 0 {
		return nil, nil, driver.OptionErrorf("vbox-encrypt=%q: use %s or %s", vc.cipher, vboxcrypt.XTS256, vboxcrypt.XTS128)
	}
	if vc.secret == "" || vc.out == "" {
		return nil, nil, driver.OptionErrorf("vbox-encrypt needs key-secret=ID (the password) and vbox-keystore-out=PATH (where the CRYPT/KeyStore property is written)")
	}
	if vc.keyID == "" {
		vc.keyID = vc.secret
	}
	return rest, &vc, nil
}

// vboxWrapCreate makes the DEK and its key store for a new image, writes
// the properties to vc.out and puts the filter over the image.
func vboxWrapCreate(img driver.Image, name, format string, vc *vboxCreate, fl *layerFlags) (driver.Image, error) {
	pw, err := driver.LookupSecret(fl.secrets, vc.secret)
	if err != nil {
		return nil, driver.WithFile(err, "create", name)
	}
	defer driver.Wipe(pw)
	dek, err := vboxcrypt.NewDEK(vc.cipher)
	if err != nil {
		return nil, err
	}
	defer driver.Wipe(dek)
	st, err := vboxcrypt.NewStore(vc.cipher, pw, dek, vc.iter)
	if err != nil {
		return nil, err
	}
	c, err := vboxcrypt.NewCipher(vc.cipher, dek)
	if err != nil {
		return nil, err
	}
	w, err := vboxcrypt.Wrap(img, name, c)
	if err != nil {
		return nil, err
	}
	uuid := ""
	if id, ok := img.(driver.Identifier); ok && format != "vmdk" {
		uuid = id.UUID()
	}
	text := vboxcrypt.HardDiskXML(uuid, name, vboxSettingsFormat(format), vc.keyID, st.Encode())
	if err := os.WriteFile(vc.out, []byte(text), 0o600); err != nil {
		return nil, driver.Errorf(err, vc.out, -1, "writing the VirtualBox key store: %v", err)
	}
	fl.vbox = c
	return w, nil
}

// vboxSettingsFormat is VirtualBox's name of a format in its media registry.
func vboxSettingsFormat(format string) string {
	switch format {
	case "vpc":
		return "VHD"
	}
	return strings.ToUpper(format)
}

// vboxEncrypted reports whether a layer is seen through the filter (its
// unwritten sectors do not read as zeros in VirtualBox, so copies write
// every sector).
func vboxEncrypted(l *Layer) bool {
	_, ok := l.img.(*vboxcrypt.Image)
	return ok
}

// vboxInherit puts the chain's filter over a new top layer made over an
// encrypted chain (a live snapshot), so its data is encrypted with the
// chain's DEK as VirtualBox's diff images are.
func vboxInherit(l *Layer, c *vboxcrypt.Cipher) error {
	if c == nil || vboxEncrypted(l) {
		return nil
	}
	w, err := vboxcrypt.Wrap(l.img, l.Name, c)
	if err != nil {
		return err
	}
	l.img = w
	l.fl.vbox = c
	return nil
}
