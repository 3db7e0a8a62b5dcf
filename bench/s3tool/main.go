// Command s3tool is bench/s3.sh's helper for the S3 server it starts: it
// makes a bucket, presigns a GET URL for qemu-img's curl driver, and serves
// the loopback proxy that driver needs in front of a presigned URL (its
// size probe is a HEAD, which a URL signed for GET does not allow: the
// proxy answers it from a one-byte ranged GET and passes GETs through).
//
//	s3tool mb BUCKET
//	s3tool presign BUCKET KEY
//	s3tool rm BUCKET KEY          (missing keys are not an error)
//	s3tool headproxy LISTEN-ADDR
//
// The server and credentials come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
// AWS_SECRET_ACCESS_KEY and AWS_REGION.
package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/vdisk/vdisk/storage/s3/s3test"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "s3tool:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) < 2 {
		return fmt.Errorf("usage: s3tool mb BUCKET | presign BUCKET KEY | rm BUCKET KEY | headproxy LISTEN-ADDR")
	}
	if args[0] == "headproxy" {
		return headProxy(args[1])
	}
	cl, err := client()
	if err != nil {
		return err
	}
	ctx := context.Background()
	switch {
	case args[0] == "mb":
		return cl.MakeBucket(ctx, args[1], minio.MakeBucketOptions{})
	case args[0] == "presign" && len(args) == 3:
		u, err := cl.PresignedGetObject(ctx, args[1], args[2], 24*time.Hour, nil)
		if err != nil {
			return err
		}
		fmt.Println(u.String())
		return nil
	case args[0] == "rm" && len(args) == 3:
		return cl.RemoveObject(ctx, args[1], args[2], minio.RemoveObjectOptions{})
	}
	return fmt.Errorf("unknown command %q", strings.Join(args, " "))
}

func client() (*minio.Client, error) {
	ep, err := url.Parse(os.Getenv("AWS_ENDPOINT_URL"))
	if err != nil || ep.Host == "" {
		return nil, fmt.Errorf("AWS_ENDPOINT_URL %q is not an http(s) URL", os.Getenv("AWS_ENDPOINT_URL"))
	}
	region := os.Getenv("AWS_REGION")
	if region == "" {
		region = "us-east-1"
	}
	return minio.New(ep.Host, &minio.Options{
		Creds:        credentials.NewStaticV4(os.Getenv("AWS_ACCESS_KEY_ID"), os.Getenv("AWS_SECRET_ACCESS_KEY"), ""),
		Secure:       ep.Scheme == "https",
		Region:       region,
		BucketLookup: minio.BucketLookupPath,
	})
}

// headProxy forwards every request to the endpoint, answering a HEAD with
// the size a one-byte ranged GET reports.
func headProxy(listen string) error {
	ep, err := url.Parse(os.Getenv("AWS_ENDPOINT_URL"))
	if err != nil || ep.Host == "" {
		return fmt.Errorf("AWS_ENDPOINT_URL %q is not an http(s) URL", os.Getenv("AWS_ENDPOINT_URL"))
	}
	l, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	tr := &http.Transport{MaxIdleConnsPerHost: 64, DisableCompression: true}
	return http.Serve(l, s3test.HeadProxy(ep.Scheme+"://"+ep.Host, tr))
}
