package dmg

import "fmt"

// adcDecode expands an ADC (Apple Data Compression) stream, which must
// produce exactly want bytes (the buffer grows with the output, so a chunk
// that only claims many sectors costs nothing). Each code starts with a byte b:
//
//	b&0x80 != 0: (b&0x7f)+1 literal bytes follow;
//	b&0x40 != 0: copy (b&0x3f)+4 bytes from distance d+1, d the next
//	             two bytes (big-endian);
//	otherwise:   copy ((b>>2)&0x0f)+3 bytes from distance d+1, d =
//	             (b&3)<<8 | the next byte.
//
// Copies may overlap their own output (runs). A copy reaching before the
// start, output past want or input that ends inside a code is an
// error: hostile chunks must not read or write out of bounds.
func adcDecode(in []byte, want int) ([]byte, error) {
	out := make([]byte, 0, min(want, eagerLimit))
	for i := 0; i < len(in); {
		b := in[i]
		var n, d int
		switch {
		case b&0x80 != 0:
			n = int(b&0x7f) + 1
			if i+1+n > len(in) {
				return nil, fmt.Errorf("ADC literal of %d bytes at input byte %d runs past the end of the chunk", n, i)
			}
			if len(out)+n > want {
				return nil, fmt.Errorf("ADC data decompresses to more than the chunk's %d bytes", want)
			}
			out = append(out, in[i+1:i+1+n]...)
			i += 1 + n
			continue
		case b&0x40 != 0:
			if i+3 > len(in) {
				return nil, fmt.Errorf("ADC code at input byte %d is cut short", i)
			}
			n = int(b&0x3f) + 4
			d = int(in[i+1])<<8 | int(in[i+2])
			i += 3
		default:
			if i+2 > len(in) {
				return nil, fmt.Errorf("ADC code at input byte %d is cut short", i)
			}
			n = int(b>>2&0x0f) + 3
			d = int(b&3)<<8 | int(in[i+1])
			i += 2
		}
		src := len(out) - d - 1
		if src < 0 {
			return nil, fmt.Errorf("ADC back-reference of distance %d at output byte %d reaches before the start", d+1, len(out))
		}
		if len(out)+n > want {
			return nil, fmt.Errorf("ADC data decompresses to more than the chunk's %d bytes", want)
		}
		// Byte by byte: a copy may overlap the bytes it produces (runs).
		for k := 0; k < n; k++ {
			out = append(out, out[src+k])
		}
	}
	if len(out) != want {
		return nil, fmt.Errorf("ADC data decompresses to %d bytes, the chunk claims %d", len(out), want)
	}
	return out, nil
}
