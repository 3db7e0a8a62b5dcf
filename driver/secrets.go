package driver

import "sync"

// Secrets provides the secrets that encrypted images and network storages
// are unlocked with, by id (qemu's --object secret,id=ID,...).
type Secrets interface {
	// Secret returns a copy of the secret with this id; the caller zeroes
	// it when done. An unknown id is an ErrInvalidOption error.
	Secret(id string) ([]byte, error)
}

// SecretMap is a Secrets kept in memory.
type SecretMap struct {
	mu sync.Mutex
	m  map[string][]byte
}

// Set stores a copy of secret under id.
func (s *SecretMap) Set(id string, secret []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = map[string][]byte{}
	}
	if old, ok := s.m[id]; ok {
		Wipe(old)
	}
	s.m[id] = append([]byte(nil), secret...)
}

// Secret implements Secrets.
func (s *SecretMap) Secret(id string) ([]byte, error) {
	if s == nil {
		return nil, OptionErrorf("no secret with id %q (give it with --object secret,id=%s,file=PATH)", id, id)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.m[id]
	if !ok {
		return nil, OptionErrorf("no secret with id %q (give it with --object secret,id=%s,file=PATH)", id, id)
	}
	return append([]byte(nil), v...), nil
}

// Wipe zeroes b (keys and passwords after use).
func Wipe(b []byte) {
	clear(b)
}

// LookupSecret asks s for id, with a clear error when s is nil.
func LookupSecret(s Secrets, id string) ([]byte, error) {
	if s == nil {
		return nil, OptionErrorf("secret %q is needed but no secrets were given (--object secret,id=%s,file=PATH)", id, id)
	}
	return s.Secret(id)
}
