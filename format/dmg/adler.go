package dmg

import "encoding/binary"

// UDZO chunks are zlib streams (RFC 1950): a two-byte header, raw deflate
// data and the Adler-32 of the uncompressed bytes, big-endian. The writer
// frames klauspost's deflate output itself so that the checksum can be
// computed eight bytes at a time: hash/adler32 adds byte by byte, one long
// dependency chain, and took about as long as level-1 compression.

// adlerMod is Adler-32's modulus; adlerNMax is the largest number of bytes
// that can be summed before s2 may overflow 32 bits (RFC 1950's NMAX), a
// multiple of 8.
const (
	adlerMod  = 65521
	adlerNMax = 5552
)

// adler32Update returns the Adler-32 of the bytes summed into adler
// followed by p (start from 1).
//
// Eight bytes b0..b7 at s1, s2 leave s1 + Σb and s2 + 8·s1 + Σ(8-i)·b_i.
// Both sums come from 16-bit lanes of one 64-bit word: the even bytes and
// the odd bytes, each in four lanes, multiplied by a constant whose lanes
// hold the weights, so that the top lane collects the weighted sum (no
// lane exceeds 4·255·8 < 2¹⁶, so no carry crosses a lane).
func adler32Update(adler uint32, p []byte) uint32 {
	const (
		lanes = 0x00ff00ff00ff00ff
		ones  = 0x0001000100010001
		wEven = 0x0008000600040002 // b0·8 + b2·6 + b4·4 + b6·2
		wOdd  = 0x0007000500030001 // b1·7 + b3·5 + b5·3 + b7·1
	)
	s1, s2 := uint64(adler&0xffff), uint64(adler>>16)
	for len(p) > 0 {
		n := min(len(p), adlerNMax)
		q := p[:n]
		p = p[n:]
		for len(q) >= 16 {
			// Two words: the first one's bytes count 8 more times in s2.
			v, u := binary.LittleEndian.Uint64(q), binary.LittleEndian.Uint64(q[8:])
			e, o := v&lanes, (v>>8)&lanes
			f, g := u&lanes, (u>>8)&lanes
			sv := ((e + o) * ones) >> 48
			su := ((f + g) * ones) >> 48
			s2 += 16*s1 + 8*sv + (e*wEven)>>48 + (o*wOdd)>>48 + (f*wEven)>>48 + (g*wOdd)>>48
			s1 += sv + su
			q = q[16:]
		}
		for len(q) >= 8 {
			v := binary.LittleEndian.Uint64(q)
			e, o := v&lanes, (v>>8)&lanes
			s2 += 8*s1 + (e*wEven)>>48 + (o*wOdd)>>48
			s1 += ((e + o) * ones) >> 48
			q = q[8:]
		}
		for _, b := range q {
			s1 += uint64(b)
			s2 += s1
		}
		s1 %= adlerMod
		s2 %= adlerMod
	}
	return uint32(s2<<16 | s1)
}

// zlibHeader is the two-byte zlib header for a deflate stream with a 32 KiB
// window made at level (FLEVEL as zlib sets it, FCHECK making the pair a
// multiple of 31).
func zlibHeader(level int) [2]byte {
	h := [2]byte{0x78, 0}
	switch {
	case level <= 1:
		h[1] = 0 << 6
	case level <= 5:
		h[1] = 1 << 6
	case level == 6:
		h[1] = 2 << 6
	default:
		h[1] = 3 << 6
	}
	h[1] += byte(31 - binary.BigEndian.Uint16(h[:])%31)
	return h
}
