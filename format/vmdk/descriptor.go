package vmdk

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/vdisk/vdisk/driver"
)

// maxDescriptor bounds a descriptor (separate file or embedded), as qemu
// does (1 MiB).
const maxDescriptor = 1 << 20

// maxExtents bounds the extent lines of one descriptor (a 2 TiB
// twoGbMaxExtent image has 1024).
const maxExtents = 4096

// descLine is one line of a descriptor. Lines are kept in order so that a
// rewrite preserves comments, unknown keys and their order.
type descLine struct {
	raw   string // the line as read (without the line ending)
	key   string // lower-cased key of a key=value line, else ""
	name  string // the key as written
	value string // the unquoted value
	quote bool   // the value was quoted
	ext   int    // index into descriptor.extents, or -1
}

// extentLine is one parsed extent line.
type extentLine struct {
	access  string // RW, RDONLY, NOACCESS
	sectors int64
	kind    string // FLAT, SPARSE, ZERO, VMFS, VMFSSPARSE, VMFSRAW, VMFSRDM
	file    string
	offset  int64 // sectors, FLAT only
}

func (e extentLine) String() string {
	switch e.kind {
	case "ZERO":
		return fmt.Sprintf("%s %d ZERO", e.access, e.sectors)
	case "FLAT":
		return fmt.Sprintf("%s %d FLAT %q %d", e.access, e.sectors, e.file, e.offset)
	}
	return fmt.Sprintf("%s %d %s %q", e.access, e.sectors, e.kind, e.file)
}

// descriptor is a parsed text descriptor.
type descriptor struct {
	lines   []descLine
	extents []extentLine
	crlf    bool
}

// parseDescriptor parses descriptor text. file and off name where it came
// from for errors. Tolerates CRLF, blank lines, comments, any case in keys
// and extent keywords, and quoted or unquoted values.
func parseDescriptor(text []byte, file string, off int64) (*descriptor, error) {
	if len(text) > maxDescriptor {
		return nil, driver.Corruptf(file, off, "descriptor of %d bytes is larger than the %d-byte limit", len(text), maxDescriptor)
	}
	// An embedded descriptor is NUL padded.
	if i := strings.IndexByte(string(text), 0); i >= 0 {
		text = text[:i]
	}
	s := string(text)
	d := &descriptor{crlf: strings.Contains(s, "\r\n")}
	s = strings.TrimSuffix(s, "\n")
	if s == "" {
		return d, nil
	}
	pos := off
	for _, raw := range strings.Split(s, "\n") {
		lineOff := pos
		pos += int64(len(raw)) + 1
		raw = strings.TrimSuffix(raw, "\r")
		l := descLine{raw: raw, ext: -1}
		t := strings.TrimSpace(raw)
		if t == "" || t[0] == '#' {
			d.lines = append(d.lines, l)
			continue
		}
		if e, ok, err := parseExtentLine(t, file, lineOff); err != nil {
			return nil, err
		} else if ok {
			if len(d.extents) >= maxExtents {
				return nil, driver.Corruptf(file, lineOff, "descriptor lists more than %d extents", maxExtents)
			}
			l.ext = len(d.extents)
			d.extents = append(d.extents, e)
			d.lines = append(d.lines, l)
			continue
		}
		if i := strings.IndexByte(t, '='); i > 0 {
			l.name = strings.TrimSpace(t[:i])
			l.key = strings.ToLower(l.name)
			v := strings.TrimSpace(t[i+1:])
			if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
				v, l.quote = v[1:len(v)-1], true
			}
			l.value = v
		}
		d.lines = append(d.lines, l)
	}
	return d, nil
}

