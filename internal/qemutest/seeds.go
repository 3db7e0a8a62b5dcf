package qemutest

import (
	"flag"
	"os"
	"path/filepath"
	"testing"
)

// Seed describes one small image for a fuzz corpus, made by qemu-img:
// `qemu-img create -f FORMAT [-o Opts] file Size` (with a backing file of the
// same format first when Backing is set) and then the qemu-io commands IO
// on it.
type Seed struct {
	Name    string
	Size    string
	Opts    []string
	IO      []string
	Backing bool // create a base image first and make this one its overlay
	// Convert makes the seed with `qemu-img convert -O FORMAT -o Opts` from
	// a raw image written by IO instead (formats qemu creates only by
	// conversion, or compressed images with Opts "-c").
	Convert bool
	Flags   []string // extra qemu-img convert flags (e.g. "-c")
}

// Seeds makes every seed with the real qemu tools and returns their bytes
// by name, so that fuzz targets start from images an independent
// implementation wrote. The tools must be installed (./test.sh does it).
func Seeds(t testing.TB, format string, seeds ...Seed) map[string][]byte {
	t.Helper()
	Require(t)
	dir, err := os.MkdirTemp("", "vdisk-seeds-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	out := map[string][]byte{}
	for _, s := range seeds {
		file := filepath.Join(dir, s.Name+"."+format)
		switch {
		case s.Convert:
			raw := filepath.Join(dir, s.Name+".raw")
			Create(t, "raw", raw, s.Size)
			if len(s.IO) > 0 {
				IO(t, "raw", raw, s.IO...)
			}
			args := append([]string{"convert", "-q", "-f", "raw", "-O", format}, s.Flags...)
			for _, o := range s.Opts {
				args = append(args, "-o", o)
			}
			Img(t, append(args, raw, file)...)
		case s.Backing:
			base := filepath.Join(dir, s.Name+"-base."+format)
			Create(t, format, base, s.Size)
			IO(t, format, base, "write -P 0x5b 0 4k")
			args := []string{"create", "-q", "-f", format, "-b", filepath.Base(base), "-F", format}
			for _, o := range s.Opts {
				args = append(args, "-o", o)
			}
			Img(t, append(args, file)...)
			if len(s.IO) > 0 {
				IO(t, format, file, s.IO...)
			}
		default:
			Create(t, format, file, s.Size, s.Opts...)
			if len(s.IO) > 0 {
				IO(t, format, file, s.IO...)
			}
		}
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		out[s.Name] = b
	}
	return out
}

// CorpusEntry is the content of a file of a Go fuzz corpus (testdata/fuzz/
// FuzzX/NAME) holding the one []byte argument b.
func CorpusEntry(b []byte) string {
	const hex = "0123456789abcdef"
	out := make([]byte, 0, len(b)*4+32)
	out = append(out, "go test fuzz v1\n[]byte(\""...)
	for _, c := range b {
		switch {
		case c == '"' || c == '\\':
			out = append(out, '\\', c)
		case c >= 0x20 && c < 0x7f:
			out = append(out, c)
		default:
			out = append(out, '\\', 'x', hex[c>>4], hex[c&15])
		}
	}
	return string(append(out, "\")\n"...))
}

// FuzzWorker reports whether this process is one of the fuzzer's workers
// (go test -fuzz starts them with -test.fuzzworker). A worker fuzzes the
// inputs the coordinator sends it, so the seeds its target adds are not
// used there: a target can skip making them (slow qemu-img or cryptsetup
// runs, and temporary files the fuzzer may kill the worker in the middle
// of, when the fuzz time is short).
func FuzzWorker() bool {
	fl := flag.Lookup("test.fuzzworker")
	return fl != nil && fl.Value.String() == "true"
}
