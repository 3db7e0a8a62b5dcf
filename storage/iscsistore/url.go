package iscsistore

import (
	"net"
	"strconv"
	"strings"

	"github.com/vdisk/vdisk/driver"
)

// DefaultPort is the iSCSI port (RFC 7143).
const DefaultPort = 3260

// Location is a parsed iscsi:// name.
type Location struct {
	User, Password string
	HasPassword    bool
	Host           string // host:port
	Target         string // empty for a portal-only name (discovery)
	LUN            uint64
}

// maxLUN is the largest LUN the single-level flat format holds.
const maxLUN = 16383

// ParseURL parses iscsi://[USER[%PASSWORD]@]HOST[:PORT][/TARGET-IQN[/LUN]].
func ParseURL(name string) (*Location, error) {
	rest, ok := strings.CutPrefix(name, "iscsi://")
	if !ok {
		if len(name) >= 8 && strings.EqualFold(name[:8], "iscsi://") {
			rest = name[8:]
		} else {
			return nil, driver.OptionErrorf("%q is not an iscsi:// name", redact(name))
		}
	}
	l := &Location{}
	auth, hostpath, found := cutLast(rest, "@")
	if !found {
		hostpath, auth = rest, ""
	} else {
		l.User, l.Password, l.HasPassword = strings.Cut(auth, "%")
		if l.User == "" {
			return nil, driver.OptionErrorf("%s: empty user name before @", redact(name))
		}
	}
	host, path, _ := strings.Cut(hostpath, "/")
	if host == "" {
		return nil, driver.OptionErrorf("%s: no host", redact(name))
	}
	if h, p, err := net.SplitHostPort(host); err == nil {
		n, err := strconv.Atoi(p)
		if err != nil || n <= 0 || n > 65535 {
			return nil, driver.OptionErrorf("%s: bad port %q", redact(name), p)
		}
		l.Host = net.JoinHostPort(h, p)
	} else {
		l.Host = net.JoinHostPort(strings.Trim(host, "[]"), strconv.Itoa(DefaultPort))
	}
	path = strings.TrimSuffix(path, "/")
	if path == "" {
		return l, nil
	}
	target, lun, hasLUN := strings.Cut(path, "/")
	l.Target = target
	if hasLUN {
		n, err := strconv.ParseUint(lun, 10, 64)
		if err != nil || n > maxLUN {
			return nil, driver.OptionErrorf("%s: bad LUN %q (0..%d)", redact(name), lun, maxLUN)
		}
		l.LUN = n
	}
	return l, nil
}

func cutLast(s, sep string) (before, after string, found bool) {
	i := strings.LastIndex(s, sep)
	if i < 0 {
		return s, "", false
	}
	return s[:i], s[i+len(sep):], true
}

// String is the name without the password (for messages and Name()).
func (l *Location) String() string {
	var b strings.Builder
	b.WriteString("iscsi://")
	if l.User != "" {
		b.WriteString(l.User)
		b.WriteByte('@')
	}
	b.WriteString(l.Host)
	if l.Target != "" {
		b.WriteByte('/')
		b.WriteString(l.Target)
		b.WriteByte('/')
		b.WriteString(strconv.FormatUint(l.LUN, 10))
	}
	return b.String()
}

// redact drops a password from a name that did not parse.
func redact(name string) string {
	rest, ok := strings.CutPrefix(name, "iscsi://")
	if !ok {
		return name
	}
	auth, hp, found := cutLast(rest, "@")
	if !found {
		return name
	}
	user, _, _ := strings.Cut(auth, "%")
	return "iscsi://" + user + "@" + hp
}
