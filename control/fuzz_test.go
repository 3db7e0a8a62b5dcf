package control

import (
	"bytes"
	"encoding/json"
	"testing"
)

// FuzzDispatch feeds request lines to the control protocol's parser and
// dispatcher. The export is read-only, so no request can write or create
// anything; every answer must be one JSON object on one line, with either
// a return value or an error.
func FuzzDispatch(f *testing.F) {
	for _, s := range []string{
		`{"execute": "query-exports"}`,
		`{"execute": "query-jobs", "id": 7}`,
		`{"execute": "commit", "arguments": {"export": "", "base": 1, "keep": true}, "id": "a"}`,
		`{"execute": "stream", "arguments": {"export": "", "base": 0}}`,
		`{"execute": "snapshot", "arguments": {"export": "", "file": "../x.qcow2", "format": "qcow2"}}`,
		`{"execute": "cancel", "arguments": {"job-id": "job-1"}}`,
		`{"execute": "flush", "arguments": {}}`,
		`{"execute": "nope"}`,
		`{"execute": "commit", "arguments": {"base": "x"}, "extra": 1}`,
		`[1, 2]`,
		`null`,
	} {
		f.Add([]byte(s))
	}
	d, _, _ := chain(f)
	s, err := NewServer([]Export{{Name: "", Disk: d, ReadOnly: true}}, nil)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { s.Close() })
	f.Fuzz(func(t *testing.T, line []byte) {
		r := s.dispatch(line)
		b, err := json.Marshal(r)
		if err != nil {
			t.Fatalf("answer does not marshal: %v", err)
		}
		if bytes.ContainsAny(b, "\n\r") {
			t.Fatalf("answer spans lines: %s", b)
		}
		if (r.Error == nil) == (r.Return == nil) {
			t.Fatalf("answer has neither or both of return and error: %s", b)
		}
	})
}
