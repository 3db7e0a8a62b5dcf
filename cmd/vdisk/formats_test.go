package main

import (
	"encoding/json"
	"path/filepath"
	"reflect"
	"slices"
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
	// The raw entry, with the create options qemu-img offers for raw
	// (`qemu-img create -f raw -o help FILE`: the file protocol's).
	var raw struct {
		Name          string
		Extensions    []string
		Capabilities  []string
		Creatable     bool
		CreateOptions []struct {
			Name, Type, Default string
			Values              []string
		} `json:"create-options"`
	}
	if err := json.Unmarshal(byName["raw"], &raw); err != nil {
		t.Fatal(err)
	}
	if raw.Name != "raw" || !raw.Creatable || !slices.Contains(raw.Extensions, "img") || !slices.Contains(raw.Capabilities, "resize") {
		t.Errorf("raw entry: %+v", raw)
	}
	help := mustQemu(t, "qemu-img", "create", "-f", "raw", "-o", "help", filepath.Join(t.TempDir(), "x.raw"))
	for _, o := range raw.CreateOptions {
		if !strings.Contains(help, "  "+o.Name+"=") {
			t.Errorf("raw create option %s is not one of qemu-img's:\n%s", o.Name, help)
		}
	}
	if len(raw.CreateOptions) != 1 || raw.CreateOptions[0].Name != "preallocation" || raw.CreateOptions[0].Default != "off" ||
		!reflect.DeepEqual(raw.CreateOptions[0].Values, []string{"off", "falloc", "full"}) ||
		!strings.Contains(help, "preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)") {
		t.Errorf("raw create options: %+v", raw.CreateOptions)
	}

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
