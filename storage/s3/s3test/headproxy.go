package s3test

import (
	"io"
	"net/http"
	"strings"
)

// HeadProxy is a handler that forwards every request to base (an
// "http://host:port" endpoint) through rt as a GET, answering a HEAD with
// the size a one-byte ranged GET reports: presigned GET URLs cannot be
// HEADed, and qemu's curl driver asks HEAD first.
func HeadProxy(base string, rt http.RoundTripper) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		req, err := http.NewRequestWithContext(r.Context(), http.MethodGet, base+r.URL.RequestURI(), nil)
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
		resp, err := rt.RoundTrip(req)
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
	})
}
