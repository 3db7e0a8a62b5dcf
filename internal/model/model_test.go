package model

import (
	"bytes"
	"testing"
)

func TestModelUnknownRanges(t *testing.T) {
	m := New(100)
	m.Write(bytes.Repeat([]byte{1}, 50), 10)
	m.Discard(20, 10)
	p := make([]byte, 100)
	copy(p[10:60], bytes.Repeat([]byte{1}, 50))
	for i := 20; i < 30; i++ {
		p[i] = 9 // discarded bytes may read as anything
	}
	if bad := m.Check(p, 0); bad != -1 {
		t.Fatalf("discarded bytes flagged at %d", bad)
	}
	p[30] = 9
	if bad := m.Check(p, 0); bad != 30 {
		t.Fatalf("mismatch at 30 reported as %d", bad)
	}
	p[30] = 1
	m.Learn(p, 0)
	p[25] = 8 // a second read must match the first
	if bad := m.Check(p, 0); bad != 25 {
		t.Fatalf("unstable discarded byte reported as %d", bad)
	}
	m.Discard(0, 100)
	m.Zero(40, 10)
	q := make([]byte, 100)
	for i := range q {
		q[i] = 7
	}
	if bad := m.Check(q, 0); bad != 40 {
		t.Fatalf("zeroed range after discard: got %d, want 40", bad)
	}
}
