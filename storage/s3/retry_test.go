package s3

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"net/http/httputil"
	neturl "net/url"
	"sync/atomic"
	"testing"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

// throttlingProxy forwards to the server but answers the first n GETs with
// 503 SlowDown, as S3 does under load; it returns its address and the
// count of refused requests.
func throttlingProxy(t *testing.T, s *server, n int64) (string, *atomic.Int64) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	target, _ := neturl.Parse("http://" + s.addr)
	rp := httputil.NewSingleHostReverseProxy(target)
	orig := rp.Director
	// Keep the Host the client signed.
	rp.Director = func(r *http.Request) { host := r.Host; orig(r); r.Host = host }
	var refused atomic.Int64
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && r.Header.Get("Range") != "" && refused.Load() < n {
			refused.Add(1)
			w.Header().Set("Content-Type", "application/xml")
			w.WriteHeader(http.StatusServiceUnavailable)
			w.Write([]byte(`<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>`))
			return
		}
		rp.ServeHTTP(w, r)
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return l.Addr().String(), &refused
}

// TestRetryThrottled: 503 SlowDown answers are retried with backoff; more
// of them than the retries allow give a clear error.
func TestRetryThrottled(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	data := randBytes(11, 1<<20)
	s.put("r/t.raw", data)
	addr, refused := throttlingProxy(t, s, 3)
	st, err := New(testBucket, &driver.SchemeEnv{Options: s.opts("endpoint", "http://"+addr, "retries", "5", "read-ahead", "0")})
	if err != nil {
		t.Fatal(err)
	}
	f, err := st.Open("r/t.raw", driver.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, len(data))
	if _, err := f.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, data) {
		t.Fatalf("read through throttling: %v", err)
	}
	if refused.Load() != 3 {
		t.Fatalf("%d requests refused", refused.Load())
	}
	addr2, _ := throttlingProxy(t, s, 1000)
	st2, _ := New(testBucket, &driver.SchemeEnv{Options: s.opts("endpoint", "http://"+addr2, "retries", "2")})
	g, err := st2.Open("r/t.raw", driver.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if _, err := g.ReadAt(buf, 0); err == nil {
		t.Fatal("read succeeded against a server that always throttles")
	} else {
		t.Logf("always throttled: %v", err)
	}
}

// TestEnvironmentConfig: the AWS_* variables every S3 tool reads configure
// a name opened through vdisk with no options.
func TestEnvironmentConfig(t *testing.T) {
	s := startServer(t)
	data := randBytes(12, 3<<20)
	s.put("e/x.raw", data)
	t.Setenv("AWS_ENDPOINT_URL", "http://"+s.addr)
	t.Setenv("AWS_ACCESS_KEY_ID", testAccess)
	t.Setenv("AWS_SECRET_ACCESS_KEY", testSecret)
	t.Setenv("AWS_REGION", "us-east-1")
	d, err := vdisk.Open(context.Background(), s3url("e/x.raw"), &vdisk.OpenOptions{Format: "raw", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	buf := make([]byte, len(data))
	if _, err := d.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, data) {
		t.Fatalf("read: %v", err)
	}
	t.Setenv("AWS_SECRET_ACCESS_KEY", "wrong")
	if _, err := vdisk.Open(context.Background(), s3url("e/x.raw"), &vdisk.OpenOptions{Format: "raw", ReadOnly: true}); err == nil {
		t.Fatal("opened with a wrong secret")
	} else {
		t.Logf("wrong secret: %v", err)
	}
}
