package nbdstore

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/internal/backoff"
	"github.com/vdisk/vdisk/nbd"
)

func init() {
	for _, s := range []string{"nbd", "nbd+unix", "nbds", "nbds+unix"} {
		driver.RegisterScheme(s, openScheme)
	}
}

// Storage options (driver.SchemeEnv.Options); the names are qemu's where
// its nbd driver has the setting.
const (
	// OptTLSCreds is a directory in qemu's tls-creds-x509 layout.
	OptTLSCreds = "tls-creds"
	// OptTLSHostname is the name the server's certificate must carry
	// (default: the URL's host; "localhost" for Unix sockets).
	OptTLSHostname = "tls-hostname"
	// OptTLSPSK asks for TLS-PSK, which Go cannot do.
	OptTLSPSK = "tls-creds-psk"
	// OptMultiConn is the number of connections used when the server
	// allows multi-conn (default 4; 1 keeps one connection).
	OptMultiConn = "multi-conn"
	// OptReconnectDelay is how long (seconds) a dropped connection is
	// redialled before requests fail (default 5; 0: no reconnect).
	OptReconnectDelay = "reconnect-delay"
	// OptOpenTimeout bounds dialling and negotiating (seconds, default 10).
	OptOpenTimeout = "open-timeout"
	// OptOpenRetry is how long (seconds) an open whose first connection
	// fails for a transient reason (refused, reset, cut during the
	// handshake: a server restarting) is retried with backoff (default
	// 10; 0: one attempt).
	OptOpenRetry = "open-retry"
	// OptRequestTimeout bounds each request (seconds, default 60; 0: none).
	OptRequestTimeout = "request-timeout"
	// OptAllocationDepth ("on", default, or "off") asks for the
	// qemu:allocation-depth context besides base:allocation, where the
	// server offers it: zero ranges that no layer of the server's chain
	// holds are then reported unallocated (driver.AllocationReporter).
	OptAllocationDepth = "allocation-depth"
)

// config is what a storage's connections are made with.
type config struct {
	t              *target
	dialer         driver.Dialer
	tls            *tls.Config
	log            *slog.Logger
	multiConn      int
	reconnect      time.Duration
	openRetry      time.Duration
	openTimeout    time.Duration
	requestTimeout time.Duration
	allocDepth     bool
}

