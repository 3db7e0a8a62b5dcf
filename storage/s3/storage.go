package s3

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/http"
	"path"
	"strings"
	"sync"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/backoff"
	"github.com/vdisk/vdisk/internal/bufpool"
)

func init() {
	driver.RegisterScheme("s3", openScheme)
}

// Storage is the objects of one bucket; names are keys.
type Storage struct {
	bucket string
	cfg    *config
	cl     *minio.Client
	tr     *http.Transport // the client's, for CloseStorage
	core   minio.Core
	log    *slog.Logger

	mu      sync.Mutex
	writers map[string]*writeFile // uploads in progress, by key

	blocks bufpool.Pool // readers' cached blocks, of cfg.blockSize bytes
}

// getBlock returns a buffer of n bytes for a reader's block, pooled when
// n is the block size (every block but an object's last).
func (s *Storage) getBlock(n int64) []byte {
	if n == s.cfg.blockSize {
		return s.blocks.Get()
	}
	return make([]byte, n)
}

var (
	_ driver.Storage       = (*Storage)(nil)
	_ driver.Lister        = (*Storage)(nil)
	_ driver.StorageCloser = (*Storage)(nil)
)

// openScheme is the driver.SchemeOpener of "s3": it builds the client (no
// I/O yet) and returns the bucket's storage and the key.
func openScheme(ctx context.Context, name string, env *driver.SchemeEnv) (driver.Storage, string, error) {
	bucket, key, err := ParseName(name)
	if err != nil {
		return nil, "", err
	}
	if env == nil {
		env = &driver.SchemeEnv{}
	}
	st, err := New(bucket, env)
	if err != nil {
		return nil, "", err
	}
	return st, key, nil
}

// ParseName splits "s3://BUCKET/KEY".
func ParseName(name string) (bucket, key string, err error) {
	rest, ok := strings.CutPrefix(name, "s3://")
	if !ok {
		if i := strings.Index(name, "://"); i > 0 && strings.EqualFold(name[:i], "s3") {
			rest, ok = name[i+3:], true
		}
	}
	if !ok {
		return "", "", driver.OptionErrorf("s3: %q is not an s3://BUCKET/KEY name", name)
	}
	bucket, key, _ = strings.Cut(rest, "/")
	if bucket == "" || strings.ContainsAny(bucket, "?#\\ ") {
		return "", "", driver.OptionErrorf("s3: %q does not name a bucket (s3://BUCKET/KEY)", name)
	}
	return bucket, key, nil
}

// New returns the storage of bucket configured from env (Options, the
// process environment, the credentials file) dialling through env.Dialer.
func New(bucket string, env *driver.SchemeEnv) (*Storage, error) {
	if env == nil {
		env = &driver.SchemeEnv{}
	}
	cfg, err := parseConfig(env.Options, env.Secrets)
	if err != nil {
		return nil, err
	}
	cl, tr, err := cfg.newClient(env.Dialer)
	if err != nil {
		return nil, err
	}
	st := &Storage{bucket: bucket, cfg: cfg, cl: cl, tr: tr, core: minio.Core{Client: cl}, log: env.Log(), writers: map[string]*writeFile{}}
	st.blocks.Size = int(cfg.blockSize)
	return st, nil
}

// CloseStorage implements driver.StorageCloser: the client's idle
// connections are closed (the container calls it when the last image on
// the storage closes). An upload still in progress is not touched; the
// storage stays usable and dials again when used.
func (s *Storage) CloseStorage() error {
	s.tr.CloseIdleConnections()
	return nil
}

// retry runs fn until it succeeds, fails for good (!retryable), the
// configured attempts (retries=) run out, or ctx ends: waits from 100ms,
// doubling up to 2s, with jitter.
func (s *Storage) retry(ctx context.Context, op, key string, off int64, fn func() error) error {
	p := backoff.Policy{
		Initial:  100 * time.Millisecond,
		Max:      2 * time.Second,
		Attempts: s.cfg.retries,
		Total:    time.Duration(s.cfg.retries) * 3 * time.Second,
	}
	notify := func(attempt int, err error, wait time.Duration) {
		s.log.Debug("s3: retrying", "op", op, "object", s.url(key), "offset", off, "attempt", attempt+1, "wait", wait, "error", err)
	}
	return backoff.Retry(ctx, p, func(err error) bool { return !retryable(err) }, notify,
		func(context.Context, int) error { return fn() })
}

// url is the name of key for messages.
func (s *Storage) url(key string) string { return "s3://" + s.bucket + "/" + key }

// key cleans a name: keys have no leading slash.
func cleanKey(name string) string { return strings.TrimLeft(name, "/") }

// Client is the underlying minio client (tests use it to presign URLs
// and to inspect uploads).
func (s *Storage) Client() *minio.Client { return s.cl }

