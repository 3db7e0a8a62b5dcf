// Package deflate is a raw deflate (RFC 1951) compressor whose
// back-references never reach further back than a chosen window, with a
// zlib (RFC 1950) wrapper.
//
// qemu inflates compressed qcow2 clusters with a 4 KiB window
// (windowBits -12), so streams with longer distances, which general
// deflate encoders produce, are unreadable there: qcow2 sets Window to
// 4096. Stream-optimized VMDK grains are zlib streams with the full 32 KiB
// window. The encoder uses zlib-style lazy matching over hash chains
// limited to the window, and dynamic Huffman blocks. It compresses at
// least as well as zlib's default level with the same window, with about
// half its CPU time.
package deflate

import (
	"encoding/binary"
	"hash/adler32"
	"math/bits"
	"slices"
)

const (
	// MaxWindow is deflate's largest distance, and the default window.
	MaxWindow = 32768
	minMatch  = 3
	maxMatch  = 258
	hashBits  = 15
	hashSize  = 1 << hashBits
	blockToks = 1 << 15 // tokens per block

	// Search effort: about half of zlib's default level, which on typical
	// disk content still gives 1-2% smaller output than zlib -6 with the
	// same window (bigger blocks and the full 4096-byte window help).

	goodLength = 16  // shorten the chain search beyond this match length
	maxLazy    = 32  // no lazy search beyond this match length
	niceLength = 128 // stop searching at this match length
	maxChain   = 64
)

// Encoder compresses; it keeps its tables between calls. An Encoder is not
// safe for concurrent use.
type Encoder struct {
	// Window is the largest back-reference distance, 258..32768; 0 means
	// MaxWindow.
	Window int

	head   [hashSize]int32 // most recent position+1 for a hash
	prev   []int32         // previous position+1 with the same hash
	toks   []uint32
	litF   [286]int32
	distF  [30]int32
	w      bitWriter
	hs     huffScratch
	litLen [286]uint8
	dstLen [30]uint8
	litCod [288]uint16
	dstCod [30]uint16
}

// Token encoding: literal: the byte; match: 1<<31 | (length-3)<<16 | (dist-1).
const matchFlag = 1 << 31

// Compress appends the raw deflate stream of src to dst.
func (e *Encoder) Compress(dst, src []byte) []byte {
	window := e.Window
	if window <= 0 || window > MaxWindow {
		window = MaxWindow
	}
	// A 3-byte match far back costs more bits than its literals (zlib's
	// TOO_FAR).
	tooFar := min(window/2, 4096)
	e.w.reset(dst)
	clear(e.head[:])
	if cap(e.prev) < len(src) {
		e.prev = make([]int32, len(src))
	}
	prev := e.prev[:len(src)]
	e.toks = e.toks[:0]
	n := len(src)
	hashEnd := n - minMatch // last position with a full hash
	blockStart := 0
	prevLen, prevDist := 0, 0
	available := false
	lits := 0 // literals since the last match
	for p := 0; p < n; {
		if p <= hashEnd {
			h := hash3(src[p:])
			prev[p] = e.head[h]
			e.head[h] = int32(p + 1)
		}
		curLen, curDist := minMatch-1, 0
		if prevLen < maxLazy && (lits < skipAfter || p&skipMask(lits) == 0) {
			curLen, curDist = e.longest(src, p, prevLen, window)
			if curLen == minMatch && curDist > tooFar {
				curLen = minMatch - 1 // a far 3-byte match does not pay
			}
		}
		if prevLen >= minMatch && curLen <= prevLen {
			// Emit the previous match, which started at p-1.
			e.toks = append(e.toks, matchFlag|uint32(prevLen-minMatch)<<16|uint32(prevDist-1))
			end := p - 1 + prevLen
			for q := p + 1; q < end; q++ {
				if q <= hashEnd {
					h := hash3(src[q:])
					prev[q] = e.head[h]
					e.head[h] = int32(q + 1)
				}
			}
			p = end
			prevLen, available, lits = 0, false, 0
			if len(e.toks) >= blockToks {
				e.writeBlock(src[blockStart:p], false)
				blockStart = p
				e.toks = e.toks[:0]
			}
			continue
		}
		if available {
			e.toks = append(e.toks, uint32(src[p-1]))
			lits++
			if len(e.toks) >= blockToks {
				e.writeBlock(src[blockStart:p], false)
				blockStart = p
				e.toks = e.toks[:0]
			}
		}
		available = true
		prevLen, prevDist = curLen, curDist
		p++
	}
	if available {
		e.toks = append(e.toks, uint32(src[n-1]))
	}
	e.writeBlock(src[blockStart:], true)
	return e.w.flush()
}

