package s3

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/vdisk/vdisk/internal/qemutest"
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
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		req, err := http.NewRequestWithContext(r.Context(), http.MethodGet, "http://"+backend+r.URL.RequestURI(), nil)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if rg := r.Header.Get("Range"); rg != "" {
			req.Header.Set("Range", rg)
		}
		if r.Method == http.MethodHead {
			req.Header.Set("Range", "bytes=0-0")
		}
		resp, err := http.DefaultTransport.RoundTrip(req)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		if r.Method == http.MethodHead {
			total := resp.Header.Get("Content-Range")
			if i := strings.LastIndexByte(total, '/'); resp.StatusCode == http.StatusPartialContent && i >= 0 {
				w.Header().Set("Content-Length", total[i+1:])
				w.Header().Set("Accept-Ranges", "bytes")
				w.WriteHeader(http.StatusOK)
				return
			}
			w.WriteHeader(resp.StatusCode)
			return
		}
		for k, v := range resp.Header {
			w.Header()[k] = v
		}
		w.WriteHeader(resp.StatusCode)
		io.Copy(w, resp.Body)
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return l.Addr().String()
}
