package driver

import (
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
)

// OptionType is the type of a declared option.
type OptionType int

const (
	TypeString OptionType = iota
	TypeBool
	TypeInt
	TypeSize // an integer with K/M/G/T/P/E suffixes (powers of 1024)
	TypeEnum
)

func (t OptionType) String() string {
	return [...]string{"string", "bool", "int", "size", "enum"}[t]
}

// Option declares one -o key of a format.
type Option struct {
	Name    string
	Type    OptionType
	Default string // as the user would write it; "" for none
	// Min and Max bound Int and Size options when Max > Min.
	Min, Max int64
	// PowerOf2 requires Int/Size values to be powers of two.
	PowerOf2 bool
	// Values lists the accepted Enum values.
	Values []string
	Doc    string
}

// Values holds parsed, validated option values keyed by name. Declared
// options with a default are always present.
type Values map[string]any

// Bool returns a bool option (false if absent).
func (v Values) Bool(name string) bool { b, _ := v[name].(bool); return b }

// Int returns an Int or Size option (0 if absent).
func (v Values) Int(name string) int64 { i, _ := v[name].(int64); return i }

// String returns a String or Enum option ("" if absent).
func (v Values) String(name string) string { s, _ := v[name].(string); return s }

// Has reports whether the option was given or has a default.
func (v Values) Has(name string) bool { _, ok := v[name]; return ok }

// KV is one key=value pair as the user gave it.
type KV struct{ Key, Value string }

// SplitOptions parses qemu's -o syntax: "k=v,k2=v2", where ",," is a literal
// comma inside a value. A key without '=' means "k=on" as in qemu.
func SplitOptions(s string) ([]KV, error) {
	var out []KV
	var cur strings.Builder
	var parts []string
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == ',' {
			if i+1 < len(s) && s[i+1] == ',' {
				cur.WriteByte(',')
				i++
				continue
			}
			parts = append(parts, cur.String())
			cur.Reset()
			continue
		}
		cur.WriteByte(c)
	}
	parts = append(parts, cur.String())
	for _, p := range parts {
		if p == "" {
			continue
		}
		k, v, ok := strings.Cut(p, "=")
		k = strings.TrimSpace(k)
		if k == "" {
			return nil, OptionErrorf("empty option name in %q", s)
		}
		if !ok {
			v = "on"
		}
		out = append(out, KV{k, v})
	}
	return out, nil
}

// ParseOptions validates kvs against the declared options and returns typed
// values with defaults filled in. An unknown key or a bad value is an
// ErrInvalidOption naming the valid keys.
func ParseOptions(format string, spec []Option, kvs []KV) (Values, error) {
	byName := map[string]*Option{}
	for i := range spec {
		byName[spec[i].Name] = &spec[i]
	}
	vals := Values{}
	for i := range spec {
		o := &spec[i]
		if o.Default == "" {
			continue
		}
		v, err := o.Parse(o.Default)
		if err != nil {
			panic(fmt.Sprintf("driver: format %s option %s: bad default: %v", format, o.Name, err))
		}
		vals[o.Name] = v
	}
	for _, kv := range kvs {
		o := byName[kv.Key]
		if o == nil {
			return nil, OptionErrorf("format %s has no option %q; valid options: %s", format, kv.Key, optionNames(spec))
		}
		v, err := o.Parse(kv.Value)
		if err != nil {
			return nil, OptionErrorf("format %s option %s: %v", format, kv.Key, err)
		}
		vals[o.Name] = v
	}
	return vals, nil
}

func optionNames(spec []Option) string {
	if len(spec) == 0 {
		return "(none)"
	}
	names := make([]string, len(spec))
	for i, o := range spec {
		names[i] = o.Name
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}

// Parse converts s to the option's type and checks its range.
func (o *Option) Parse(s string) (any, error) {
	switch o.Type {
	case TypeString:
		return s, nil
	case TypeBool:
		b, err := ParseBool(s)
		if err != nil {
			return nil, err
		}
		return b, nil
	case TypeEnum:
		for _, v := range o.Values {
			if strings.EqualFold(v, s) {
				return v, nil
			}
		}
		return nil, fmt.Errorf("invalid value %q (valid: %s)", s, strings.Join(o.Values, ", "))
	case TypeInt, TypeSize:
		var n int64
		var err error
		if o.Type == TypeSize {
			n, err = ParseSize(s)
		} else {
			n, err = strconv.ParseInt(strings.TrimSpace(s), 0, 64)
		}
		if err != nil {
			return nil, fmt.Errorf("invalid %s %q", o.Type, s)
		}
		if o.Max > o.Min && (n < o.Min || n > o.Max) {
			return nil, fmt.Errorf("value %d out of range [%d, %d]", n, o.Min, o.Max)
		}
		if o.PowerOf2 && (n <= 0 || n&(n-1) != 0) {
			return nil, fmt.Errorf("value %d is not a power of two", n)
		}
		return n, nil
	}
	return nil, fmt.Errorf("unknown option type")
}

// ParseBool accepts qemu's on/off as well as true/false, yes/no, 1/0.
func ParseBool(s string) (bool, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "on", "true", "yes", "1":
		return true, nil
	case "off", "false", "no", "0":
		return false, nil
	}
	return false, fmt.Errorf("invalid boolean %q (use on or off)", s)
}

// ParseSize parses a size with an optional suffix: B, K, M, G, T, P, E
// (powers of 1024, case-insensitive, optional trailing "iB"/"B"), and
// fractional values such as 1.5G as qemu-img accepts them.
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	if t == "" {
		return 0, fmt.Errorf("empty size")
	}
	i := 0
	for i < len(t) && (t[i] >= '0' && t[i] <= '9' || t[i] == '.') {
		i++
	}
	num, suf := t[:i], strings.ToLower(strings.TrimSpace(t[i:]))
	if num == "" {
		return 0, fmt.Errorf("invalid size %q", s)
	}
	suf = strings.TrimSuffix(strings.TrimSuffix(suf, "ib"), "b")
	shift := 0
	switch suf {
	case "":
	case "k":
		shift = 10
	case "m":
		shift = 20
	case "g":
		shift = 30
	case "t":
		shift = 40
	case "p":
		shift = 50
	case "e":
		shift = 60
	default:
		return 0, fmt.Errorf("invalid size suffix in %q (use K, M, G, T, P or E)", s)
	}
	if strings.Contains(num, ".") {
		f, err := strconv.ParseFloat(num, 64)
		if err != nil {
			return 0, fmt.Errorf("invalid size %q", s)
		}
		v := f * math.Ldexp(1, shift)
		if v >= math.MaxInt64 || v < 0 {
			return 0, fmt.Errorf("size %q too large", s)
		}
		return int64(v), nil
	}
	n, err := strconv.ParseUint(num, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("invalid size %q", s)
	}
	if shift > 0 && n > (math.MaxInt64>>shift) || n > math.MaxInt64 {
		return 0, fmt.Errorf("size %q too large", s)
	}
	return int64(n << shift), nil
}

// FormatSize prints n the way qemu-img does: three significant digits in
// the largest binary unit that keeps the number under 1000 ("0.977 GiB",
// "192 KiB", "11.8 MiB").
func FormatSize(n int64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	if n <= 0 {
		return fmt.Sprintf("%d B", n)
	}
	_, exp := math.Frexp(float64(n) / (1000.0 / 1024.0))
	i := (exp - 1) / 10
	if i >= len(units) {
		i = len(units) - 1
	}
	return fmt.Sprintf("%0.3g %s", float64(n)/math.Ldexp(1, 10*i), units[i])
}