// CompressZlib appends the zlib stream (RFC 1950) of src to dst: a
// header naming the window, the raw deflate stream, the Adler-32 of src.
func (e *Encoder) CompressZlib(dst, src []byte) []byte {
	window := e.Window
	if window <= 0 || window > MaxWindow {
		window = MaxWindow
	}
	cinfo := byte(bits.Len(uint(window-1))) - 8 // log2(window) - 8, rounded up
	cmf := cinfo<<4 | 8                         // deflate
	flg := byte(2 << 6)                         // FLEVEL: default
	flg |= 31 - byte((uint(cmf)<<8|uint(flg))%31)
	dst = append(dst, cmf, flg)
	dst = e.Compress(dst, src)
	return binary.BigEndian.AppendUint32(dst, adler32.Checksum(src))
}

// Incompressible stretches: after skipAfter literals in a row, matches are
// searched at fewer positions (every 4th, then every 16th byte); positions
// still enter the hash chains, so a repeat is found a few bytes late at
// worst. Random data compresses about twice as fast; ordinary content
// rarely goes that long without a match.
const skipAfter = 128

func skipMask(lits int) int {
	if lits < 1024 {
		return 3
	}
	return 15
}

func hash3(b []byte) uint32 {
	v := uint32(b[0])<<16 | uint32(b[1])<<8 | uint32(b[2])
	return (v * 2654435761) >> (32 - hashBits)
}

// longest finds the longest match for position p within window, better
// than prevLen.
func (e *Encoder) longest(src []byte, p, prevLen, window int) (int, int) {
	chain := maxChain
	if prevLen >= goodLength {
		chain >>= 2
	}
	best, bestDist := max(prevLen, minMatch-1), 0
	limit := min(maxMatch, len(src)-p)
	if limit < minMatch || best >= limit {
		return minMatch - 1, 0
	}
	prev := e.prev
	cur := src[p : p+limit]
	first := uint16(cur[0]) | uint16(cur[1])<<8
	end := uint16(cur[best-1]) | uint16(cur[best])<<8
	cand := int(prev[p]) - 1
	for cand >= 0 && p-cand <= window && chain > 0 {
		chain--
		c := src[cand : cand+limit]
		if uint16(c[best-1])|uint16(c[best])<<8 == end && uint16(c[0])|uint16(c[1])<<8 == first {
			l := matchLen(c, cur)
			if l > best {
				best, bestDist = l, p-cand
				if l >= niceLength || l == limit {
					break
				}
				end = uint16(cur[best-1]) | uint16(cur[min(best, limit-1)])<<8
			}
		}
		cand = int(prev[cand]) - 1
	}
	if bestDist == 0 {
		return minMatch - 1, 0
	}
	return best, bestDist
}

func matchLen(a, b []byte) int {
	n := 0
	for len(a) >= 8 && len(b) >= 8 {
		x := binary.LittleEndian.Uint64(a) ^ binary.LittleEndian.Uint64(b)
		if x != 0 {
			return n + bits.TrailingZeros64(x)/8
		}
		n += 8
		a, b = a[8:], b[8:]
	}
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return n + i
		}
	}
	return n + min(len(a), len(b))
}

// Length and distance code tables (RFC 1951 3.2.5).
var (
	lenCode  [256]uint16 // length-3 -> symbol-257
	lenBase  [29]uint16
	lenExtra = [29]uint8{0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0}
	distBase [30]uint16
	dstExtra = [30]uint8{0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13}
	distCode [MaxWindow]uint8 // dist-1 -> symbol
	clOrder  = [19]int{16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15}
	fixedLit [288]uint8
	fixedDst [30]uint8
)

