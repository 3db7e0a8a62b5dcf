package s3

import (
	"bytes"
	"context"
	"testing"

	"github.com/minio/minio-go/v7"
)

// TestPartChecksum: every part carries a payload check the server
// verifies (CRC-32C to loopback and over https, the signed SHA-256 over
// plain http to another host): a part whose bytes differ from the ones
// the check was computed over is refused.
func TestPartChecksum(t *testing.T) {
	t.Parallel()
	s := startServer(t)
	for _, c := range []struct {
		name     string
		loopback bool
		corrupt  bool
	}{
		{"crc32c", true, false},
		{"crc32c corrupt", true, true},
		{"sha256", false, false},
		{"sha256 corrupt", false, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			st := s.storage()
			st.cfg.loopback = c.loopback
			ctx := context.Background()
			key := "ck/" + c.name
			o := minio.PutObjectOptions{}
			if c.loopback {
				o.UserMetadata = map[string]string{"X-Amz-Checksum-Algorithm": "CRC32C"}
			}
			id, err := st.core.NewMultipartUpload(ctx, testBucket, key, o)
			if err != nil {
				t.Fatal(err)
			}
			defer st.core.AbortMultipartUpload(ctx, testBucket, key, id)
			buf := randBytes(21, 1<<20)
			opts, crc := st.partOptions(buf)
			if got := opts.CustomHeader.Get("x-amz-checksum-crc32c"); got != crc || (got != "") != c.loopback {
				t.Fatalf("crc32c header %q (returned %q), want one: %v", got, crc, c.loopback)
			}
			body := buf
			if c.corrupt {
				body = bytes.Clone(buf)
				body[12345] ^= 1
			}
			_, err = st.core.PutObjectPart(ctx, testBucket, key, id, 1, bytes.NewReader(body), int64(len(body)), opts)
			if c.corrupt && err == nil {
				t.Fatal("a part whose bytes differ from its checksum was accepted")
			}
			if !c.corrupt && err != nil {
				t.Fatalf("part refused: %v", err)
			}
			t.Logf("err: %v", err)
		})
	}
}
