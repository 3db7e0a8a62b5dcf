package deflate

import (
	"bytes"
	"compress/flate"
	"compress/zlib"
	"io"
	"math/rand/v2"
	"testing"
)

func roundTrip(t testing.TB, e *Encoder, src []byte) []byte {
	t.Helper()
	out := e.Compress(nil, src)
	got, err := io.ReadAll(flate.NewReader(bytes.NewReader(out)))
	if err != nil {
		t.Fatalf("inflate: %v (len %d)", err, len(src))
	}
	if !bytes.Equal(got, src) {
		t.Fatalf("round trip differs (len %d)", len(src))
	}
	checkWindow(t, out, e.Window)
	// The zlib stream: header, the same deflate stream, Adler-32.
	z := e.CompressZlib([]byte("prefix"), src)
	if !bytes.HasPrefix(z, []byte("prefix")) || !bytes.Equal(z[len("prefix")+2:len(z)-4], out) {
		t.Fatalf("zlib stream does not wrap the deflate stream (len %d)", len(src))
	}
	zr, err := zlib.NewReader(bytes.NewReader(z[len("prefix"):]))
	if err != nil {
		t.Fatalf("zlib header (window %d): %v", e.Window, err)
	}
	if got, err = io.ReadAll(zr); err != nil || !bytes.Equal(got, src) {
		t.Fatalf("zlib round trip (len %d): %v", len(src), err)
	}
	return out
}

// checkWindow decodes the stream's distances and fails when one exceeds
// the window (a minimal inflater that tracks only distances).
func checkWindow(t testing.TB, out []byte, window int) {
	t.Helper()
	if window == 0 {
		window = MaxWindow
	}
	if d := maxDistance(out); d > window {
		t.Fatalf("distance %d exceeds the %d-byte window", d, window)
	}
}

// windows are the windows every test runs with: qcow2's and deflate's.
var windows = []int{4096, 0}

func TestRoundTrip(t *testing.T) {
	var e Encoder
	rng := rand.New(rand.NewPCG(1, 2))
	cases := [][]byte{nil, {0}, {1, 2}, bytes.Repeat([]byte{7}, 100000), []byte("abcabcabcabcabcabcabcabcabcab")}
	for n := 0; n < 120; n++ {
		size := rng.IntN(1 << uint(rng.IntN(19)+1))
		b := make([]byte, size)
		switch rng.IntN(4) {
		case 0:
			for i := range b {
				b[i] = byte(rng.IntN(256))
			}
		case 1:
			for i := range b {
				b[i] = byte(rng.IntN(4))
			}
		case 2:
			for i := range b {
				b[i] = "the quick brown fox jumps over the lazy dog "[i%44]
				if rng.IntN(50) == 0 {
					b[i] = byte(rng.IntN(256))
				}
			}
		case 3:
			// repeats at distances around a window size
			d := []int{4096, MaxWindow}[rng.IntN(2)]
			for i := range b {
				if i >= d+rng.IntN(3) && rng.IntN(10) != 0 {
					b[i] = b[i-d]
				} else {
					b[i] = byte(rng.IntN(256))
				}
			}
		}
		cases = append(cases, b)
	}
	for _, w := range windows {
		e.Window = w
		for _, c := range cases {
			roundTrip(t, &e, c)
		}
	}
}

// TestReuse checks that an Encoder reused across inputs of different
// sizes never refers to the data of an earlier call.
func TestReuse(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	text := make([]byte, 70000)
	for i := range text {
		const line = "log line 000123 of a disk image, compressible\n"
		text[i] = line[i%len(line)]
		if rng.IntN(30) == 0 {
			text[i] = byte('0' + rng.IntN(10))
		}
	}
	var e Encoder
	// The same bytes at nearly the same positions: a stale table entry
	// would point at a plausible but wrong earlier position.
	for i := range 6 {
		e.Window = windows[i%len(windows)]
		roundTrip(t, &e, text[:65536-i*7])
		roundTrip(t, &e, text[i*13:])
		roundTrip(t, &e, text[:4099+i])
	}
}

func FuzzRoundTrip(f *testing.F) {
	f.Add([]byte("hello hello hello"))
	f.Add([]byte("abcdabcdabcdabcdXabcdabcd"))
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, w := range windows {
			e := Encoder{Window: w}
			roundTrip(t, &e, b)
			// Reused: the second call must not see the first call's positions.
			roundTrip(t, &e, b[len(b)/3:])
			roundTrip(t, &e, b)
		}
	})
}
