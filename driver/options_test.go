package driver

import (
	"errors"
	"strings"
	"testing"
)

func TestParseSize(t *testing.T) {
	cases := []struct {
		in   string
		want int64
		ok   bool
	}{
		{"512", 512, true}, {"1K", 1024, true}, {"1k", 1024, true}, {"1M", 1 << 20, true},
		{"1G", 1 << 30, true}, {"2T", 2 << 40, true}, {"1P", 1 << 50, true}, {"1E", 1 << 60, true},
		{"1.5M", 3 << 19, true}, {"64KiB", 64 << 10, true}, {"10B", 10, true}, {" 4G ", 4 << 30, true},
		{"", 0, false}, {"abc", 0, false}, {"1X", 0, false}, {"-1", 0, false}, {"16E", 0, false},
		{"99999999999999999999", 0, false},
	}
	for _, c := range cases {
		got, err := ParseSize(c.in)
		if (err == nil) != c.ok || (c.ok && got != c.want) {
			t.Errorf("ParseSize(%q) = %d, %v; want %d ok=%v", c.in, got, err, c.want, c.ok)
		}
	}
}

func TestFormatSize(t *testing.T) {
	cases := map[int64]string{0: "0 B", 512: "512 B", 1024: "1 KiB", 1536: "1.5 KiB", 1 << 30: "1 GiB",
		10 << 20: "10 MiB", 1073741824 * 100: "100 GiB", 197120: "192 KiB",
		1048576000: "0.977 GiB", 1047552: "0.999 MiB", 1342177280: "1.25 GiB", 12345856: "11.8 MiB"}
	for in, want := range cases {
		if got := FormatSize(in); got != want {
			t.Errorf("FormatSize(%d) = %q, want %q", in, got, want)
		}
	}
}

func TestSplitOptions(t *testing.T) {
	kvs, err := SplitOptions("a=1,b=x,,y,c,d=")
	if err != nil {
		t.Fatal(err)
	}
	want := []KV{{"a", "1"}, {"b", "x,y"}, {"c", "on"}, {"d", ""}}
	if len(kvs) != len(want) {
		t.Fatalf("got %v", kvs)
	}
	for i := range want {
		if kvs[i] != want[i] {
			t.Errorf("kv %d = %v, want %v", i, kvs[i], want[i])
		}
	}
	if _, err := SplitOptions("=1"); !errors.Is(err, ErrInvalidOption) {
		t.Errorf("empty key: %v", err)
	}
}

func TestParseOptions(t *testing.T) {
	spec := []Option{
		{Name: "preallocation", Type: TypeEnum, Default: "off", Values: []string{"off", "full"}},
		{Name: "cluster_size", Type: TypeSize, Default: "64K", Min: 512, Max: 2 << 20, PowerOf2: true},
		{Name: "lazy", Type: TypeBool},
		{Name: "comment", Type: TypeString},
	}
	v, err := ParseOptions("fmt", spec, []KV{{"cluster_size", "1M"}, {"lazy", "on"}, {"comment", "hi"}})
	if err != nil {
		t.Fatal(err)
	}
	if v.Int("cluster_size") != 1<<20 || !v.Bool("lazy") || v.String("comment") != "hi" || v.String("preallocation") != "off" {
		t.Fatalf("values %v", v)
	}
	bad := []struct {
		kv   KV
		want string
	}{
		{KV{"nosuch", "1"}, "valid options: cluster_size, comment, lazy, preallocation"},
		{KV{"cluster_size", "3K"}, "not a power of two"},
		{KV{"cluster_size", "4M"}, "out of range"},
		{KV{"cluster_size", "big"}, "invalid size"},
		{KV{"lazy", "maybe"}, "invalid boolean"},
		{KV{"preallocation", "half"}, "valid: off, full"},
	}
	for _, b := range bad {
		_, err := ParseOptions("fmt", spec, []KV{b.kv})
		if !errors.Is(err, ErrInvalidOption) || !strings.Contains(err.Error(), b.want) {
			t.Errorf("%v: err = %v, want ErrInvalidOption containing %q", b.kv, err, b.want)
		}
	}
}

func TestIsZero(t *testing.T) {
	for n := 0; n < 100; n++ {
		b := make([]byte, n)
		if !IsZero(b) {
			t.Fatalf("zero buffer of %d not zero", n)
		}
		for i := 0; i < n; i++ {
			b[i] = 1
			if IsZero(b) {
				t.Fatalf("len %d: byte %d set but IsZero", n, i)
			}
			b[i] = 0
		}
	}
}

func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"1G", "1.5M", "512", "16E", "0x10", "1e9"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseSize(s)
		if err == nil && n < 0 {
			t.Fatalf("ParseSize(%q) = %d", s, n)
		}
	})
}

func FuzzSplitOptions(f *testing.F) {
	for _, s := range []string{"a=1,b=2", "x,,y", ",,,", "k", "=", "a=b=c"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		kvs, err := SplitOptions(s)
		if err != nil {
			return
		}
		for _, kv := range kvs {
			if kv.Key == "" {
				t.Fatalf("empty key from %q", s)
			}
		}
	})
}
