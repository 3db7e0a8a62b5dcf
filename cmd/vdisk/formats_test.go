package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/vdisk/vdisk/driver"
)

func TestFormats(t *testing.T) {
	r := mustRun(t, "formats", "--output", "json")
	var list []json.RawMessage
	if err := json.Unmarshal([]byte(r.stdout), &list); err != nil {
		t.Fatalf("invalid JSON: %v\n%s", err, r.stdout)
	}
	byName := map[string]json.RawMessage{}
	for _, e := range list {
		var f struct{ Name string }
		if err := json.Unmarshal(e, &f); err != nil {
			t.Fatal(err)
		}
		byName[f.Name] = e
	}
	for _, f := range driver.Formats() {
		if _, ok := byName[f.Name]; !ok {
			t.Errorf("format %s missing from formats --output json", f.Name)
		}
	}
	if len(list) != len(driver.Formats()) {
		t.Errorf("%d formats listed, %d registered", len(list), len(driver.Formats()))
	}
	// The golden file pins the entry of raw only, so that registering more
	// formats does not break it.
	var compact, b bytes.Buffer
	if err := json.Compact(&compact, byName["raw"]); err != nil {
		t.Fatal(err)
	}
	if err := json.Indent(&b, compact.Bytes(), "", "    "); err != nil {
		t.Fatal(err)
	}
	golden(t, "formats_raw.golden", b.String()+"\n")

	h := mustRun(t, "formats")
	for _, f := range driver.Formats() {
		if !strings.Contains(h.stdout, "\n"+f.Name+": ") {
			t.Errorf("human output lacks %s:\n%s", f.Name, h.stdout)
		}
	}
	for _, want := range []string{"Capabilities:  create-fixed, create-dynamic", "preallocation=<enum>  default off; values off|falloc|full"} {
		if !strings.Contains(h.stdout, want) {
			t.Errorf("human output lacks %q:\n%s", want, h.stdout)
		}
	}
}