// Bucket is the storage's bucket.
func (s *Storage) Bucket() string { return s.bucket }

// errNotFound matches both driver.ErrNotFound and fs.ErrNotExist.
var errNotFound = fmt.Errorf("%w: %w", driver.ErrNotFound, fs.ErrNotExist)

// errNoBucket is errNotFound for a missing bucket.
var errNoBucket = fmt.Errorf("%w: no such bucket", errNotFound)

// ErrChanged is wrapped by reads of an object that was replaced after it
// was opened.
var ErrChanged = errors.New("object changed since it was opened")

// classify turns a minio error into a driver error naming bucket and key.
func (s *Storage) classify(op, key string, off int64, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return &driver.Error{Op: op, File: s.url(key), Offset: off, Err: err}
	}
	var de *driver.Error
	if errors.As(err, &de) {
		return err
	}
	r := errResponse(err)
	switch {
	case r.Code == "NoSuchBucket":
		return &driver.Error{Op: op, File: s.url(key), Offset: off, Reason: fmt.Sprintf("bucket %q does not exist", s.bucket), Err: errNoBucket}
	case r.Code == "NoSuchKey" || r.Code == "NoSuchUpload" || r.StatusCode == http.StatusNotFound:
		return &driver.Error{Op: op, File: s.url(key), Offset: off, Reason: fmt.Sprintf("no object %q in bucket %q", key, s.bucket), Err: errNotFound}
	case r.Code == "PreconditionFailed" || r.StatusCode == http.StatusPreconditionFailed:
		return &driver.Error{Op: op, File: s.url(key), Offset: off, Reason: "the object was replaced after it was opened", Err: ErrChanged}
	case r.Code == "AccessDenied" || r.Code == "InvalidAccessKeyId" || r.Code == "SignatureDoesNotMatch" ||
		r.StatusCode == http.StatusForbidden || r.StatusCode == http.StatusUnauthorized:
		return &driver.Error{Op: op, File: s.url(key), Offset: off, Reason: fmt.Sprintf("access to bucket %q key %q denied: check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and region (%s)", s.bucket, key, r.Code), Err: fs.ErrPermission}
	}
	return &driver.Error{Op: op, File: s.url(key), Offset: off, Reason: fmt.Sprintf("bucket %q key %q", s.bucket, key), Err: err}
}

// statObject is a HEAD of key; a missing object in a missing bucket is
// reported as the missing bucket (a HEAD has no body to say which).
func (s *Storage) statObject(ctx context.Context, op, key string) (minio.ObjectInfo, error) {
	oi, err := s.cl.StatObject(ctx, s.bucket, key, minio.StatObjectOptions{})
	if err == nil {
		return oi, nil
	}
	err = s.classify(op, key, -1, err)
	if errors.Is(err, driver.ErrNotFound) {
		if ok, berr := s.cl.BucketExists(ctx, s.bucket); berr == nil && !ok {
			return oi, &driver.Error{Op: op, File: s.url(key), Offset: -1, Reason: fmt.Sprintf("bucket %q does not exist", s.bucket), Err: errNoBucket}
		} else if berr != nil {
			return oi, s.classify(op, key, -1, berr)
		}
	}
	return oi, err
}

// Open implements driver.Storage. ReadOnly, and ReadWrite alone on an
// existing object, give a reader pinned to the object's current ETag,
// whose writes fail: objects cannot be changed in place. Create or
// Truncate give a writer that becomes the object at Close: on an existing
// object (Create without Excl: an image created over an old one) the old
// object is replaced whole, and stays readable as it was until the new
// one is complete (an upload that fails is aborted and leaves it).
func (s *Storage) Open(name string, flag driver.OpenFlag) (driver.File, error) {
	key := cleanKey(name)
	if key == "" || strings.HasSuffix(key, "/") {
		return nil, driver.Errorf(driver.ErrInvalidOption, s.url(key), -1, "not an object key")
	}
	ctx := context.Background()
	rw := flag&driver.ReadWrite != 0
	if flag&(driver.Truncate|driver.Create) != 0 && !rw {
		return nil, driver.Errorf(driver.ErrInvalidOption, s.url(key), -1, "open: Create and Truncate require ReadWrite")
	}
	// The HEAD also proves the bucket and the credentials before any
	// upload starts, with a clear error.
	oi, err := s.statObject(ctx, "open", key)
	missing := errors.Is(err, errNotFound) && !errors.Is(err, errNoBucket)
	if err != nil && !missing {
		return nil, err
	}
	if rw && flag&(driver.Truncate|driver.Create) != 0 {
		if err == nil && flag&driver.Excl != 0 {
			return nil, driver.Errorf(fs.ErrExist, s.url(key), -1, "object exists")
		}
		return s.newWriter(key)
	}
	if missing {
		return nil, err
	}
	return s.newReader(key, oi, rw), nil
}

