package iscsi

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strings"
)

// Limits of text keys (RFC 7143 §6.1): key names up to 63 bytes; values up
// to 255 bytes except the few that may reach 8192 (CHAP values, target
// lists), so 8192 bounds every value. maxTextPairs bounds a whole exchange.
const (
	maxKeyLen    = 63
	maxValueLen  = 8192
	maxTextPairs = 1024
	maxTextBytes = 1 << 20
)

// KV is one text key=value pair, in wire order.
type KV struct {
	Key, Value string
}

// ParseText decodes a login or text data segment: NUL-terminated
// "key=value" pairs. A final pair without its NUL is refused, as are
// empty keys, keys or values past their limits and bytes a key may not
// hold.
func ParseText(b []byte) ([]KV, error) {
	if len(b) > maxTextBytes {
		return nil, protoErrorf("text segment of %d bytes", len(b))
	}
	var out []KV
	for len(b) > 0 {
		i := bytes.IndexByte(b, 0)
		if i < 0 {
			return nil, protoErrorf("text pair %q is not NUL-terminated", clip(b))
		}
		pair := b[:i]
		b = b[i+1:]
		if len(pair) == 0 {
			// Padding NULs some targets leave; nothing follows them.
			continue
		}
		eq := bytes.IndexByte(pair, '=')
		if eq <= 0 {
			return nil, protoErrorf("text pair %q has no key=value form", clip(pair))
		}
		key, val := pair[:eq], pair[eq+1:]
		if len(key) > maxKeyLen {
			return nil, protoErrorf("text key %q longer than %d bytes", clip(key), maxKeyLen)
		}
		for _, c := range key {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '+' || c == '@' || c == '_') {
				return nil, protoErrorf("text key %q holds byte %#x", clip(key), c)
			}
		}
		if len(val) > maxValueLen {
			return nil, protoErrorf("value of %s longer than %d bytes", key, maxValueLen)
		}
		if len(out) >= maxTextPairs {
			return nil, protoErrorf("more than %d text pairs", maxTextPairs)
		}
		out = append(out, KV{string(key), string(val)})
	}
	return out, nil
}

func clip(b []byte) string {
	if len(b) > 40 {
		return string(b[:40]) + "..."
	}
	return string(b)
}

// EncodeText encodes pairs as a data segment.
func EncodeText(kvs []KV) []byte {
	var b []byte
	for _, kv := range kvs {
		b = append(b, kv.Key...)
		b = append(b, '=')
		b = append(b, kv.Value...)
		b = append(b, 0)
	}
	return b
}

// lookup returns the last value of key (a later pair overrides).
func lookup(kvs []KV, key string) (string, bool) {
	v, ok := "", false
	for _, kv := range kvs {
		if kv.Key == key {
			v, ok = kv.Value, true
		}
	}
	return v, ok
}

// decodeBinary decodes a binary value: "0x"/"0X" hex or "0b"/"0B" base64
// (RFC 7143 §6.1).
func decodeBinary(s string) ([]byte, error) {
	if len(s) < 3 || s[0] != '0' {
		return nil, fmt.Errorf("binary value %q lacks a 0x or 0b prefix", clipS(s))
	}
	switch s[1] {
	case 'x', 'X':
		h := s[2:]
		if len(h)%2 == 1 {
			h = "0" + h
		}
		return hex.DecodeString(h)
	case 'b', 'B':
		return base64.StdEncoding.DecodeString(s[2:])
	}
	return nil, fmt.Errorf("binary value %q lacks a 0x or 0b prefix", clipS(s))
}

func clipS(s string) string { return clip([]byte(s)) }

func encodeHex(b []byte) string { return "0x" + hex.EncodeToString(b) }

// hasValue reports whether a comma-separated list holds v.
func hasValue(list, v string) bool {
	for _, x := range strings.Split(list, ",") {
		if x == v {
			return true
		}
	}
	return false
}
