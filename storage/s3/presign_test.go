package s3

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/vdisk/vdisk/internal/qemutest"
	"github.com/vdisk/vdisk/storage/s3/s3test"
)

// TestQemuReadsPresignedURL: qemu-img, reading the object over HTTP with
// its curl driver, is an independent oracle for what vdisk uploaded.
func TestQemuReadsPresignedURL(t *testing.T) {
	t.Parallel()
	qemutest.Require(t, "qemu-img")
	s := startServer(t)
	src := makeSource(t, 12<<20)
	for _, c := range []struct {
		format   string
		compress bool
	}{{"raw", false}, {"qcow2", true}} {
		key := "presign/x." + c.format
		if err := convertTo(t, s, src, s3url(key), c.format, nil, c.compress); err != nil {
			t.Fatal(err)
		}
		u, err := s.storage().Client().PresignedGetObject(context.Background(), testBucket, key, time.Hour, nil)
		if err != nil {
			t.Fatal(err)
		}
		// qemu's curl driver asks the size with a HEAD, which a URL
		// presigned for GET does not allow (the method is signed): a
		// loopback proxy turns that HEAD into a one-byte GET.
		u.Host = headProxy(t, u.Host)
		spec, _ := json.Marshal(map[string]any{"driver": c.format, "file": map[string]any{"driver": "http", "url": u.String(), "readahead": 1 << 20}})
		out, code, err := qemutest.RunCode("qemu-img", "compare", "-f", "raw", src, "json:"+string(spec))
		if err != nil || code != 0 {
			t.Fatalf("qemu-img compare over HTTP (%s): exit %d %v\n%s", c.format, code, err, out)
		}
	}
}

// headProxy serves on loopback and forwards to backend, answering a HEAD
// from a ranged GET of one byte; it returns its host:port.
func headProxy(t *testing.T, backend string) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: s3test.HeadProxy("http://"+backend, http.DefaultTransport)}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return l.Addr().String()
}
