package luks

import (
	"encoding/binary"
	"fmt"
	"hash"
	"io"
)

// diffuse replaces b by its hash diffusion: each digest-sized piece i
// becomes H(be32(i) || piece), truncated to the piece's length.
func diffuse(b []byte, newHash func() hash.Hash) {
	h := newHash()
	ds := h.Size()
	var idx [4]byte
	sum := make([]byte, 0, ds)
	for i := 0; i*ds < len(b); i++ {
		piece := b[i*ds : min(len(b), (i+1)*ds)]
		h.Reset()
		binary.BigEndian.PutUint32(idx[:], uint32(i))
		h.Write(idx[:])
		h.Write(piece)
		sum = h.Sum(sum[:0])
		copy(piece, sum)
	}
	wipe(sum[:ds])
}

func xorInto(d, s []byte) {
	for i := range d {
		d[i] ^= s[i]
	}
}

// AFSplit spreads key over stripes blocks with the anti-forensic splitter:
// stripes-1 random blocks, and a last block that is key XOR the diffused
// XOR chain of the others.
func AFSplit(key []byte, stripes int, newHash func() hash.Hash, rnd io.Reader) ([]byte, error) {
	if stripes < 1 {
		return nil, fmt.Errorf("anti-forensic split into %d stripes", stripes)
	}
	n := len(key)
	out := make([]byte, n*stripes)
	if _, err := io.ReadFull(rnd, out[:n*(stripes-1)]); err != nil {
		return nil, err
	}
	d := make([]byte, n)
	for i := 0; i < stripes-1; i++ {
		xorInto(d, out[i*n:(i+1)*n])
		diffuse(d, newHash)
	}
	last := out[(stripes-1)*n:]
	copy(last, d)
	xorInto(last, key)
	wipe(d)
	return out, nil
}

// AFMerge recovers the key of n bytes from material (n*stripes bytes).
func AFMerge(material []byte, n, stripes int, newHash func() hash.Hash) ([]byte, error) {
	if n <= 0 || stripes < 1 || len(material) < n*stripes {
		return nil, fmt.Errorf("anti-forensic merge of %d stripes of %d bytes from %d bytes", stripes, n, len(material))
	}
	d := make([]byte, n)
	for i := 0; i < stripes-1; i++ {
		xorInto(d, material[i*n:(i+1)*n])
		diffuse(d, newHash)
	}
	xorInto(d, material[(stripes-1)*n:stripes*n])
	return d, nil
}
