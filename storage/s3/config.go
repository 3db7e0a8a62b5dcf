package s3

import (
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/vdisk/vdisk/driver"
)

// Options are the keys driver.SchemeEnv.Options may carry; each overrides
// the matching environment variable or default.
//
//	endpoint=URL            AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL
//	region=NAME             AWS_REGION / AWS_DEFAULT_REGION
//	profile=NAME            AWS_PROFILE (section of the credentials file)
//	credentials-file=PATH   AWS_SHARED_CREDENTIALS_FILE
//	access-key-id=ID        AWS_ACCESS_KEY_ID
//	secret-access-key=KEY   AWS_SECRET_ACCESS_KEY
//	secret=ID               the secret access key from driver.Secrets
//	session-token=TOKEN     AWS_SESSION_TOKEN
//	insecure=on             allow plain http:// to a non-loopback endpoint
//	block-size=BYTES        read block (default 1 MiB, 4 KiB..64 MiB)
//	cache-blocks=N          blocks kept in memory per open file (default 16)
//	read-ahead=N            blocks fetched ahead of sequential reads (default 4)
//	parallel=N              concurrent GETs of one file (default 8)
//	part-size=BYTES         first multipart part size (default 8 MiB, 5 MiB..1 GiB)
//	mem-parts=N             parts held in memory while writing (default 4)
//	retries=N               attempts per request (default 5)
//	spill=auto|all          all: every part leaves memory for the local
//	                        temporary file and is uploaded at Close, so
//	                        any write pattern works (formats written at
//	                        random: vdi, vhdx, qed, ...) at the cost of
//	                        local disk space (default auto)
var Options = []string{
	"endpoint", "region", "profile", "credentials-file", "access-key-id",
	"secret-access-key", "secret", "session-token", "insecure", "block-size",
	"cache-blocks", "read-ahead", "parallel", "part-size", "mem-parts", "retries", "spill",
}

// config is a storage's settled configuration.
type config struct {
	host      string // endpoint host[:port]
	secure    bool
	loopback  bool // the endpoint is a loopback address
	custom    bool // a custom endpoint: path-style addressing
	region    string
	creds     *credentials.Credentials
	blockSize int64
	cacheBlks int
	readAhead int
	parallel  int
	partSize  int64
	memParts  int
	retries   int
	spillAll  bool
}

const (
	defaultBlockSize = 1 << 20
	defaultPartSize  = 8 << 20
	minPartSize      = 5 << 20 // S3's minimum for every part but the last
	maxParts         = 10000   // S3's limit of parts in one upload
)

// getenv is os.Getenv (tests replace it).
var getenv = os.Getenv

