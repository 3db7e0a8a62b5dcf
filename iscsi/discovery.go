package iscsi

import (
	"context"
	"fmt"
	"strings"
)

// TargetInfo is one SendTargets answer.
type TargetInfo struct {
	Name string
	// Addresses are "host:port,tpgt" as the target gives them.
	Addresses []string
}

// maxTextRounds bounds a continued Text exchange.
const maxTextRounds = 64

// Discover opens a discovery session on cfg.Portal and asks SendTargets=All.
func Discover(ctx context.Context, cfg Config) ([]TargetInfo, error) {
	cfg.Target = ""
	s, err := newSession(ctx, cfg, true)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	kvs, err := s.text(ctx, []KV{{"SendTargets", "All"}})
	if err != nil {
		return nil, fmt.Errorf("SendTargets: %w", err)
	}
	return parseSendTargets(kvs), nil
}

func parseSendTargets(kvs []KV) []TargetInfo {
	var out []TargetInfo
	for _, kv := range kvs {
		switch kv.Key {
		case "TargetName":
			out = append(out, TargetInfo{Name: kv.Value})
		case "TargetAddress":
			if len(out) > 0 {
				out[len(out)-1].Addresses = append(out[len(out)-1].Addresses, kv.Value)
			}
		}
	}
	return out
}

// text runs a Text Request exchange, following continuations (C bit).
func (s *Session) text(ctx context.Context, kvs []KV) ([]KV, error) {
	c, err := s.current(ctx)
	if err != nil {
		return nil, err
	}
	data := EncodeText(kvs)
	ttt := uint32(reservedTag)
	var out []KV
	var acc []byte
	for round := 0; round < maxTextRounds; round++ {
		p := &PDU{Data: data}
		p.BHS[0] = OpTextReq
		p.BHS[1] = 0x80
		p.put32(20, ttt)
		t := &task{done: make(chan struct{})}
		if err := s.send(ctx, c, t, false, p); err != nil {
			return nil, err
		}
		if err := s.wait(ctx, t); err != nil {
			return nil, err
		}
		r := t.resp
		acc = append(acc, r.Data...)
		if len(acc) > maxTextBytes {
			return nil, protoErrorf("text response longer than %d bytes", maxTextBytes)
		}
		if r.BHS[1]&0x40 == 0 { // C clear: the pairs are complete
			got, err := ParseText(acc)
			if err != nil {
				return nil, err
			}
			out = append(out, got...)
			acc = nil
		}
		if r.BHS[1]&0x80 != 0 {
			if len(acc) > 0 {
				return nil, protoErrorf("final text response ends inside a pair")
			}
			return out, nil
		}
		ttt = r.u32(20)
		data = nil
	}
	return nil, protoErrorf("text exchange did not end in %d rounds", maxTextRounds)
}

// HostPort returns the host:port of a TargetAddress value.
func HostPort(addr string) string {
	if i := strings.LastIndexByte(addr, ','); i >= 0 {
		return addr[:i]
	}
	return addr
}
