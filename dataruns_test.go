package vdisk

import (
	"testing"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/memfs"
)

// uncomparableFile is a File of a storage from outside that Go cannot
// compare (a struct value holding a slice).
type uncomparableFile struct {
	driver.File
	tags []string
}

// TestDataRuns: a run learnt serves the offsets inside it, runs that meet
// join, and a File that cannot be a map key is not remembered (no panic).
func TestDataRuns(t *testing.T) {
	st := memfs.New()
	f, err := st.Open("/a", driver.ReadWrite|driver.Create)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var d dataRuns
	if _, ok := d.dataAt(f, 0); ok {
		t.Fatal("a run before any was learnt")
	}
	d.learn(f, 4096, 8192)
	for _, c := range []struct {
		off, end int64
		ok       bool
	}{{4095, 0, false}, {4096, 8192, true}, {8191, 8192, true}, {8192, 0, false}} {
		if end, ok := d.dataAt(f, c.off); ok != c.ok || end != c.end {
			t.Fatalf("dataAt(%d) = %d, %v; want %d, %v", c.off, end, ok, c.end, c.ok)
		}
	}
	d.learn(f, 0, 4096) // meets the run: joined
	if end, ok := d.dataAt(f, 0); !ok || end != 8192 {
		t.Fatalf("after a joining run, dataAt(0) = %d, %v; want 8192", end, ok)
	}
	d.learn(f, 1<<20, 2<<20) // apart: replaces
	if _, ok := d.dataAt(f, 0); ok {
		t.Fatal("a run apart from the known one should replace it")
	}
	u := uncomparableFile{File: f, tags: []string{"x"}}
	d.learn(u, 0, 1<<20)
	if _, ok := d.dataAt(u, 0); ok {
		t.Fatal("an uncomparable File was remembered")
	}
}
