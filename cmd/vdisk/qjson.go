package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
)

// This file reproduces how qemu-img 7.2 prints QAPI objects: QEMU builds a
// QDict (a hash table of 512 buckets, hashed with tdb_hash, new entries at
// the head of their bucket) and prints it in bucket order, pretty-printed
// with four-space indentation and its own string escaping. Matching that
// order makes `info --output json` byte-identical to qemu-img's.

type jkind uint8

const (
	jObject jkind = iota
	jArray
	jString
	jNumber // str holds the literal
	jBool   // str is "true" or "false"
	jNull
)

// jnode is a JSON value whose objects remember insertion order.
type jnode struct {
	kind jkind
	str  string
	keys []string
	vals []*jnode
}

func jobj() *jnode            { return &jnode{kind: jObject} }
func jarr() *jnode            { return &jnode{kind: jArray} }
func jstr(s string) *jnode    { return &jnode{kind: jString, str: s} }
func jint(n int64) *jnode     { return &jnode{kind: jNumber, str: strconv.FormatInt(n, 10)} }
func jbool(b bool) *jnode     { return &jnode{kind: jBool, str: strconv.FormatBool(b)} }
func (n *jnode) add(v *jnode) { n.vals = append(n.vals, v) }

// set adds or replaces key (a replaced key keeps its place, as in a QDict).
func (n *jnode) set(key string, v *jnode) {
	for i, k := range n.keys {
		if k == key {
			n.vals[i] = v
			return
		}
	}
	n.keys = append(n.keys, key)
	n.vals = append(n.vals, v)
}

func (n *jnode) get(key string) *jnode {
	for i, k := range n.keys {
		if k == key {
			return n.vals[i]
		}
	}
	return nil
}

// toJNode converts any JSON-marshalable value, keeping struct field and
// map key order as encoding/json produces it.
func toJNode(v any) (*jnode, error) {
	data, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	n, err := decodeJNode(dec)
	if err != nil {
		return nil, fmt.Errorf("decoding %s: %w", data, err)
	}
	return n, nil
}

func decodeJNode(dec *json.Decoder) (*jnode, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	switch t := tok.(type) {
	case json.Delim:
		switch t {
		case '{':
			n := jobj()
			for dec.More() {
				kt, err := dec.Token()
				if err != nil {
					return nil, err
				}
				k, _ := kt.(string)
				v, err := decodeJNode(dec)
				if err != nil {
					return nil, err
				}
				n.set(k, v)
			}
			_, err := dec.Token() // '}'
			return n, err
		case '[':
			n := jarr()
			for dec.More() {
				v, err := decodeJNode(dec)
				if err != nil {
					return nil, err
				}
				n.add(v)
			}
			_, err := dec.Token() // ']'
			return n, err
		}
		return nil, fmt.Errorf("unexpected delimiter %v", t)
	case string:
		return jstr(t), nil
	case json.Number:
		return &jnode{kind: jNumber, str: qnumString(t)}, nil
	case bool:
		return jbool(t), nil
	case nil:
		return &jnode{kind: jNull}, nil
	}
	return nil, fmt.Errorf("unexpected token %v", tok)
}

// qnumString prints a number as QEMU does: integers in decimal, doubles
// with "%.17g".
func qnumString(n json.Number) string {
	s := n.String()
	if !strings.ContainsAny(s, ".eE") {
		return s
	}
	f, err := n.Float64()
	if err != nil {
		return s
	}
	return strconv.FormatFloat(f, 'g', 17, 64)
}

// tdbHash is QEMU's qdict hash function (qobject/qdict.c).
func tdbHash(name string) uint32 {
	value := uint32(0x238F13AF) * uint32(len(name))
	for i := 0; i < len(name); i++ {
		value += uint32(name[i]) << (uint(i) * 5 % 24)
	}
	return 1103515243*value + 12345
}

const qdictBuckets = 512