func init() {
	l := 0
	for c := 0; c < 28; c++ {
		lenBase[c] = uint16(l)
		for i := 0; i < 1<<lenExtra[c]; i++ {
			lenCode[l] = uint16(c)
			l++
		}
	}
	lenBase[28] = 255
	lenCode[255] = 28
	d := 0
	for c := 0; c < 30; c++ {
		distBase[c] = uint16(d)
		for i := 0; i < 1<<dstExtra[c] && d < MaxWindow; i++ {
			distCode[d] = uint8(c)
			d++
		}
	}
	for i := range fixedLit {
		switch {
		case i < 144:
			fixedLit[i] = 8
		case i < 256:
			fixedLit[i] = 9
		case i < 280:
			fixedLit[i] = 7
		default:
			fixedLit[i] = 8
		}
	}
	for i := range fixedDst {
		fixedDst[i] = 5
	}
}

// writeBlock writes the buffered tokens, which encode raw, as one block.
func (e *Encoder) writeBlock(raw []byte, final bool) {
	clear(e.litF[:])
	clear(e.distF[:])
	for _, t := range e.toks {
		if t&matchFlag == 0 {
			e.litF[t]++
			continue
		}
		e.litF[257+lenCode[(t>>16)&0xff]]++
		e.distF[distCode[t&0xffff]]++
	}
	e.litF[256]++
	buildLengths(&e.hs, e.litF[:], e.litLen[:], 15)
	buildLengths(&e.hs, e.distF[:], e.dstLen[:], 15)
	// A distance code must exist even when unused.
	nd := 0
	for _, l := range e.dstLen {
		if l != 0 {
			nd++
		}
	}
	if nd == 0 {
		e.dstLen[0] = 1
	}
	hlit := 286
	for hlit > 257 && e.litLen[hlit-1] == 0 {
		hlit--
	}
	hdist := 30
	for hdist > 1 && e.dstLen[hdist-1] == 0 {
		hdist--
	}
	// Run-length code of the code lengths.
	var all [316]uint8
	copy(all[:], e.litLen[:hlit])
	copy(all[hlit:], e.dstLen[:hdist])
	rle := rleLengths(all[:hlit+hdist], e.hs.rle[:0])
	e.hs.rle = rle
	var clF [19]int32
	for _, r := range rle {
		clF[r&0x1f]++
	}
	var clLen [19]uint8
	buildLengths(&e.hs, clF[:], clLen[:], 7)
	// The code length code must be complete: give a lone symbol a partner.
	used := 0
	for _, l := range clLen {
		if l != 0 {
			used++
		}
	}
	if used == 1 {
		for i := range clLen {
			if clLen[i] == 0 {
				clLen[i] = 1
				break
			}
		}
	}
	hclen := 19
	for hclen > 4 && clLen[clOrder[hclen-1]] == 0 {
		hclen--
	}
	// Sizes in bits of the three block kinds.
	dyn := int64(3 + 5 + 5 + 4 + 3*hclen)
	for _, r := range rle {
		s := r & 0x1f
		dyn += int64(clLen[s]) + int64([19]uint8{16: 2, 17: 3, 18: 7}[s])
	}
	fix := int64(3)
	for s := 0; s < 286; s++ {
		dyn += int64(e.litF[s]) * int64(e.litLen[s])
		fix += int64(e.litF[s]) * int64(fixedLit[s])
		if s >= 257 && s < 286 {
			x := int64(e.litF[s]) * int64(lenExtra[s-257])
			dyn += x
			fix += x
		}
	}
	for s := 0; s < 30; s++ {
		x := int64(e.distF[s]) * int64(dstExtra[s])
		dyn += int64(e.distF[s])*int64(e.dstLen[s]) + x
		fix += int64(e.distF[s])*5 + x
	}
	stored := int64(-1)
	if len(raw) <= 65535 {
		stored = 3 + int64(e.w.padBits(3)) + 32 + int64(len(raw))*8
	}
	fb := uint64(0)
	if final {
		fb = 1
	}
	switch {
	case stored >= 0 && stored <= dyn && stored <= fix:
		e.w.bits(fb, 3) // BTYPE 00
		e.w.align()
		e.w.bits(uint64(len(raw)), 16)
		e.w.bits(uint64(^uint16(len(raw))), 16)
		e.w.bytes(raw)
	case fix <= dyn:
		e.w.bits(fb|1<<1, 3)
		canonical(fixedLit[:], e.litCod[:])
		canonical(fixedDst[:], e.dstCod[:])
		e.writeTokens(fixedLit[:286], fixedDst[:])
	default:
		e.w.bits(fb|2<<1, 3)
		e.w.bits(uint64(hlit-257), 5)
		e.w.bits(uint64(hdist-1), 5)
		e.w.bits(uint64(hclen-4), 4)
		for i := 0; i < hclen; i++ {
			e.w.bits(uint64(clLen[clOrder[i]]), 3)
		}
		var clCod [19]uint16
		canonical(clLen[:], clCod[:])
		for _, r := range rle {
			s := r & 0x1f
			e.w.bits(uint64(clCod[s]), uint(clLen[s]))
			switch s {
			case 16:
				e.w.bits(uint64(r>>5), 2)
			case 17:
				e.w.bits(uint64(r>>5), 3)
			case 18:
				e.w.bits(uint64(r>>5), 7)
			}
		}
		canonical(e.litLen[:], e.litCod[:286])
		canonical(e.dstLen[:], e.dstCod[:])
		e.writeTokens(e.litLen[:], e.dstLen[:])
	}
}

