package nbdstore

import (
	"reflect"
	"testing"

	"github.com/vdisk/vdisk/nbd"
)

func TestMergeExtents(t *testing.T) {
	const z, h = nbd.StateZero, nbd.StateHole
	ext := func(l ...uint32) []nbd.BlockExtent {
		var out []nbd.BlockExtent
		for i := 0; i < len(l); i += 2 {
			out = append(out, nbd.BlockExtent{Length: l[i], Flags: l[i+1]})
		}
		return out
	}
	tests := []struct {
		name      string
		lo, size  int64
		ext, dep  []nbd.BlockExtent
		want      []run
		wantError bool
	}{
		{"no depth", 0, 100, ext(10, 0, 20, z|h, 70, 0), nil,
			[]run{{0, 10, false, false}, {10, 30, true, false}, {30, 100, false, false}}, false},
		{"depth splits a zero run", 0, 100, ext(10, 0, 90, z|h), ext(20, 1, 30, 0, 50, 2),
			[]run{{0, 10, false, false}, {10, 20, true, false}, {20, 50, true, true}, {50, 100, true, false}}, false},
		{"data at depth 0 stays data", 0, 40, ext(40, 0), ext(40, 0),
			[]run{{0, 40, false, false}}, false},
		{"zero without hole flag at depth 0", 0, 40, ext(20, z, 20, z|h), ext(40, 0),
			[]run{{0, 40, true, true}}, false},
		{"depth ends early", 100, 200, ext(100, z|h), ext(30, 0),
			[]run{{100, 130, true, true}}, false},
		{"extent past the end", 0, 50, ext(80, z|h), ext(80, 0),
			[]run{{0, 50, true, true}}, false},
		{"offset start", 4096, 1 << 20, ext(4096, 0, 8192, z|h), ext(6144, 1, 6144, 0),
			[]run{{4096, 8192, false, false}, {8192, 10240, true, false}, {10240, 16384, true, true}}, false},
		{"empty extent", 0, 100, ext(0, 0), nil, nil, true},
		{"empty depth extent", 0, 100, ext(100, z), ext(50, 0, 0, 1, 50, 1), nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := mergeExtents("nbd://x/", tt.lo, tt.size, tt.ext, tt.dep)
			if (err != nil) != tt.wantError {
				t.Fatalf("err = %v", err)
			}
			if err == nil && !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("got %v\nwant %v", got, tt.want)
			}
		})
	}
}