// parseConfig reads the environment and opts.
func parseConfig(opts map[string]string, secrets driver.Secrets) (*config, error) {
	known := map[string]bool{}
	for _, k := range Options {
		known[k] = true
	}
	for k := range opts {
		if !known[k] {
			return nil, driver.OptionErrorf("s3: unknown option %q (known: %s)", k, strings.Join(Options, ", "))
		}
	}
	pick := func(key string, envs ...string) string {
		if v, ok := opts[key]; ok {
			return v
		}
		for _, e := range envs {
			if v := getenv(e); v != "" {
				return v
			}
		}
		return ""
	}
	c := &config{}
	var err error
	if c.blockSize, err = sizeOpt(opts, "block-size", defaultBlockSize, 4<<10, 64<<20); err != nil {
		return nil, err
	}
	if c.partSize, err = sizeOpt(opts, "part-size", defaultPartSize, minPartSize, 1<<30); err != nil {
		return nil, err
	}
	ints := []struct {
		key      string
		dst      *int
		def, min int
		max      int
	}{
		{"cache-blocks", &c.cacheBlks, 16, 1, 1024},
		{"read-ahead", &c.readAhead, 4, 0, 256},
		{"parallel", &c.parallel, 8, 1, 64},
		{"mem-parts", &c.memParts, 4, 2, 64},
		{"retries", &c.retries, 5, 1, 20},
	}
	for _, o := range ints {
		v, err := sizeOpt(opts, o.key, int64(o.def), int64(o.min), int64(o.max))
		if err != nil {
			return nil, err
		}
		*o.dst = int(v)
	}
	// Read-ahead lives in the cache: keep room for the blocks being read.
	c.readAhead = min(c.readAhead, c.cacheBlks/2)

	switch v := opts["spill"]; v {
	case "", "auto":
	case "all":
		c.spillAll = true
	default:
		return nil, driver.OptionErrorf("s3: spill=%q is not auto or all", v)
	}
	insecure := false
	if v, ok := opts["insecure"]; ok {
		switch v {
		case "on", "true", "yes", "1":
			insecure = true
		case "off", "false", "no", "0":
		default:
			return nil, driver.OptionErrorf("s3: insecure=%q is not on or off", v)
		}
	}
	if err := c.setEndpoint(pick("endpoint", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"), insecure); err != nil {
		return nil, err
	}
	c.region = pick("region", "AWS_REGION", "AWS_DEFAULT_REGION")
	if c.region == "" && c.custom {
		c.region = "us-east-1"
	}
	if err := c.setCredentials(opts, pick, secrets); err != nil {
		return nil, err
	}
	return c, nil
}

// sizeOpt parses opts[key] (a byte count with an optional K/M/G suffix or
// a plain integer) bounded to [lo, hi].
func sizeOpt(opts map[string]string, key string, def, lo, hi int64) (int64, error) {
	s, ok := opts[key]
	if !ok {
		return def, nil
	}
	mult := int64(1)
	if n := len(s); n > 0 {
		switch s[n-1] {
		case 'k', 'K':
			mult, s = 1<<10, s[:n-1]
		case 'm', 'M':
			mult, s = 1<<20, s[:n-1]
		case 'g', 'G':
			mult, s = 1<<30, s[:n-1]
		}
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil || v < 0 || v > hi/mult || v*mult < lo {
		return 0, driver.OptionErrorf("s3: %s=%q must be a number in [%d, %d]", key, opts[key], lo, hi)
	}
	return v * mult, nil
}

// setEndpoint settles the host and scheme. Without an endpoint it is AWS
// itself (virtual-host addressing, chosen by minio-go).
func (c *config) setEndpoint(endpoint string, insecure bool) error {
	if endpoint == "" {
		c.host, c.secure = "s3.amazonaws.com", true
		return nil
	}
	if !strings.Contains(endpoint, "://") {
		endpoint = "https://" + endpoint
	}
	u, err := url.Parse(endpoint)
	if err != nil || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.User != nil {
		return driver.OptionErrorf("s3: endpoint %q is not a URL like https://host[:port]", endpoint)
	}
	switch u.Scheme {
	case "https":
		c.secure = true
	case "http":
		// Credentials are not sent over http (requests are signed), but
		// the data is neither private nor authenticated on the wire.
		if !insecure && !isLoopback(u.Hostname()) {
			return driver.OptionErrorf("s3: endpoint %s uses plain http to a host that is not loopback (use https, or insecure=on)", endpoint)
		}
	default:
		return driver.OptionErrorf("s3: endpoint %q must be http:// or https://", endpoint)
	}
	c.host, c.custom, c.loopback = u.Host, true, isLoopback(u.Hostname())
	return nil
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// setCredentials picks static keys (options, then the environment), else
// the profile of the shared credentials file, else anonymous access.
func (c *config) setCredentials(opts map[string]string, pick func(string, ...string) string, secrets driver.Secrets) error {
	id := pick("access-key-id", "AWS_ACCESS_KEY_ID")
	key := pick("secret-access-key", "AWS_SECRET_ACCESS_KEY")
	token := pick("session-token", "AWS_SESSION_TOKEN")
	if sid, ok := opts["secret"]; ok {
		b, err := driver.LookupSecret(secrets, sid)
		if err != nil {
			return err
		}
		key = string(b)
		driver.Wipe(b)
	}
	if id != "" || key != "" {
		if id == "" || key == "" {
			return driver.OptionErrorf("s3: an access key id needs its secret access key and the other way round")
		}
		c.creds = credentials.NewStaticV4(id, key, token)
		return nil
	}
	file := pick("credentials-file", "AWS_SHARED_CREDENTIALS_FILE")
	profile := pick("profile", "AWS_PROFILE")
	if file == "" {
		if home, err := os.UserHomeDir(); err == nil {
			file = filepath.Join(home, ".aws", "credentials")
		}
	}
	if file != "" {
		if _, err := os.Stat(file); err == nil {
			if profile == "" {
				profile = "default"
			}
			fc := credentials.NewFileAWSCredentials(file, profile)
			if _, err := fc.GetWithContext(nil); err != nil {
				return driver.OptionErrorf("s3: profile %q in %s: %v", profile, file, err)
			}
			c.creds = fc
			return nil
		}
	}
	if profile != "" {
		return driver.OptionErrorf("s3: profile %q given but no credentials file %s", profile, file)
	}
	// Anonymous: public buckets.
	c.creds = credentials.NewStatic("", "", "", credentials.SignatureAnonymous)
	return nil
}

// newClient builds the minio client: its transport dials through dial.
func (c *config) newClient(dial driver.Dialer) (*minio.Client, *http.Transport, error) {
	tr := &http.Transport{
		DialContext:           dial.Dial,
		MaxIdleConns:          64,
		MaxIdleConnsPerHost:   c.parallel + 4,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   15 * time.Second,
		ResponseHeaderTimeout: 2 * time.Minute,
		ExpectContinueTimeout: time.Second,
		// Ranged GETs of disk blocks: compression would only cost CPU.
		DisableCompression: true,
	}
	lookup := minio.BucketLookupAuto
	if c.custom {
		lookup = minio.BucketLookupPath
	}
	cl, err := minio.New(c.host, &minio.Options{
		Creds:        c.creds,
		Secure:       c.secure,
		Transport:    tr,
		Region:       c.region,
		BucketLookup: lookup,
		// Retries are this package's (bounded, with backoff, also over
		// a body cut short); minio-go's own loop only gets a second try
		// (for a region redirect).
		MaxRetries: 2,
	})
	if err != nil {
		return nil, nil, driver.OptionErrorf("s3: endpoint %s: %v", c.host, err)
	}
	return cl, tr, nil
}
