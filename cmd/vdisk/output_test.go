package main

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"testing"
)

// TestQemuJSONOrder checks the QDict ordering against a qcow2 backing-chain
// entry printed by qemu-img 7.2 (info --output json --backing-chain).
func TestQemuJSONOrder(t *testing.T) {
	type qcow2Specific struct {
		Compat          string `json:"compat"`
		LazyRefcounts   bool   `json:"lazy-refcounts"`
		RefcountBits    int    `json:"refcount-bits"`
		Corrupt         bool   `json:"corrupt"`
		ExtendedL2      bool   `json:"extended-l2"`
		CompressionType string `json:"compression-type"`
	}
	n := jobj()
	n.set("filename", jstr("top.qcow2"))
	n.set("format", jstr("qcow2"))
	n.set("dirty-flag", jbool(false))
	n.set("actual-size", jint(200704))
	n.set("virtual-size", jint(1073741824))
	n.set("cluster-size", jint(65536))
	n.set("backing-filename", jstr("base.qcow2"))
	n.set("full-backing-filename", jstr("base.qcow2"))
	n.set("backing-filename-format", jstr("qcow2"))
	data, err := toJNode(qcow2Specific{"1.1", false, 16, false, false, "zlib"})
	if err != nil {
		t.Fatal(err)
	}
	fs := jobj()
	fs.set("type", jstr("qcow2"))
	fs.set("data", data)
	n.set("format-specific", fs)
	var b strings.Builder
	writeQJSON(&b, n, 0)
	want := `{
    "backing-filename-format": "qcow2",
    "virtual-size": 1073741824,
    "filename": "top.qcow2",
    "cluster-size": 65536,
    "format": "qcow2",
    "actual-size": 200704,
    "format-specific": {
        "type": "qcow2",
        "data": {
            "compat": "1.1",
            "compression-type": "zlib",
            "lazy-refcounts": false,
            "refcount-bits": 16,
            "corrupt": false,
            "extended-l2": false
        }
    },
    "full-backing-filename": "base.qcow2",
    "backing-filename": "base.qcow2",
    "dirty-flag": false
}`
	if b.String() != want {
		t.Errorf("got:\n%s\nwant:\n%s", b.String(), want)
	}

	var h bytes.Buffer
	dumpHumanInfo(&h, n)
	wantHuman := `image: top.qcow2
file format: qcow2
virtual size: 1 GiB (1073741824 bytes)
disk size: 196 KiB
cluster_size: 65536
backing file: base.qcow2
backing file format: qcow2
Format specific information:
    compat: 1.1
    compression type: zlib
    lazy refcounts: false
    refcount bits: 16
    corrupt: false
    extended l2: false
`
	if h.String() != wantHuman {
		t.Errorf("human got:\n%s\nwant:\n%s", h.String(), wantHuman)
	}
}

// TestQemuJSONSnapshotOrder: a snapshot entry as qemu-img 7.2 prints it.
func TestQemuJSONSnapshotOrder(t *testing.T) {
	o := jobj()
	for _, k := range []string{"id", "name", "vm-state-size", "date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec", "icount"} {
		o.set(k, jint(0))
	}
	var keys []string
	for _, i := range qdictOrder(o.keys) {
		keys = append(keys, o.keys[i])
	}
	want := "icount vm-clock-nsec name date-sec date-nsec vm-clock-sec id vm-state-size"
	if got := strings.Join(keys, " "); got != want {
		t.Errorf("got %s, want %s", got, want)
	}
	info := jobj()
	for _, k := range []string{"filename", "format", "dirty-flag", "actual-size", "virtual-size", "cluster-size", "snapshots", "format-specific"} {
		info.set(k, jint(0))
	}
	if first := info.keys[qdictOrder(info.keys)[0]]; first != "snapshots" {
		t.Errorf("first key %s, want snapshots", first)
	}
}

func TestQemuJSONValues(t *testing.T) {
	v := map[string]any{
		"s":      "a\"b\\c\n\té😀/",
		"f":      0.1,
		"i":      -3,
		"nested": map[string]any{},
		"list":   []any{},
		"null":   nil,
	}
	n, err := toJNode(v)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	writeQJSON(&b, n.get("s"), 0)
	if got, want := b.String(), `"a\"b\\c\n\t\u00E9\uD83D\uDE00/"`; got != want {
		t.Errorf("string: got %s, want %s", got, want)
	}
	b.Reset()
	writeQJSON(&b, n.get("f"), 0)
	if got, want := b.String(), "0.10000000000000001"; got != want {
		t.Errorf("double: got %s, want %s", got, want)
	}
	b.Reset()
	writeQJSON(&b, n.get("nested"), 1)
	if got, want := b.String(), "{\n    }"; got != want {
		t.Errorf("empty dict: got %q, want %q", got, want)
	}
	var h bytes.Buffer
	nested, _ := toJNode(map[string]any{"a-b": map[string]any{"c": 1}, "l": []any{"x", map[string]any{"y": true}}})
	dumpQObject(&h, 1, nested)
	wantHuman := "    a b:\n        c: 1\n    l:\n        [0]: x\n        [1]:\n            y: true\n"
	if h.String() != wantHuman {
		t.Errorf("human dump: got %q, want %q", h.String(), wantHuman)
	}
}

func TestLineHandler(t *testing.T) {
	var b bytes.Buffer
	log := slog.New(newLineHandler(&b, "vdisk convert", slog.LevelWarn))
	log.Debug("hidden")
	log.Info("hidden too")
	log.With("image", "a b.raw").WithGroup("g").Warn("parent\nchanged", "uuid", "1234", "err", errors.New("x=y"), slog.Group("sub", "n", 3))
	log.Error("boom", "empty", "")
	want := `vdisk convert: warning: parent; changed image="a b.raw" g.uuid=1234 g.err="x=y" g.sub.n=3
vdisk convert: error: boom empty=""
`
	if b.String() != want {
		t.Errorf("got:\n%s\nwant:\n%s", b.String(), want)
	}
	b.Reset()
	dbg := slog.New(newLineHandler(&b, "vdisk info", slog.LevelDebug))
	dbg.Debug("detail", "k", 1)
	if got := b.String(); got != "vdisk info: debug: detail k=1\n" {
		t.Errorf("debug line %q", got)
	}
}

func TestDebugFlag(t *testing.T) {
	// --debug is accepted everywhere and changes nothing on success.
	r := mustRun(t, "--debug", "formats")
	if r.stdout == "" {
		t.Error("no output")
	}
}
