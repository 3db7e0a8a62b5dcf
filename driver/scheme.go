package driver

import (
	"context"
	"log/slog"
	"net"
	"sort"
	"strings"
	"sync"
)

// Dialer opens a network connection (VD's TCPNET interface). Network
// storages dial through the one they are given, so callers can route,
// proxy or inject faults; nil means a plain net.Dialer.
type Dialer func(ctx context.Context, network, addr string) (net.Conn, error)

// Dial uses d, or a net.Dialer when d is nil.
func (d Dialer) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	if d != nil {
		return d(ctx, network, addr)
	}
	var nd net.Dialer
	return nd.DialContext(ctx, network, addr)
}

// SchemeEnv is what a scheme's storage is built with.
type SchemeEnv struct {
	// Dialer opens the storage's connections; nil dials directly.
	Dialer Dialer
	// Secrets provides passwords (CHAP secrets, TLS keys) named in the
	// name or in Options.
	Secrets Secrets
	// Options are extra settings for the storage (from --image-opts keys
	// the name cannot carry, such as tls-creds); nil when none.
	Options map[string]string
	Logger  *slog.Logger
}

// Log returns e's logger or one that discards.
func (e *SchemeEnv) Log() *slog.Logger {
	if e != nil && e.Logger != nil {
		return e.Logger
	}
	return slog.New(slog.DiscardHandler)
}

// SchemeOpener returns the storage that holds name (a URL of its scheme)
// and the name of the file inside that storage. It should not do I/O that
// can wait long: opening the returned name connects.
type SchemeOpener func(ctx context.Context, name string, env *SchemeEnv) (Storage, string, error)

var (
	schemeMu sync.RWMutex
	schemes  = map[string]SchemeOpener{}
)

// RegisterScheme makes names "scheme://..." resolve to a storage (nbd,
// nbd+unix, nbds, iscsi, s3). It panics on a duplicate, like Register.
func RegisterScheme(scheme string, open SchemeOpener) {
	schemeMu.Lock()
	defer schemeMu.Unlock()
	key := strings.ToLower(scheme)
	if key == "" || open == nil {
		panic("driver: RegisterScheme of an incomplete scheme")
	}
	if _, dup := schemes[key]; dup {
		panic("driver: RegisterScheme called twice for scheme " + scheme)
	}
	schemes[key] = open
}

// SchemeOf returns the lower-case scheme of a URL name ("nbd" for
// "nbd://host/x"), or "" when name is not a URL.
func SchemeOf(name string) string {
	if !IsURL(name) {
		return ""
	}
	return strings.ToLower(name[:strings.Index(name, "://")])
}

// LookupScheme finds the opener registered for scheme.
func LookupScheme(scheme string) (SchemeOpener, bool) {
	schemeMu.RLock()
	defer schemeMu.RUnlock()
	o, ok := schemes[strings.ToLower(scheme)]
	return o, ok
}

// Schemes lists the registered schemes, sorted.
func Schemes() []string {
	schemeMu.RLock()
	defer schemeMu.RUnlock()
	out := make([]string, 0, len(schemes))
	for s := range schemes {
		out = append(out, s)
	}
	sort.Strings(out)
	return out
}

// Lister is implemented by storages that can list what a server offers
// (NBD exports, iSCSI targets): `vdisk info --list URL`.
type Lister interface {
	ListExports(ctx context.Context, name string) ([]ExportEntry, error)
}

// ExportEntry is one export or target a server offers.
type ExportEntry struct {
	Name        string `json:"name"`
	Description string `json:"description,omitempty"`
	// URL opens the entry.
	URL string `json:"url,omitempty"`
}

// Versioned is implemented by files whose content has an identity that
// changes when the content is replaced (an object's ETag). Caches keep
// blocks only for the version they were fetched from.
type Versioned interface {
	Version() string
}