func newConfig(name string, env *driver.SchemeEnv) (*config, error) {
	if env == nil {
		env = &driver.SchemeEnv{}
	}
	t, err := parseURL(name)
	if err != nil {
		return nil, err
	}
	c := &config{t: t, dialer: env.Dialer, log: env.Log(), multiConn: 4, reconnect: 5 * time.Second,
		openRetry: 10 * time.Second, openTimeout: 10 * time.Second, requestTimeout: 60 * time.Second, allocDepth: true}
	opts := env.Options
	for k := range opts {
		switch k {
		case OptTLSCreds, OptTLSHostname, OptTLSPSK, OptMultiConn, OptReconnectDelay, OptOpenRetry, OptOpenTimeout, OptRequestTimeout, OptAllocationDepth:
		default:
			return nil, driver.Errorf(driver.ErrInvalidOption, name, -1, "unknown NBD storage option %q", k)
		}
	}
	switch v := opts[OptAllocationDepth]; v {
	case "", "on":
	case "off":
		c.allocDepth = false
	default:
		return nil, driver.Errorf(driver.ErrInvalidOption, name, -1, "%s=%q: want on or off", OptAllocationDepth, v)
	}
	if v, ok := opts[OptMultiConn]; ok {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 64 {
			return nil, driver.Errorf(driver.ErrInvalidOption, name, -1, "%s=%q: want a number of connections from 1 to 64", OptMultiConn, v)
		}
		c.multiConn = n
	}
	for _, d := range []struct {
		key string
		dst *time.Duration
	}{{OptReconnectDelay, &c.reconnect}, {OptOpenRetry, &c.openRetry}, {OptOpenTimeout, &c.openTimeout}, {OptRequestTimeout, &c.requestTimeout}} {
		v, ok := opts[d.key]
		if !ok {
			continue
		}
		f, err := strconv.ParseFloat(v, 64)
		if err != nil || f < 0 || f > 1e6 {
			return nil, driver.Errorf(driver.ErrInvalidOption, name, -1, "%s=%q: want seconds", d.key, v)
		}
		*d.dst = time.Duration(f * float64(time.Second))
	}
	if _, ok := opts[OptTLSPSK]; ok {
		return nil, driver.Unsupportedf(name, "TLS-PSK is not available: Go's crypto/tls has no PSK cipher suites (golang/go#6379); use x509 credentials (%s=DIR)", OptTLSCreds)
	}
	dir, hasCreds := opts[OptTLSCreds]
	if hasCreds && !t.tls {
		return nil, driver.Errorf(driver.ErrInvalidOption, name, -1, "%s is given but the URL is not nbds:// or nbds+unix://", OptTLSCreds)
	}
	if t.tls {
		if !hasCreds {
			return nil, driver.Errorf(driver.ErrInvalidOption, name, -1, "an nbds URL needs x509 credentials: storage option %s=DIR (ca-cert.pem, client-cert.pem, client-key.pem)", OptTLSCreds)
		}
		if _, err := os.Stat(filepath.Join(dir, nbd.CredsCACert)); err != nil {
			if _, perr := os.Stat(filepath.Join(dir, "keys.psk")); perr == nil {
				return nil, driver.Unsupportedf(name, "%s holds TLS-PSK keys (keys.psk): Go's crypto/tls has no PSK cipher suites (golang/go#6379); use x509 credentials", dir)
			}
			return nil, &driver.Error{Op: "open", File: name, Offset: -1, Reason: "no CA certificate in " + OptTLSCreds + " directory", Err: err}
		}
		host := opts[OptTLSHostname]
		if host == "" {
			host = t.host
		}
		if host == "" {
			host = "localhost"
		}
		cfg, err := nbd.ClientTLSCreds(dir, host)
		if err != nil {
			return nil, &driver.Error{Op: "open", File: name, Offset: -1, Reason: "TLS credentials", Err: err}
		}
		c.tls = cfg
	}
	return c, nil
}

// openScheme is the driver.SchemeOpener of the NBD schemes. It only
// parses: Open connects.
func openScheme(ctx context.Context, name string, env *driver.SchemeEnv) (driver.Storage, string, error) {
	c, err := newConfig(name, env)
	if err != nil {
		return nil, "", err
	}
	return &Storage{cfg: c}, name, nil
}

// New returns the storage for an NBD URL (what the registered schemes
// do); env may be nil.
func New(name string, env *driver.SchemeEnv) (*Storage, error) {
	c, err := newConfig(name, env)
	if err != nil {
		return nil, err
	}
	return &Storage{cfg: c}, nil
}

// Storage is an NBD server reached through one URL. Its files are the
// server's exports. It keeps track of the files it opened, so that
// CloseStorage closes every connection still open.
type Storage struct {
	cfg *config

	mu    sync.Mutex
	files map[*File]struct{} // open files
}

var _ driver.StorageCloser = (*Storage)(nil)

// CloseStorage implements driver.StorageCloser: the files opened from the
// storage that are still open (a driver that forgot one) are closed with
// their connections, so none outlives the last image on the storage. The
// storage stays usable: a later Open connects again.
func (s *Storage) CloseStorage() error {
	s.mu.Lock()
	files := s.files
	s.files = nil
	s.mu.Unlock()
	for f := range files {
		s.cfg.log.Debug("nbd: closing a file left open at storage close", "url", f.Name())
		f.Close()
	}
	return nil
}

// track records f as open until it closes.
func (s *Storage) track(f *File) {
	s.mu.Lock()
	if s.files == nil {
		s.files = map[*File]struct{}{}
	}
	s.files[f] = struct{}{}
	s.mu.Unlock()
	f.onClose = func() {
		s.mu.Lock()
		delete(s.files, f)
		s.mu.Unlock()
	}
}

