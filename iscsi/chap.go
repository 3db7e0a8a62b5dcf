package iscsi

import (
	"crypto/md5"
	"crypto/rand"
	"crypto/subtle"
	"fmt"
	"strconv"
)

// CHAP (RFC 1994 as used by RFC 7143 §12.1.3): the response is
// MD5(identifier || secret || challenge). Only algorithm 5 (MD5) is
// offered; it is the one every target has.

const (
	chapMD5 = "5"
	// maxChallenge bounds a challenge we accept (RFC 7143 leaves it to the
	// implementation; 1024 bytes is generous).
	maxChallenge = 1024
)

func chapResponse(id byte, secret, challenge []byte) []byte {
	h := md5.New()
	h.Write([]byte{id})
	h.Write(secret)
	h.Write(challenge)
	return h.Sum(nil)
}

// chapAnswer builds the initiator's CHAP_N/CHAP_R (and, for mutual CHAP,
// its own CHAP_I/CHAP_C) from the target's challenge pairs.
func chapAnswer(kvs []KV, auth *Auth) (answer []KV, mutualID byte, mutualChallenge []byte, err error) {
	if a, _ := lookup(kvs, "CHAP_A"); a != chapMD5 {
		return nil, 0, nil, fmt.Errorf("target chose CHAP algorithm %q; only 5 (MD5) is offered", a)
	}
	is, ok := lookup(kvs, "CHAP_I")
	if !ok {
		return nil, 0, nil, protoErrorf("CHAP challenge without CHAP_I")
	}
	id, err := strconv.ParseUint(is, 10, 8)
	if err != nil {
		return nil, 0, nil, protoErrorf("CHAP_I %q is not a byte", clipS(is))
	}
	cs, ok := lookup(kvs, "CHAP_C")
	if !ok {
		return nil, 0, nil, protoErrorf("CHAP challenge without CHAP_C")
	}
	ch, err := decodeBinary(cs)
	if err != nil || len(ch) == 0 || len(ch) > maxChallenge {
		return nil, 0, nil, protoErrorf("bad CHAP_C (%d bytes): %v", len(ch), err)
	}
	resp := chapResponse(byte(id), auth.Secret, ch)
	answer = []KV{{"CHAP_N", auth.User}, {"CHAP_R", encodeHex(resp)}}
	if auth.TargetSecret != nil {
		var b [17]byte
		if _, err := rand.Read(b[:]); err != nil {
			return nil, 0, nil, err
		}
		mutualID, mutualChallenge = b[0], b[1:]
		answer = append(answer, KV{"CHAP_I", strconv.Itoa(int(mutualID))}, KV{"CHAP_C", encodeHex(mutualChallenge)})
	}
	return answer, mutualID, mutualChallenge, nil
}

// chapVerify checks the target's answer to our mutual challenge.
func chapVerify(kvs []KV, auth *Auth, id byte, challenge []byte) error {
	rs, ok := lookup(kvs, "CHAP_R")
	if !ok {
		return fmt.Errorf("%w: the target did not answer the mutual CHAP challenge", ErrAuth)
	}
	if n, _ := lookup(kvs, "CHAP_N"); auth.TargetUser != "" && n != auth.TargetUser {
		return fmt.Errorf("%w: the target names itself %q in mutual CHAP, expected %q", ErrAuth, clipS(n), auth.TargetUser)
	}
	r, err := decodeBinary(rs)
	if err != nil {
		return fmt.Errorf("%w: target CHAP_R: %v", ErrAuth, err)
	}
	want := chapResponse(id, auth.TargetSecret, challenge)
	if subtle.ConstantTimeCompare(r, want) != 1 {
		return fmt.Errorf("%w: the target's mutual CHAP response is wrong (wrong target secret)", ErrAuth)
	}
	return nil
}
