package dmg

// CRC-32 arithmetic over GF(2) for zlib's (reflected) polynomial: the
// checksum of a partition covers its zero-fill chunks too, and a sparse
// terabyte must not be fed through the CRC byte by byte. Appending n
// bytes to a message multiplies its CRC register by x^(8n) modulo the
// polynomial, so the CRC of A||B follows from the CRCs of A and B and
// the length of B.

const crcPoly = 0xedb88320 // reflected IEEE polynomial

// mulModP multiplies a and b modulo the polynomial (bit 31 is x^0).
func mulModP(a, b uint32) uint32 {
	var p uint32
	for m := uint32(1) << 31; m != 0; m >>= 1 {
		if a&m != 0 {
			p ^= b
		}
		if b&1 != 0 {
			b = b>>1 ^ crcPoly
		} else {
			b >>= 1
		}
	}
	return p
}

// x2n[k] is x^(2^k) modulo the polynomial.
var x2n = func() (t [67]uint32) {
	p := uint32(1) << 30 // x^1
	for k := range t {
		t[k] = p
		p = mulModP(p, p)
	}
	return
}()

// xPow8n returns x^(8n) modulo the polynomial.
func xPow8n(n int64) uint32 {
	p := uint32(1) << 31 // x^0
	for k := 3; n != 0; k, n = k+1, n>>1 {
		if n&1 != 0 {
			p = mulModP(x2n[k], p)
		}
	}
	return p
}

// crcCombine returns the CRC-32 of A||B from crcA, crcB and len(B).
func crcCombine(crcA, crcB uint32, lenB int64) uint32 {
	return mulModP(xPow8n(lenB), crcA) ^ crcB
}

// crcZeros returns the CRC-32 of A followed by n zero bytes, from crcA.
func crcZeros(crcA uint32, n int64) uint32 {
	return ^mulModP(xPow8n(n), ^crcA)
}