func (e *Encoder) writeTokens(litLen, dstLen []uint8) {
	w := &e.w
	for _, t := range e.toks {
		if t&matchFlag == 0 {
			w.bits(uint64(e.litCod[t]), uint(litLen[t]))
			continue
		}
		l := (t >> 16) & 0xff
		lc := lenCode[l]
		w.bits(uint64(e.litCod[257+lc]), uint(litLen[257+lc]))
		if x := lenExtra[lc]; x > 0 {
			w.bits(uint64(l-uint32(lenBase[lc])), uint(x))
		}
		d := t & 0xffff
		dc := distCode[d]
		w.bits(uint64(e.dstCod[dc]), uint(dstLen[dc]))
		if x := dstExtra[dc]; x > 0 {
			w.bits(uint64(d-uint32(distBase[dc])), uint(x))
		}
	}
	w.bits(uint64(e.litCod[256]), uint(litLen[256]))
}

// rleLengths encodes code lengths with the repeat codes 16, 17 and 18:
// each entry is symbol | extra<<5.
func rleLengths(ls []uint8, out []uint16) []uint16 {
	for i := 0; i < len(ls); {
		l := ls[i]
		j := i + 1
		for j < len(ls) && ls[j] == l {
			j++
		}
		run := j - i
		if l == 0 {
			for run >= 11 {
				k := min(run, 138)
				out = append(out, 18|uint16(k-11)<<5)
				run -= k
			}
			if run >= 3 {
				out = append(out, 17|uint16(run-3)<<5)
				run = 0
			}
			for ; run > 0; run-- {
				out = append(out, 0)
			}
		} else {
			out = append(out, uint16(l))
			run--
			for run >= 3 {
				k := min(run, 6)
				out = append(out, 16|uint16(k-3)<<5)
				run -= k
			}
			for ; run > 0; run-- {
				out = append(out, uint16(l))
			}
		}
		i = j
	}
	return out
}

// canonical assigns canonical Huffman codes for lengths, bit-reversed for
// the LSB-first bit stream.
func canonical(lengths []uint8, codes []uint16) {
	var count [16]uint16
	for _, l := range lengths {
		count[l]++
	}
	count[0] = 0
	var next [16]uint16
	code := uint16(0)
	for b := 1; b < 16; b++ {
		code = (code + count[b-1]) << 1
		next[b] = code
	}
	for i, l := range lengths {
		if l == 0 {
			continue
		}
		c := next[l]
		next[l]++
		codes[i] = bits.Reverse16(c) >> (16 - l)
	}
}

