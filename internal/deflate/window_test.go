package deflate

// maxDistance parses a raw deflate stream and returns the largest distance
// it uses (0 if none, -1 on a malformed stream).
func maxDistance(b []byte) int {
	r := &bitReader{b: b}
	maxd := 0
	for {
		final := r.get(1)
		typ := r.get(2)
		switch typ {
		case 0:
			r.align()
			n := r.get(16)
			r.get(16)
			r.skipBytes(n)
		case 1, 2:
			var lit, dist *decoder
			if typ == 1 {
				lit, dist = newDecoder(fixedLit[:]), newDecoder(fixedDst[:])
			} else {
				hlit, hdist, hclen := r.get(5)+257, r.get(5)+1, r.get(4)+4
				var cl [19]uint8
				for i := 0; i < hclen; i++ {
					cl[clOrder[i]] = uint8(r.get(3))
				}
				cd := newDecoder(cl[:])
				ls := make([]uint8, 0, hlit+hdist)
				for len(ls) < hlit+hdist {
					s := cd.decode(r)
					switch {
					case s < 16:
						ls = append(ls, uint8(s))
					case s == 16:
						for n := r.get(2) + 3; n > 0; n-- {
							ls = append(ls, ls[len(ls)-1])
						}
					case s == 17:
						for n := r.get(3) + 3; n > 0; n-- {
							ls = append(ls, 0)
						}
					case s == 18:
						for n := r.get(7) + 11; n > 0; n-- {
							ls = append(ls, 0)
						}
					default:
						return -1
					}
				}
				lit, dist = newDecoder(ls[:hlit]), newDecoder(ls[hlit:])
			}
			for {
				s := lit.decode(r)
				if s < 0 || r.bad {
					return -1
				}
				if s < 256 {
					continue
				}
				if s == 256 {
					break
				}
				if x := lenExtra[s-257]; x > 0 {
					r.get(int(x))
				}
				dc := dist.decode(r)
				if dc < 0 || dc >= 30 {
					return -1
				}
				d := int(distBase[dc]) + 1
				if x := dstExtra[dc]; x > 0 {
					d += r.get(int(x))
				}
				maxd = max(maxd, d)
			}
		default:
			return -1
		}
		if final == 1 || r.bad {
			return maxd
		}
	}
}

type bitReader struct {
	b   []byte
	pos int // bit position
	bad bool
}

func (r *bitReader) get(n int) int {
	v := 0
	for i := 0; i < n; i++ {
		if r.pos/8 >= len(r.b) {
			r.bad = true
			return 0
		}
		v |= int(r.b[r.pos/8]>>(r.pos%8)&1) << i
		r.pos++
	}
	return v
}

func (r *bitReader) align()          { r.pos = (r.pos + 7) &^ 7 }
func (r *bitReader) skipBytes(n int) { r.pos += 8 * n }

type decoder struct {
	codes map[[2]int]int // (length, code) -> symbol
}

func newDecoder(lengths []uint8) *decoder {
	d := &decoder{codes: map[[2]int]int{}}
	codes := make([]uint16, len(lengths))
	canonical(lengths, codes)
	for s, l := range lengths {
		if l > 0 {
			d.codes[[2]int{int(l), int(codes[s])}] = s
		}
	}
	return d
}

func (d *decoder) decode(r *bitReader) int {
	code := 0
	for l := 1; l <= 15; l++ {
		code |= r.get(1) << (l - 1)
		if s, ok := d.codes[[2]int{l, code}]; ok {
			return s
		}
	}
	return -1
}