// qdictOrder returns the indices of keys (in insertion order) in the order
// QEMU iterates a QDict: by bucket, and within a bucket newest first.
func qdictOrder(keys []string) []int {
	idx := make([]int, len(keys))
	for i := range idx {
		idx[i] = i
	}
	sort.SliceStable(idx, func(a, b int) bool {
		ba := tdbHash(keys[idx[a]]) % qdictBuckets
		bb := tdbHash(keys[idx[b]]) % qdictBuckets
		if ba != bb {
			return ba < bb
		}
		return idx[a] > idx[b]
	})
	return idx
}

// writeQJSON prints n as qobject_to_json_pretty does (without a final
// newline).
func writeQJSON(b *strings.Builder, n *jnode, indent int) {
	newline := func(ind int) {
		b.WriteByte('\n')
		b.WriteString(strings.Repeat(" ", ind*4))
	}
	switch n.kind {
	case jObject:
		b.WriteByte('{')
		sep := ""
		for _, i := range qdictOrder(n.keys) {
			b.WriteString(sep)
			newline(indent + 1)
			writeQString(b, n.keys[i])
			b.WriteString(": ")
			writeQJSON(b, n.vals[i], indent+1)
			sep = ","
		}
		newline(indent)
		b.WriteByte('}')
	case jArray:
		b.WriteByte('[')
		sep := ""
		for _, v := range n.vals {
			b.WriteString(sep)
			newline(indent + 1)
			writeQJSON(b, v, indent+1)
			sep = ","
		}
		newline(indent)
		b.WriteByte(']')
	case jString:
		writeQString(b, n.str)
	case jNumber, jBool:
		b.WriteString(n.str)
	case jNull:
		b.WriteString("null")
	}
}

// writeQString quotes s as QEMU's JSON writer does: the usual escapes for
// quote, backslash and control characters, everything outside printable
// ASCII as \uXXXX (upper-case hex, surrogate pairs beyond the BMP).
func writeQString(b *strings.Builder, s string) {
	b.WriteByte('"')
	for _, r := range s {
		switch r {
		case '"':
			b.WriteString(`\"`)
		case '\\':
			b.WriteString(`\\`)
		case '\b':
			b.WriteString(`\b`)
		case '\f':
			b.WriteString(`\f`)
		case '\n':
			b.WriteString(`\n`)
		case '\r':
			b.WriteString(`\r`)
		case '\t':
			b.WriteString(`\t`)
		default:
			switch {
			case r > 0xFFFF:
				fmt.Fprintf(b, `\u%04X\u%04X`, 0xD800+((r-0x10000)>>10), 0xDC00+((r-0x10000)&0x3FF))
			case r < 0x20 || r >= 0x7F:
				fmt.Fprintf(b, `\u%04X`, r)
			default:
				b.WriteRune(r)
			}
		}
	}
	b.WriteByte('"')
}

// dumpQObject prints a value as qemu-img's human "Format specific
// information" does (block/qapi.c dump_qobject): dictionary keys with dashes
// turned into spaces, nested values indented by four spaces per level.
func dumpQObject(w io.Writer, indent int, n *jnode) {
	switch n.kind {
	case jObject:
		for _, i := range qdictOrder(n.keys) {
			v := n.vals[i]
			composite := v.kind == jObject || v.kind == jArray
			key := strings.ReplaceAll(n.keys[i], "-", " ")
			sep := " "
			if composite {
				sep = "\n"
			}
			fmt.Fprintf(w, "%*s%s:%s", indent*4, "", key, sep)
			dumpQObject(w, indent+1, v)
			if !composite {
				fmt.Fprintln(w)
			}
		}
	case jArray:
		for i, v := range n.vals {
			composite := v.kind == jObject || v.kind == jArray
			sep := " "
			if composite {
				sep = "\n"
			}
			fmt.Fprintf(w, "%*s[%d]:%s", indent*4, "", i, sep)
			dumpQObject(w, indent+1, v)
			if !composite {
				fmt.Fprintln(w)
			}
		}
	case jNull:
		fmt.Fprint(w, "null")
	default:
		fmt.Fprint(w, n.str)
	}
}