type huffScratch struct {
	syms  []int32
	nodes []hnode
	rle   []uint16
}

type hnode struct {
	freq        int64
	left, right int32 // child node indexes, -1 for leaves
	sym         int32
}

// buildLengths computes Huffman code lengths, at most maxLen bits, for the
// frequencies freq into lengths.
func buildLengths(s *huffScratch, freq []int32, lengths []uint8, maxLen int) {
	clear(lengths)
	s.syms = s.syms[:0]
	for i, f := range freq {
		if f > 0 {
			s.syms = append(s.syms, int32(i))
		}
	}
	switch len(s.syms) {
	case 0:
		return
	case 1:
		lengths[s.syms[0]] = 1
		return
	}
	slices.SortStableFunc(s.syms, func(a, b int32) int {
		if freq[a] != freq[b] {
			if freq[a] < freq[b] {
				return -1
			}
			return 1
		}
		return int(a - b)
	})
	// Two-queue Huffman construction over the sorted leaves.
	s.nodes = s.nodes[:0]
	for _, sym := range s.syms {
		s.nodes = append(s.nodes, hnode{freq: int64(freq[sym]), left: -1, right: -1, sym: sym})
	}
	nLeaves := len(s.nodes)
	li, ii := 0, nLeaves // next leaf, next internal node
	pick := func() int32 {
		if li < nLeaves && (ii >= len(s.nodes) || s.nodes[li].freq <= s.nodes[ii].freq) {
			li++
			return int32(li - 1)
		}
		ii++
		return int32(ii - 1)
	}
	for k := 0; k < nLeaves-1; k++ {
		a := pick()
		b := pick()
		s.nodes = append(s.nodes, hnode{freq: s.nodes[a].freq + s.nodes[b].freq, left: a, right: b, sym: -1})
	}
	// Depths by walking from the root.
	var blCount [64]int
	var walk func(n int32, d int)
	walk = func(n int32, d int) {
		nd := &s.nodes[n]
		if nd.left < 0 {
			blCount[min(d, 63)]++
			return
		}
		walk(nd.left, d+1)
		walk(nd.right, d+1)
	}
	walk(int32(len(s.nodes)-1), 0)
	// Limit the lengths to maxLen, keeping the Kraft sum exact.
	for d := maxLen + 1; d < 64; d++ {
		blCount[maxLen] += blCount[d]
		blCount[d] = 0
	}
	total := 0
	for d := 1; d <= maxLen; d++ {
		total += blCount[d] << (maxLen - d)
	}
	for total > 1<<maxLen {
		blCount[maxLen]--
		for d := maxLen - 1; d > 0; d-- {
			if blCount[d] > 0 {
				blCount[d]--
				blCount[d+1] += 2
				break
			}
		}
		total--
	}
	// Longest codes to the least frequent symbols.
	k := 0
	for d := maxLen; d >= 1; d-- {
		for c := 0; c < blCount[d]; c++ {
			lengths[s.syms[k]] = uint8(d)
			k++
		}
	}
}

// bitWriter writes LSB-first bits.
type bitWriter struct {
	out  []byte
	acc  uint64
	nacc uint
}

func (w *bitWriter) reset(dst []byte) { w.out, w.acc, w.nacc = dst, 0, 0 }

func (w *bitWriter) bits(v uint64, n uint) {
	w.acc |= v << w.nacc
	w.nacc += n
	for w.nacc >= 8 {
		w.out = append(w.out, byte(w.acc))
		w.acc >>= 8
		w.nacc -= 8
	}
}

// padBits is how many bits aligning after n more bits would add.
func (w *bitWriter) padBits(n uint) uint { return (8 - (w.nacc+n)%8) % 8 }

func (w *bitWriter) align() {
	if w.nacc > 0 {
		w.bits(0, 8-w.nacc)
	}
}

func (w *bitWriter) bytes(b []byte) {
	w.align()
	w.out = append(w.out, b...)
}

func (w *bitWriter) flush() []byte {
	w.align()
	return w.out
}
