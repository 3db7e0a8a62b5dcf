package bufpool

import "testing"

// TestPool: Get always returns Size bytes, whatever was put back; a
// buffer of another length never comes out.
func TestPool(t *testing.T) {
	p := Pool{Size: 4096}
	b := p.Get()
	if len(b) != 4096 {
		t.Fatalf("Get: %d bytes", len(b))
	}
	p.Put(b)
	p.Put(make([]byte, 100))
	for range 4 {
		if got := p.Get(); len(got) != 4096 {
			t.Fatalf("Get after Put: %d bytes", len(got))
		}
	}
}
