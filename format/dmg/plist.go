package dmg

import (
	"bytes"
	"encoding/base64"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"strings"
)

// The subset of Apple's XML property lists a DMG needs: dict, array,
// string, data, integer, true/false. Parsing is bounded by the document
// (read whole, at most maxMetadata bytes) and by maxPlistDepth.

const maxPlistDepth = 32

type plistDict struct {
	keys []string
	vals []any
}

func (d *plistDict) get(k string) any {
	for i, key := range d.keys {
		if key == k {
			return d.vals[i]
		}
	}
	return nil
}

type plistParser struct{ d *xml.Decoder }

// next returns the next start or end element, skipping text between
// elements, comments, processing instructions and the DOCTYPE.
func (p *plistParser) next() (xml.Token, error) {
	for {
		t, err := p.d.Token()
		if err != nil {
			return nil, err
		}
		switch t := t.(type) {
		case xml.StartElement, xml.EndElement:
			return t, nil
		case xml.CharData:
			if len(bytes.TrimSpace(t)) != 0 {
				return nil, fmt.Errorf("unexpected text %.20q", string(t))
			}
		}
	}
}

// text reads the character data of an element up to its end.
func (p *plistParser) text() (string, error) {
	var sb strings.Builder
	for {
		t, err := p.d.Token()
		if err != nil {
			return "", err
		}
		switch t := t.(type) {
		case xml.CharData:
			sb.Write(t)
		case xml.EndElement:
			return sb.String(), nil
		case xml.StartElement:
			return "", fmt.Errorf("unexpected <%s> inside a plist scalar", t.Name.Local)
		}
	}
}

func (p *plistParser) value(se xml.StartElement, depth int) (any, error) {
	if depth > maxPlistDepth {
		return nil, fmt.Errorf("property list nested deeper than %d", maxPlistDepth)
	}
	switch se.Name.Local {
	case "dict":
		d := &plistDict{}
		for {
			t, err := p.next()
			if err != nil {
				return nil, err
			}
			if _, ok := t.(xml.EndElement); ok {
				return d, nil
			}
			ks := t.(xml.StartElement)
			if ks.Name.Local != "key" {
				return nil, fmt.Errorf("<%s> where a dict key was expected", ks.Name.Local)
			}
			k, err := p.text()
			if err != nil {
				return nil, err
			}
			t, err = p.next()
			if err != nil {
				return nil, err
			}
			vs, ok := t.(xml.StartElement)
			if !ok {
				return nil, fmt.Errorf("dict key %q has no value", k)
			}
			v, err := p.value(vs, depth+1)
			if err != nil {
				return nil, err
			}
			d.keys, d.vals = append(d.keys, k), append(d.vals, v)
		}
	case "array":
		var a []any
		for {
			t, err := p.next()
			if err != nil {
				return nil, err
			}
			if _, ok := t.(xml.EndElement); ok {
				return a, nil
			}
			v, err := p.value(t.(xml.StartElement), depth+1)
			if err != nil {
				return nil, err
			}
			a = append(a, v)
		}
	case "data":
		s, err := p.text()
		if err != nil {
			return nil, err
		}
		s = strings.Map(func(r rune) rune {
			if r == ' ' || r == '\t' || r == '\n' || r == '\r' {
				return -1
			}
			return r
		}, s)
		b, err := base64.StdEncoding.DecodeString(s)
		if err != nil {
			return nil, fmt.Errorf("bad base64 in <data>: %v", err)
		}
		return b, nil
	case "true", "false":
		if _, err := p.text(); err != nil {
			return nil, err
		}
		return se.Name.Local == "true", nil
	default: // string, integer, real, date: kept as text
		return p.text()
	}
}

// blkxEntry is one partition's entry of the resource-fork > blkx array.
type blkxEntry struct {
	name string
	data []byte
}

// parsePlist returns the blkx entries of a UDIF property list.
func parsePlist(b []byte) ([]blkxEntry, error) {
	p := &plistParser{d: xml.NewDecoder(bytes.NewReader(b))}
	t, err := p.next()
	if err != nil {
		return nil, plistErr(err)
	}
	se, ok := t.(xml.StartElement)
	if !ok || se.Name.Local != "plist" {
		return nil, errors.New("the XML is not a property list (no <plist>)")
	}
	t, err = p.next()
	if err != nil {
		return nil, plistErr(err)
	}
	se, ok = t.(xml.StartElement)
	if !ok {
		return nil, errors.New("empty property list")
	}
	root, err := p.value(se, 0)
	if err != nil {
		return nil, plistErr(err)
	}
	rd, ok := root.(*plistDict)
	if !ok {
		return nil, errors.New("the property list's root is not a dict")
	}
	rf, ok := rd.get("resource-fork").(*plistDict)
	if !ok {
		return nil, errors.New("the property list has no resource-fork dict")
	}
	arr, ok := rf.get("blkx").([]any)
	if !ok {
		return nil, errors.New("the property list has no resource-fork > blkx array")
	}
	var out []blkxEntry
	for i, v := range arr {
		d, ok := v.(*plistDict)
		if !ok {
			return nil, fmt.Errorf("blkx entry %d is not a dict", i)
		}
		data, ok := d.get("Data").([]byte)
		if !ok {
			return nil, fmt.Errorf("blkx entry %d has no Data", i)
		}
		name, _ := d.get("Name").(string)
		if name == "" {
			name, _ = d.get("CFName").(string)
		}
		out = append(out, blkxEntry{name: name, data: data})
	}
	return out, nil
}

func plistErr(err error) error {
	if err == io.EOF {
		return errors.New("the property list ends early")
	}
	return err
}

// writePlist renders the property list of a new image: one blkx entry per
// table, as Apple's tools lay it out (base64 in lines of 52 characters).
func writePlist(entries []blkxEntry) []byte {
	var b bytes.Buffer
	b.WriteString(`<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
	<key>resource-fork</key>
	<dict>
		<key>blkx</key>
		<array>
`)
	for i, e := range entries {
		var name bytes.Buffer
		xml.EscapeText(&name, []byte(e.name))
		fmt.Fprintf(&b, "\t\t\t<dict>\n\t\t\t\t<key>Attributes</key>\n\t\t\t\t<string>0x0050</string>\n")
		fmt.Fprintf(&b, "\t\t\t\t<key>CFName</key>\n\t\t\t\t<string>%s</string>\n", name.Bytes())
		b.WriteString("\t\t\t\t<key>Data</key>\n\t\t\t\t<data>\n")
		s := base64.StdEncoding.EncodeToString(e.data)
		for len(s) > 0 {
			n := min(len(s), 52)
			b.WriteString("\t\t\t\t")
			b.WriteString(s[:n])
			b.WriteByte('\n')
			s = s[n:]
		}
		b.WriteString("\t\t\t\t</data>\n")
		fmt.Fprintf(&b, "\t\t\t\t<key>ID</key>\n\t\t\t\t<string>%d</string>\n", i-1)
		fmt.Fprintf(&b, "\t\t\t\t<key>Name</key>\n\t\t\t\t<string>%s</string>\n\t\t\t</dict>\n", name.Bytes())
	}
	b.WriteString("\t\t</array>\n\t</dict>\n</dict>\n</plist>\n")
	return b.Bytes()
}