// parseExtentLine parses `ACCESS SECTORS TYPE ["file" [offset]]`. ok is false
// when the line is not an extent line at all.
func parseExtentLine(t, file string, off int64) (extentLine, bool, error) {
	var e extentLine
	f := strings.Fields(t)
	if len(f) < 2 {
		return e, false, nil
	}
	acc := strings.ToUpper(f[0])
	if acc != "RW" && acc != "RDONLY" && acc != "NOACCESS" {
		return e, false, nil
	}
	if strings.Contains(f[0], "=") {
		return e, false, nil
	}
	bad := func(format string, a ...any) (extentLine, bool, error) {
		return e, false, driver.Corruptf(file, off, "extent line %q: %s", clip(t), fmt.Sprintf(format, a...))
	}
	if len(f) < 3 {
		return bad("too few fields")
	}
	n, err := strconv.ParseInt(f[1], 10, 64)
	if err != nil || n < 0 || n > maxSectors {
		return bad("invalid size %q", f[1])
	}
	e.access, e.sectors, e.kind = acc, n, strings.ToUpper(f[2])
	// The rest after the type keyword: a file name (quoted, may hold
	// spaces) and an optional offset.
	rest := t
	for range 3 {
		rest = strings.TrimLeft(rest, " \t")
		i := strings.IndexAny(rest, " \t")
		if i < 0 {
			rest = ""
			break
		}
		rest = rest[i:]
	}
	rest = strings.TrimSpace(rest)
	switch e.kind {
	case "ZERO":
		return e, true, nil
	case "FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "VMFSRAW", "VMFSRDM", "SESPARSE":
	default:
		return bad("unknown extent type %q", f[2])
	}
	if rest == "" {
		return bad("no file name")
	}
	if rest[0] == '"' {
		j := strings.IndexByte(rest[1:], '"')
		if j < 0 {
			return bad("unterminated file name")
		}
		e.file, rest = rest[1:1+j], strings.TrimSpace(rest[2+j:])
	} else {
		g := strings.Fields(rest)
		e.file, rest = g[0], strings.TrimSpace(strings.TrimPrefix(rest, g[0]))
	}
	if e.file == "" {
		return bad("empty file name")
	}
	if rest != "" {
		o, err := strconv.ParseInt(strings.Fields(rest)[0], 10, 64)
		if err != nil || o < 0 || o > maxSectors {
			return bad("invalid offset %q", rest)
		}
		e.offset = o
	}
	return e, true, nil
}

func clip(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// get returns the value of key (case-insensitive) and whether it is set.
func (d *descriptor) get(key string) (string, bool) {
	key = strings.ToLower(key)
	for _, l := range d.lines {
		if l.key == key {
			return l.value, true
		}
	}
	return "", false
}

// set changes key's value in place (keeping its spelling and quoting), or
// appends it: header keys before the extent section, ddb keys at the end.
func (d *descriptor) set(key, value string, quote bool) {
	lk := strings.ToLower(key)
	for i := range d.lines {
		if d.lines[i].key == lk {
			d.lines[i].value = value
			d.lines[i].raw = ""
			return
		}
	}
	l := descLine{key: lk, name: key, value: value, quote: quote, ext: -1}
	if strings.HasPrefix(lk, "ddb.") {
		d.lines = append(d.lines, l)
		return
	}
	// After the last header key line (before the extents).
	at := -1
	for i, dl := range d.lines {
		if dl.ext >= 0 {
			break
		}
		if dl.key != "" && !strings.HasPrefix(dl.key, "ddb.") {
			at = i
		}
	}
	d.lines = append(d.lines, descLine{})
	copy(d.lines[at+2:], d.lines[at+1:])
	d.lines[at+1] = l
}

// del removes key.
func (d *descriptor) del(key string) {
	lk := strings.ToLower(key)
	out := d.lines[:0]
	for _, l := range d.lines {
		if l.key != lk {
			out = append(out, l)
		}
	}
	d.lines = out
}

// bytes renders the descriptor. Unchanged lines are written as read.
func (d *descriptor) bytes() []byte {
	nl := "\n"
	if d.crlf {
		nl = "\r\n"
	}
	var b strings.Builder
	for _, l := range d.lines {
		switch {
		case l.raw != "":
			b.WriteString(l.raw)
		case l.ext >= 0:
			b.WriteString(d.extents[l.ext].String())
		case l.key != "":
			v := l.value
			if l.quote {
				v = `"` + v + `"`
			}
			if strings.HasPrefix(l.key, "ddb.") {
				b.WriteString(l.name + " = " + v)
			} else {
				b.WriteString(l.name + "=" + v)
			}
		}
		b.WriteString(nl)
	}
	return []byte(b.String())
}

// hex32 parses a CID ("ffffffff", "fffffffe", "12ab").
func hex32(s string) (uint32, bool) {
	s = strings.TrimPrefix(strings.TrimPrefix(strings.TrimSpace(s), "0x"), "0X")
	v, err := strconv.ParseUint(s, 16, 32)
	return uint32(v), err == nil
}
