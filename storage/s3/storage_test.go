package s3

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"io/fs"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/vdisk/vdisk/driver"
)

func randBytes(seed uint64, n int) []byte {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	b := make([]byte, n)
	rand.NewChaCha8(key).Read(b)
	return b
}

func TestParseName(t *testing.T) {
	for _, c := range []struct{ in, bucket, key string }{
		{"s3://b/k", "b", "k"},
		{"s3://b/dir/k.qcow2", "b", "dir/k.qcow2"},
		{"S3://b/", "b", ""},
	} {
		b, k, err := ParseName(c.in)
		if err != nil || b != c.bucket || k != c.key {
			t.Errorf("ParseName(%q) = %q, %q, %v", c.in, b, k, err)
		}
	}
	for _, bad := range []string{"s3://", "s3:///k", "nbd://x/y", "b/k"} {
		if _, _, err := ParseName(bad); err == nil {
			t.Errorf("ParseName(%q) accepted", bad)
		}
	}
}

func TestConfig(t *testing.T) {
	if _, err := parseConfig(map[string]string{"bogus": "1"}, nil); err == nil || !strings.Contains(err.Error(), "bogus") {
		t.Errorf("unknown option: %v", err)
	}
	if _, err := parseConfig(map[string]string{"endpoint": "http://example.com", "access-key-id": "a", "secret-access-key": "b"}, nil); err == nil {
		t.Error("plain http to a remote host accepted")
	}
	c, err := parseConfig(map[string]string{"endpoint": "http://example.com:9000", "insecure": "on", "access-key-id": "a", "secret-access-key": "b", "block-size": "64K", "part-size": "8M"}, nil)
	if err != nil || c.host != "example.com:9000" || c.secure || !c.custom || c.blockSize != 64<<10 || c.partSize != 8<<20 || c.region != "us-east-1" {
		t.Errorf("config %+v, %v", c, err)
	}
	if _, err := parseConfig(map[string]string{"part-size": "1M"}, nil); err == nil {
		t.Error("part size below S3's 5 MiB accepted")
	}
	var sm driver.SecretMap
	sm.Set("k", []byte("from-secret"))
	if _, err := parseConfig(map[string]string{"endpoint": "https://h", "access-key-id": "a", "secret": "k"}, &sm); err != nil {
		t.Errorf("secret: %v", err)
	}
	// The environment and a profile file, as every S3 tool reads them.
	dir := t.TempDir()
	file := dir + "/credentials"
	if err := writeTextFile(file, "[default]\naws_access_key_id = D\naws_secret_access_key = DS\n[other]\naws_access_key_id = O\naws_secret_access_key = OS\n"); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{"AWS_SHARED_CREDENTIALS_FILE": file, "AWS_PROFILE": "other", "AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_REGION": "eu-west-3"}
	old := getenv
	getenv = func(k string) string { return env[k] }
	defer func() { getenv = old }()
	c, err = parseConfig(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	v, _ := c.creds.GetWithContext(nil)
	if v.AccessKeyID != "O" || v.SecretAccessKey != "OS" || c.region != "eu-west-3" || c.host != "127.0.0.1:1" {
		t.Errorf("profile: %+v region %s host %s", v, c.region, c.host)
	}
	env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env["AWS_SESSION_TOKEN"] = "E", "ES", "T"
	c, _ = parseConfig(nil, nil)
	v, _ = c.creds.GetWithContext(nil)
	if v.AccessKeyID != "E" || v.SessionToken != "T" {
		t.Errorf("env keys: %+v", v)
	}
	env["AWS_PROFILE"] = "missing"
	delete(env, "AWS_ACCESS_KEY_ID")
	delete(env, "AWS_SECRET_ACCESS_KEY")
	if _, err := parseConfig(nil, nil); err == nil {
		t.Error("missing profile accepted")
	}
}

func TestExtents(t *testing.T) {
	var e extents
	e.add(10, 20)
	e.add(30, 40)
	e.add(20, 30)
	if len(e) != 1 || e[0] != [2]int64{10, 40} {
		t.Fatalf("%v", e)
	}
	e.add(0, 5)
	e.add(50, 60)
	e.add(3, 55)
	if len(e) != 1 || e[0] != [2]int64{0, 60} || !e.covers(0, 60) || e.covers(0, 61) {
		t.Fatalf("%v", e)
	}
	e.add(70, 80)
	e.trim(75)
	if !slices.Equal(e, extents{{0, 60}, {70, 75}}) {
		t.Fatalf("%v", e)
	}
	e.trim(0)
	if len(e) != 0 {
		t.Fatalf("%v", e)
	}
}

func TestReadObject(t *testing.T) {
	s := startServer(t)
	data := randBytes(1, 5<<20+1234)
	s.put("dir/a.raw", data)
	st := s.storage("block-size", "64K", "cache-blocks", "8")
	f, err := st.Open("dir/a.raw", driver.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if n, _ := f.Size(); n != int64(len(data)) {
		t.Fatalf("size %d", n)
	}
	if v := f.(driver.Versioned).Version(); v == "" {
		t.Error("no version (ETag)")
	}
	if _, ok := f.(driver.HoleSeeker); ok {
		t.Error("a raw object must not seek holes")
	}
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(2, uint64(g)))
			for i := 0; i < 50; i++ {
				off := r.Int64N(int64(len(data)))
				n := 1 + r.IntN(300<<10)
				buf := make([]byte, n)
				k, err := f.ReadAt(buf, off)
				want := data[off:min(off+int64(n), int64(len(data)))]
				if k != len(want) || !bytes.Equal(buf[:k], want) || (k < n && err != io.EOF) || (k == n && err != nil) {
					t.Errorf("ReadAt(%d, %d) = %d, %v", n, off, k, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	// A whole sequential pass.
	var got bytes.Buffer
	if _, err := io.Copy(&got, io.NewSectionReader(f, 0, int64(len(data)))); err != nil || !bytes.Equal(got.Bytes(), data) {
		t.Fatalf("sequential read: %v", err)
	}
	if _, err := f.WriteAt([]byte{1}, 0); !errors.Is(err, driver.ErrReadOnly) {
		t.Errorf("write to a read-only object: %v", err)
	}
	// Opened read-write, an existing object still cannot be rewritten.
	g, err := st.Open("dir/a.raw", driver.ReadWrite)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.WriteAt([]byte{1}, 0); !errors.Is(err, driver.ErrUnsupported) || !strings.Contains(err.Error(), "in place") {
		t.Errorf("write to an existing object: %v", err)
	}
	g.Close()
}

func TestStorageOps(t *testing.T) {
	s := startServer(t)
	st := s.storage()
	s.put("d/x", []byte("hello"))
	s.put("d/sub/y", []byte("world!"))
	fi, err := st.Stat("d/x")
	if err != nil || fi.Size != 5 || fi.IsDir {
		t.Fatalf("stat: %+v %v", fi, err)
	}
	if fi, err := st.Stat("d/sub"); err != nil || !fi.IsDir {
		t.Fatalf("stat dir: %+v %v", fi, err)
	}
	if _, err := st.Stat("d/none"); !errors.Is(err, driver.ErrNotFound) || !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), "s3://images/d/none") {
		t.Fatalf("stat missing: %v", err)
	}
	names, err := st.List("d")
	slices.Sort(names)
	if err != nil || !slices.Equal(names, []string{"sub", "x"}) {
		t.Fatalf("list: %v %v", names, err)
	}
	if err := st.Rename("d/x", "d/z"); err != nil {
		t.Fatal(err)
	}
	if s.exists("d/x") || string(s.get("d/z")) != "hello" {
		t.Fatal("rename")
	}
	if err := st.Remove("d/z"); err != nil || s.exists("d/z") {
		t.Fatalf("remove: %v", err)
	}
	if err := st.Remove("d/z"); !errors.Is(err, driver.ErrNotFound) {
		t.Fatalf("remove missing: %v", err)
	}
	if free, err := st.FreeSpace("d"); err != nil || free <= 1<<40 {
		t.Fatalf("free %d %v", free, err)
	}
	ex, err := st.ListExports(t.Context(), s3url("d/"))
	if err != nil || len(ex) != 1 || ex[0].URL != s3url("d/sub/y") {
		t.Fatalf("exports %+v %v", ex, err)
	}
	if _, err := st.Open("d/none", driver.ReadOnly); !errors.Is(err, driver.ErrNotFound) {
		t.Fatalf("open missing: %v", err)
	}
	if _, err := st.Open("d/sub/y", driver.ReadWrite|driver.Create|driver.Excl); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("excl: %v", err)
	}
}

// TestErrorsNameBucketAndKey: wrong credentials and a missing bucket are
// clear errors naming both.
func TestErrorsNameBucketAndKey(t *testing.T) {
	s := startServer(t)
	s.put("k.raw", []byte("x"))
	bad, err := New(testBucket, &driver.SchemeEnv{Options: s.opts("secret-access-key", "wrong-secret")})
	if err != nil {
		t.Fatal(err)
	}
	for _, flag := range []driver.OpenFlag{driver.ReadOnly, driver.ReadWrite | driver.Create | driver.Truncate} {
		_, err = bad.Open("k.raw", flag)
		if !errors.Is(err, fs.ErrPermission) || !strings.Contains(err.Error(), `bucket "images"`) || !strings.Contains(err.Error(), `key "k.raw"`) {
			t.Errorf("wrong secret, flag %v: %v", flag, err)
		}
	}
	nob, err := New("nobucket", s.env())
	if err != nil {
		t.Fatal(err)
	}
	for _, flag := range []driver.OpenFlag{driver.ReadOnly, driver.ReadWrite | driver.Create | driver.Truncate} {
		_, err = nob.Open("k.raw", flag)
		if !errors.Is(err, driver.ErrNotFound) || !strings.Contains(err.Error(), `bucket "nobucket" does not exist`) || !strings.Contains(err.Error(), "s3://nobucket/k.raw") {
			t.Errorf("missing bucket, flag %v: %v", flag, err)
		}
	}
	if _, err := bad.Stat("k.raw"); !errors.Is(err, fs.ErrPermission) {
		t.Errorf("stat, wrong secret: %v", err)
	}
}
