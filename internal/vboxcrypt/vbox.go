package vboxcrypt

import (
	"bytes"
	"encoding/xml"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/vdisk/vdisk/driver"
)

// Properties are a medium's CRYPT/* properties in a media registry.
type Properties struct {
	UUID     string // the medium's UUID as recorded (without braces)
	Location string // its location attribute (the image's file name)
	KeyID    string // CRYPT/KeyId
	KeyStore string // CRYPT/KeyStore (base64)
}

// maxRegistry bounds the .vbox / VirtualBox.xml file read.
const maxRegistry = 64 << 20

func normUUID(u string) string {
	return strings.ToLower(strings.Trim(strings.TrimSpace(u), "{}"))
}

// RegistryProperties lists the media of a VirtualBox settings file (.vbox or
// VirtualBox.xml) that carry a CRYPT/KeyStore property.
func RegistryProperties(path string) ([]Properties, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, driver.Errorf(driver.ErrNotFound, path, -1, "VirtualBox settings file: %v", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxRegistry+1))
	if err != nil {
		return nil, driver.Errorf(err, path, -1, "VirtualBox settings file: %v", err)
	}
	if len(data) > maxRegistry {
		return nil, driver.Errorf(driver.ErrInvalidOption, path, -1, "VirtualBox settings file is larger than %d bytes", maxRegistry)
	}
	return parseRegistry(path, data)
}

func parseRegistry(path string, data []byte) ([]Properties, error) {
	dec := xml.NewDecoder(bytes.NewReader(data))
	var stack []*Properties // one per open HardDisk element
	var out []Properties
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, driver.Errorf(driver.ErrInvalidOption, path, dec.InputOffset(), "VirtualBox settings file is not valid XML: %v", err)
		}
		if len(stack) > 1024 {
			return nil, driver.Errorf(driver.ErrInvalidOption, path, dec.InputOffset(), "VirtualBox settings file nests media more than 1024 deep")
		}
		switch t := tok.(type) {
		case xml.StartElement:
			switch t.Name.Local {
			case "HardDisk":
				p := &Properties{}
				for _, a := range t.Attr {
					switch a.Name.Local {
					case "uuid":
						p.UUID = normUUID(a.Value)
					case "location":
						p.Location = a.Value
					}
				}
				stack = append(stack, p)
			case "Property":
				if len(stack) == 0 {
					continue
				}
				var name, value string
				for _, a := range t.Attr {
					switch a.Name.Local {
					case "name":
						name = a.Value
					case "value":
						value = a.Value
					}
				}
				switch name {
				case "CRYPT/KeyStore":
					stack[len(stack)-1].KeyStore = value
				case "CRYPT/KeyId":
					stack[len(stack)-1].KeyID = value
				}
			}
		case xml.EndElement:
			if t.Name.Local == "HardDisk" && len(stack) > 0 {
				p := stack[len(stack)-1]
				stack = stack[:len(stack)-1]
				if p.KeyStore != "" {
					out = append(out, *p)
				}
			}
		}
	}
	return out, nil
}

// FindKeyStore returns the properties of the medium with uuid (for VDI and
// VHD, whose UUID is VirtualBox's medium UUID) in the settings file at
// path, else of the medium whose location has the image's base name, else
// of the file's only encrypted medium.
func FindKeyStore(path, uuid, image string) (Properties, error) {
	ps, err := RegistryProperties(path)
	if err != nil {
		return Properties{}, err
	}
	if u := normUUID(uuid); u != "" {
		for _, p := range ps {
			if p.UUID == u {
				return p, nil
			}
		}
	}
	base := func(s string) string { return filepath.Base(strings.ReplaceAll(s, `\`, "/")) }
	var byName []Properties
	for _, p := range ps {
		if image != "" && base(p.Location) == base(image) {
			byName = append(byName, p)
		}
	}
	switch {
	case len(byName) == 1:
		return byName[0], nil
	case len(byName) == 0 && len(ps) == 1:
		return ps[0], nil
	}
	return Properties{}, driver.Errorf(driver.ErrNotFound, path, -1, "this VirtualBox settings file lists %d encrypted media and none is the image (UUID {%s}, file name %s) alone; give the key store itself (keystore=BASE64)", len(ps), normUUID(uuid), base(image))
}

func xmlAttr(s string) string {
	var w bytes.Buffer
	_ = xml.EscapeText(&w, []byte(s)) // escapes \n as &#xA;, quotes as &#34;
	return w.String()
}

// HardDiskXML renders a medium's <HardDisk> element of a .vbox media
// registry with its CRYPT/KeyId and CRYPT/KeyStore properties (uuid
// without braces; location the image's file name; format VirtualBox's
// name: VDI, VMDK, VHD).
func HardDiskXML(uuid, location, format, keyID, keyStore string) string {
	var b strings.Builder
	id := ""
	if uuid == "" {
		b.WriteString("<!-- add uuid=\"{...}\": the medium's UUID (a VMDK's ddb.uuid.image) -->\n")
	} else {
		id = `uuid="{` + xmlAttr(uuid) + `}" `
	}
	b.WriteString(`<HardDisk ` + id + `location="` + xmlAttr(location) + `" format="` + xmlAttr(format) + `" type="Normal">` + "\n")
	b.WriteString(`  <Property name="CRYPT/KeyId" value="` + xmlAttr(keyID) + `"/>` + "\n")
	b.WriteString(`  <Property name="CRYPT/KeyStore" value="` + xmlAttr(keyStore) + `"/>` + "\n")
	b.WriteString("</HardDisk>\n")
	return b.String()
}