// target returns the target for name: the storage's URL, or another
// export of the same server named bare.
func (s *Storage) target(name string) (*target, error) {
	if name == s.cfg.t.url || name == "" {
		return s.cfg.t, nil
	}
	if driver.IsURL(name) {
		t, err := parseURL(name)
		if err != nil {
			return nil, err
		}
		if t.scheme != s.cfg.t.scheme || t.addr != s.cfg.t.addr {
			return nil, driver.Errorf(driver.ErrInvalidOption, name, -1, "not on the NBD server of %s", s.cfg.t.url)
		}
		return t, nil
	}
	t := *s.cfg.t
	t.export = name
	t.url = t.exportURL(name)
	return &t, nil
}

// Open connects to the export.
func (s *Storage) Open(name string, flag driver.OpenFlag) (driver.File, error) {
	t, err := s.target(name)
	if err != nil {
		return nil, err
	}
	if flag&driver.Excl != 0 {
		return nil, driver.Errorf(driver.ErrUnsupported, t.url, -1, "an NBD export always exists: it cannot be created (convert -n writes into it)")
	}
	f, err := openFile(s.cfg, t, flag&driver.ReadWrite != 0)
	if err != nil {
		return nil, err
	}
	s.track(f)
	return f, nil
}

// Stat connects to learn the export's size.
func (s *Storage) Stat(name string) (driver.FileInfo, error) {
	f, err := s.Open(name, driver.ReadOnly)
	if err != nil {
		return driver.FileInfo{}, err
	}
	defer f.Close()
	n, _ := f.Size()
	return driver.FileInfo{Name: f.Name(), Size: n, Allocated: -1}, nil
}

// Remove is refused: exports are the server's.
func (s *Storage) Remove(name string) error {
	return driver.Unsupportedf(name, "NBD exports cannot be removed through the protocol")
}

// Rename is refused: exports are the server's.
func (s *Storage) Rename(oldName, newName string) error {
	return driver.Unsupportedf(oldName, "NBD exports cannot be renamed through the protocol")
}

// FreeSpace is unknown over NBD.
func (s *Storage) FreeSpace(name string) (int64, error) {
	return 0, driver.Unsupportedf(name, "NBD has no free-space query")
}

// List returns the server's export names (NBD_OPT_LIST).
func (s *Storage) List(dir string) ([]string, error) {
	l, err := s.ListExports(context.Background(), s.cfg.t.url)
	if err != nil {
		return nil, err
	}
	out := make([]string, len(l))
	for i, e := range l {
		out[i] = e.Name
	}
	return out, nil
}

// ListExports implements driver.Lister with NBD_OPT_LIST.
func (s *Storage) ListExports(ctx context.Context, name string) ([]driver.ExportEntry, error) {
	t := s.cfg.t
	if name != "" && name != t.url {
		var err error
		if t, err = parseURL(name); err != nil {
			return nil, err
		}
	}
	var l []nbd.ExportInfo
	listOnce := func(ctx context.Context, _ int) error {
		ctx, cancel := context.WithTimeout(ctx, s.cfg.openTimeout)
		defer cancel()
		nc, err := s.cfg.dialer.Dial(ctx, t.network, t.addr)
		if err != nil {
			return err
		}
		defer nc.Close()
		setDeadline(ctx, nc)
		stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Now()) })
		defer stop()
		l, err = nbd.ListExports(nc, s.cfg.tls)
		if err != nil {
			return fmt.Errorf("NBD_OPT_LIST: %w", err)
		}
		return nil
	}
	// A server restarting is waited for as at open.
	if err := backoff.Retry(ctx, retryPolicy(s.cfg.openRetry), openPermanent, nil, listOnce); err != nil {
		return nil, &driver.Error{Op: "list", File: t.url, Offset: -1, Err: err}
	}
	out := make([]driver.ExportEntry, len(l))
	for i, e := range l {
		out[i] = driver.ExportEntry{Name: e.Name, Description: e.Description, URL: t.exportURL(e.Name)}
	}
	return out, nil
}
