package nbdstore

import (
	"net"
	"net/url"
	"strings"

	"github.com/vdisk/vdisk/driver"
)

// DefaultPort is the IANA port of NBD.
const DefaultPort = "10809"

// target is a parsed NBD URL.
type target struct {
	url     string // as given
	scheme  string
	network string // "tcp" or "unix"
	addr    string // host:port or socket path
	host    string // for TLS verification (tcp only)
	export  string
	tls     bool
}

// parseURL parses qemu's NBD URI forms.
func parseURL(name string) (*target, error) {
	u, err := url.Parse(name)
	if err != nil {
		return nil, driver.Errorf(driver.ErrInvalidOption, name, -1, "not an NBD URL: %v", err)
	}
	t := &target{url: name, scheme: strings.ToLower(u.Scheme)}
	switch t.scheme {
	case "nbd", "nbds":
		t.network = "tcp"
	case "nbd+unix", "nbds+unix":
		t.network = "unix"
	default:
		return nil, driver.Errorf(driver.ErrInvalidOption, name, -1, "scheme %q is not nbd, nbd+unix, nbds or nbds+unix", u.Scheme)
	}
	t.tls = strings.HasPrefix(t.scheme, "nbds")
	if u.User != nil {
		return nil, driver.Errorf(driver.ErrInvalidOption, name, -1, "NBD URLs carry no user name or password")
	}
	t.export = strings.TrimPrefix(u.Path, "/")
	q := u.Query()
	if t.network == "unix" {
		if u.Host != "" {
			return nil, driver.Errorf(driver.ErrInvalidOption, name, -1, "an nbd+unix URL has no host (nbd+unix:///EXPORT?socket=PATH)")
		}
		t.addr = q.Get("socket")
		if t.addr == "" {
			return nil, driver.Errorf(driver.ErrInvalidOption, name, -1, "an nbd+unix URL needs ?socket=PATH")
		}
		q.Del("socket")
	} else {
		if u.Host == "" {
			return nil, driver.Errorf(driver.ErrInvalidOption, name, -1, "an NBD URL needs a host (nbd://HOST[:PORT]/EXPORT)")
		}
		t.host = u.Hostname()
		port := u.Port()
		if port == "" {
			port = DefaultPort
		}
		t.addr = net.JoinHostPort(t.host, port)
	}
	for k := range q {
		return nil, driver.Errorf(driver.ErrInvalidOption, name, -1, "unknown NBD URL parameter %q", k)
	}
	return t, nil
}

// exportURL is the URL of another export on the same server.
func (t *target) exportURL(export string) string {
	path := (&url.URL{Path: export}).EscapedPath()
	if t.network == "unix" {
		// Slashes stay readable, as qemu and nbdinfo write them.
		return t.scheme + ":///" + path + "?socket=" + strings.ReplaceAll(url.QueryEscape(t.addr), "%2F", "/")
	}
	return t.scheme + "://" + t.addr + "/" + path
}