// Stat implements driver.Storage: an object, an upload this storage has in
// progress, or a "directory" (a prefix other keys share).
func (s *Storage) Stat(name string) (driver.FileInfo, error) {
	key := cleanKey(name)
	s.mu.Lock()
	w := s.writers[key]
	s.mu.Unlock()
	if w != nil {
		n, _ := w.Size()
		return driver.FileInfo{Name: path.Base(key), Size: n, Allocated: -1}, nil
	}
	ctx := context.Background()
	if key == "" {
		return driver.FileInfo{Name: "/", IsDir: true, Allocated: -1}, nil
	}
	oi, err := s.statObject(ctx, "stat", key)
	if err == nil {
		return driver.FileInfo{Name: path.Base(key), Size: oi.Size, Allocated: oi.Size, ModTime: oi.LastModified}, nil
	}
	if errors.Is(err, driver.ErrNotFound) {
		prefix := strings.TrimSuffix(key, "/") + "/"
		for o := range s.cl.ListObjects(ctx, s.bucket, minio.ListObjectsOptions{Prefix: prefix, MaxKeys: 1}) {
			if o.Err == nil {
				return driver.FileInfo{Name: path.Base(key), IsDir: true, Allocated: -1}, nil
			}
			break
		}
	}
	return driver.FileInfo{}, err
}

// Remove deletes an object; an upload in progress to that key is aborted.
func (s *Storage) Remove(name string) error {
	key := cleanKey(name)
	s.mu.Lock()
	w := s.writers[key]
	s.mu.Unlock()
	if w != nil {
		w.abort(driver.Errorf(driver.ErrClosed, s.url(key), -1, "removed while being written"))
		return nil
	}
	ctx := context.Background()
	if _, err := s.statObject(ctx, "remove", key); err != nil {
		return err
	}
	return s.classify("remove", key, -1, s.cl.RemoveObject(ctx, s.bucket, key, minio.RemoveObjectOptions{}))
}

// Rename copies the object on the server and deletes the old one (S3 has
// no rename). Copies larger than 5 GiB are done part by part.
func (s *Storage) Rename(oldName, newName string) error {
	from, to := cleanKey(oldName), cleanKey(newName)
	ctx := context.Background()
	if _, err := s.statObject(ctx, "rename", from); err != nil {
		return err
	}
	_, err := s.cl.ComposeObject(ctx,
		minio.CopyDestOptions{Bucket: s.bucket, Object: to},
		minio.CopySrcOptions{Bucket: s.bucket, Object: from})
	if err != nil {
		return s.classify("rename", to, -1, err)
	}
	return s.classify("rename", from, -1, s.cl.RemoveObject(ctx, s.bucket, from, minio.RemoveObjectOptions{}))
}

// FreeSpace implements driver.Storage: an object store has no size limit
// worth reporting.
func (s *Storage) FreeSpace(string) (int64, error) { return 1 << 60, nil }

// List returns the base names under dir (objects and common prefixes).
func (s *Storage) List(dir string) ([]string, error) {
	prefix := strings.TrimSuffix(cleanKey(dir), "/")
	if prefix != "" {
		prefix += "/"
	}
	var out []string
	for o := range s.cl.ListObjects(context.Background(), s.bucket, minio.ListObjectsOptions{Prefix: prefix}) {
		if o.Err != nil {
			return nil, s.classify("list", prefix, -1, o.Err)
		}
		n := strings.TrimSuffix(strings.TrimPrefix(o.Key, prefix), "/")
		if n != "" {
			out = append(out, n)
		}
	}
	return out, nil
}

// ListExports implements driver.Lister: the objects under the key prefix
// of name (every key in the bucket for s3://BUCKET/).
func (s *Storage) ListExports(ctx context.Context, name string) ([]driver.ExportEntry, error) {
	prefix := ""
	if _, key, err := ParseName(name); err == nil {
		prefix = key
	} else {
		prefix = cleanKey(name)
	}
	var out []driver.ExportEntry
	for o := range s.cl.ListObjects(ctx, s.bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true}) {
		if o.Err != nil {
			return nil, s.classify("list", prefix, -1, o.Err)
		}
		out = append(out, driver.ExportEntry{Name: o.Key, Description: fmt.Sprintf("%d bytes", o.Size), URL: s.url(o.Key)})
	}
	return out, nil
}

func (s *Storage) addWriter(key string, w *writeFile) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.writers[key] = w
}

func (s *Storage) dropWriter(key string, w *writeFile) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.writers[key] == w {
		delete(s.writers, key)
	}
}
