// Package s3test starts a real S3 server for tests of other packages (the
// command line's end-to-end flows): versitygw on loopback with its POSIX
// backend in a temporary directory, as storage/s3's own tests run it.
// Tests only.
package s3test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// Credentials of every server started here.
const (
	Access = "vdiskaccess"
	Secret = "vdisksecret1234567890"
	Region = "us-east-1"
)

// Server is a running versitygw.
type Server struct {
	t         testing.TB
	Addr      string // host:port on loopback
	Dir       string // the backend's directory
	accessLog string
	cmd       *exec.Cmd
}

// Bin finds versitygw on PATH or in $(go env GOPATH)/bin. Without it the
// test fails under CI (./test.sh installs it) and skips elsewhere.
func Bin(t testing.TB) string {
	t.Helper()
	if p, err := exec.LookPath("versitygw"); err == nil {
		return p
	}
	gopath := os.Getenv("GOPATH")
	if gopath == "" {
		if out, err := exec.Command("go", "env", "GOPATH").Output(); err == nil {
			gopath = strings.TrimSpace(string(out))
		}
	}
	for _, dir := range filepath.SplitList(gopath) {
		p := filepath.Join(dir, "bin", "versitygw")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	msg := "versitygw not found: go install github.com/versity/versitygw/cmd/versitygw@v1.8.0 (./test.sh does)"
	if os.Getenv("CI") != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// Start runs a server with the given buckets until the test ends.
func Start(t testing.TB, buckets ...string) *Server {
	t.Helper()
	bin := Bin(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{t: t, Addr: l.Addr().String(), Dir: t.TempDir()}
	l.Close()
	s.accessLog = filepath.Join(t.TempDir(), "access.log")
	cmd := exec.Command(bin, "--access", Access, "--secret", Secret, "--port", s.Addr, "--quiet",
		"--access-log", s.accessLog, "posix", s.Dir)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s.cmd = cmd
	t.Cleanup(s.stop)
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", s.Addr, time.Second)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("versitygw did not listen on %s: %v\n%s", s.Addr, err, out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, b := range buckets {
		if err := s.Client().MakeBucket(context.Background(), b, minio.MakeBucketOptions{}); err != nil {
			t.Fatalf("make bucket %s: %v", b, err)
		}
	}
	return s
}

// stop kills the server's process group (versitygw and anything it ran).
func (s *Server) stop() {
	if s.cmd == nil {
		return
	}
	syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	s.cmd.Wait()
	s.cmd = nil
}

// Endpoint is the server's URL (AWS_ENDPOINT_URL).
func (s *Server) Endpoint() string { return "http://" + s.Addr }

// Env is the process environment that reaches the server with the AWS
// variables every S3 tool reads.
func (s *Server) Env() map[string]string {
	return map[string]string{
		"AWS_ACCESS_KEY_ID":     Access,
		"AWS_SECRET_ACCESS_KEY": Secret,
		"AWS_SESSION_TOKEN":     "",
		"AWS_REGION":            Region,
		"AWS_ENDPOINT_URL":      s.Endpoint(),
		"AWS_ENDPOINT_URL_S3":   "",
		"AWS_PROFILE":           "",
	}
}

// Setenv sets Env for the rest of the test (t.Setenv: not with t.Parallel).
func (s *Server) Setenv(t *testing.T) {
	for k, v := range s.Env() {
		t.Setenv(k, v)
	}
}

// Client is a plain minio client for checking what the server holds.
func (s *Server) Client() *minio.Client {
	s.t.Helper()
	cl, err := minio.New(s.Addr, &minio.Options{Creds: credentials.NewStaticV4(Access, Secret, ""), BucketLookup: minio.BucketLookupPath, Region: Region})
	if err != nil {
		s.t.Fatal(err)
	}
	return cl
}

// Stat returns the object's metadata (its ETag tells a rewrite).
func (s *Server) Stat(bucket, key string) (minio.ObjectInfo, error) {
	return s.Client().StatObject(context.Background(), bucket, key, minio.StatObjectOptions{})
}

// Download stores the object in the local file path.
func (s *Server) Download(bucket, key, path string) {
	s.t.Helper()
	if err := s.Client().FGetObject(context.Background(), bucket, key, path, minio.GetObjectOptions{}); err != nil {
		s.t.Fatalf("download %s/%s: %v", bucket, key, err)
	}
}

// Uploads lists the multipart uploads in progress in bucket.
func (s *Server) Uploads(bucket string) []string {
	s.t.Helper()
	core := minio.Core{Client: s.Client()}
	res, err := core.ListMultipartUploads(context.Background(), bucket, "", "", "", "", 1000)
	if err != nil {
		s.t.Fatalf("list uploads: %v", err)
	}
	var out []string
	for _, u := range res.Uploads {
		out = append(out, u.Key+" "+u.UploadID)
	}
	return out
}

// Requests counts the requests of an S3 operation ("GetObject",
// "PutObject", "UploadPart", "HeadObject", ...) the server has answered,
// from its access log.
func (s *Server) Requests(op string) int {
	s.t.Helper()
	b, err := os.ReadFile(s.accessLog)
	if err != nil && !os.IsNotExist(err) {
		s.t.Fatal(err)
	}
	return bytes.Count(b, []byte(fmt.Sprintf(" s3_%s ", op)))
}
