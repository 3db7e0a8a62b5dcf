package iscsi

import (
	"bytes"
	"testing"
)

func seedPDU(op byte, data []byte, ahs int) []byte {
	p := &PDU{Data: data, AHS: make([]byte, ahs)}
	p.BHS[0] = op
	p.BHS[1] = 0x80
	b, _ := p.Marshal(Digests{})
	return b
}

// FuzzPDU feeds the PDU parser (BHS, AHS, digests, data segment) hostile
// bytes: it must never panic, never allocate past the bound, and what it
// parses must encode back to the same PDU.
func FuzzPDU(f *testing.F) {
	f.Add(seedPDU(OpNOPIn, nil, 0), false, false)
	f.Add(seedPDU(OpDataIn, []byte("hello"), 4), false, false)
	f.Add(seedPDU(OpSCSIResp, []byte{0, 4, 0x70, 0, 5, 0}, 0), false, false)
	f.Add(seedPDU(OpLoginResp, EncodeText([]KV{{"TargetName", "iqn.x"}}), 0), false, false)
	withDig := &PDU{Data: []byte("digest")}
	withDig.BHS[0] = OpDataIn
	b, _ := withDig.Marshal(Digests{true, true})
	f.Add(b, true, true)
	f.Fuzz(func(t *testing.T, b []byte, hd, dd bool) {
		const max = 64 << 10
		p, n, err := ParsePDU(b, Digests{hd, dd}, max)
		if err != nil {
			return
		}
		if n > len(b) || len(p.Data) > max || len(p.AHS) > maxAHS {
			t.Fatalf("parsed %d of %d bytes, data %d", n, len(b), len(p.Data))
		}
		out, err := p.Marshal(Digests{hd, dd})
		if err != nil {
			t.Fatal(err)
		}
		q, _, err := ParsePDU(out, Digests{hd, dd}, max)
		if err != nil {
			t.Fatalf("re-parse: %v", err)
		}
		if q.BHS != p.BHS || !bytes.Equal(q.AHS, p.AHS) || !bytes.Equal(q.Data, p.Data) {
			t.Fatal("round trip differs")
		}
		_ = p.Sense()
		if s, ok := ParseSense(p.Data); ok {
			_ = s.String()
		}
	})
}

// FuzzTextKeys feeds the login/text key parser and the CHAP handling.
func FuzzTextKeys(f *testing.F) {
	f.Add(EncodeText([]KV{{"CHAP_A", "5"}, {"CHAP_I", "7"}, {"CHAP_C", "0x0123456789abcdef"}}))
	f.Add(EncodeText([]KV{{"MaxRecvDataSegmentLength", "8192"}, {"HeaderDigest", "CRC32C"}, {"InitialR2T", "No"}}))
	f.Add(EncodeText([]KV{{"TargetName", "iqn.a"}, {"TargetAddress", "1.2.3.4:3260,1"}}))
	f.Add([]byte("a=b\x00c"))
	f.Add([]byte("CHAP_C=0bAAEC\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		kvs, err := ParseText(b)
		if err != nil {
			return
		}
		if len(kvs) > maxTextPairs {
			t.Fatalf("%d pairs", len(kvs))
		}
		again, err := ParseText(EncodeText(kvs))
		if err != nil || len(again) != len(kvs) {
			t.Fatalf("round trip: %v (%d vs %d)", err, len(again), len(kvs))
		}
		var p Params
		_ = negotiate(&p, kvs, 8192, false)
		if p.MaxXmitDataSegmentLength > MaxDataSegment || p.MaxBurstLength > defaultMaxBurst {
			t.Fatalf("unbounded params %+v", p)
		}
		auth := &Auth{User: "u", Secret: []byte("s"), TargetSecret: []byte("t")}
		if _, id, ch, err := chapAnswer(kvs, auth); err == nil {
			_ = chapVerify(kvs, auth, id, ch)
		}
		_ = parseSendTargets(kvs)
	})
}
