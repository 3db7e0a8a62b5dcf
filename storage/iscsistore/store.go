package iscsistore

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/iscsi"
)

func init() {
	driver.RegisterScheme("iscsi", Open)
}

// Open is the scheme opener: it parses the name and keeps the settings;
// connecting waits for Storage.Open.
func Open(ctx context.Context, name string, env *driver.SchemeEnv) (driver.Storage, string, error) {
	loc, err := ParseURL(name)
	if err != nil {
		return nil, "", err
	}
	st := &Storage{loc: loc, env: env}
	if st.env == nil {
		st.env = &driver.SchemeEnv{}
	}
	if err := st.checkOptions(); err != nil {
		return nil, "", err
	}
	return st, loc.String(), nil
}

// Storage holds one iscsi:// location. Its only file is the LUN. It
// keeps track of the files it opened, so that CloseStorage logs out of
// every session still open.
type Storage struct {
	loc *Location
	env *driver.SchemeEnv

	mu    sync.Mutex
	files map[*File]struct{} // open files
}

var _ driver.StorageCloser = (*Storage)(nil)

// CloseStorage implements driver.StorageCloser: the files opened from the
// storage that are still open (a driver that forgot one) are closed, with
// their sessions, so no connection outlives the last image on the
// storage. The storage stays usable: a later Open logs in again.
func (st *Storage) CloseStorage() error {
	st.mu.Lock()
	files := st.files
	st.files = nil
	st.mu.Unlock()
	for f := range files {
		st.env.Log().Debug("iscsi: closing a file left open at storage close", "url", f.Name())
		f.Close()
	}
	return nil
}

// track records f as open until it closes.
func (st *Storage) track(f *File) {
	st.mu.Lock()
	if st.files == nil {
		st.files = map[*File]struct{}{}
	}
	st.files[f] = struct{}{}
	st.mu.Unlock()
	f.onClose = func() {
		st.mu.Lock()
		delete(st.files, f)
		st.mu.Unlock()
	}
}

var knownOptions = []string{"password-secret", "target-user", "target-password-secret", "initiator-name", "header-digest", "data-digest", "timeout", "open-retry"}

func (st *Storage) checkOptions() error {
	for k, v := range st.env.Options {
		switch k {
		case "password-secret", "target-user", "target-password-secret", "initiator-name":
		case "header-digest", "data-digest":
			if !strings.EqualFold(v, "crc32c") && !strings.EqualFold(v, "none") && !strings.EqualFold(v, "none-crc32c") && !strings.EqualFold(v, "crc32c-none") {
				return driver.OptionErrorf("iscsi: %s=%q: want crc32c or none", k, v)
			}
		case "timeout":
			if n, err := strconv.Atoi(v); err != nil || n <= 0 || n > 3600 {
				return driver.OptionErrorf("iscsi: timeout=%q: want seconds in 1..3600", v)
			}
		case "open-retry":
			if f, err := strconv.ParseFloat(v, 64); err != nil || f < 0 || f > 3600 {
				return driver.OptionErrorf("iscsi: open-retry=%q: want seconds in 0..3600", v)
			}
		default:
			return driver.OptionErrorf("iscsi: unknown storage option %q (known: %s)", k, strings.Join(knownOptions, ", "))
		}
	}
	return nil
}

// config builds the initiator's settings; the caller wipes the secrets.
func (st *Storage) config() (iscsi.Config, error) {
	o := st.env.Options
	cfg := iscsi.Config{
		Portal:        st.loc.Host,
		Target:        st.loc.Target,
		InitiatorName: o["initiator-name"],
		HeaderDigest:  strings.HasPrefix(strings.ToLower(o["header-digest"]), "crc32c"),
		DataDigest:    strings.HasPrefix(strings.ToLower(o["data-digest"]), "crc32c"),
		Logger:        st.env.Log(),
	}
	if st.env.Dialer != nil {
		cfg.Dial = st.env.Dialer.Dial
	}
	if v := o["open-retry"]; v != "" {
		// How long a login that cannot connect (the target restarting)
		// is retried, at open and at a reconnect; 0: one attempt.
		f, _ := strconv.ParseFloat(v, 64)
		cfg.Retry = time.Duration(f * float64(time.Second))
		if cfg.Retry == 0 {
			cfg.Retry = -1
		}
	}
	if v := o["timeout"]; v != "" {
		n, _ := strconv.Atoi(v)
		cfg.Timeout = time.Duration(n) * time.Second
	}
	if st.loc.User != "" || o["password-secret"] != "" {
		a := &iscsi.Auth{User: st.loc.User}
		switch {
		case o["password-secret"] != "":
			s, err := driver.LookupSecret(st.env.Secrets, o["password-secret"])
			if err != nil {
				return cfg, err
			}
			a.Secret = s
		case st.loc.HasPassword:
			a.Secret = []byte(st.loc.Password)
		default:
			return cfg, driver.OptionErrorf("iscsi: user %q has no password (give USER%%PASSWORD@ or password-secret=ID)", st.loc.User)
		}
		if a.User == "" {
			return cfg, driver.OptionErrorf("iscsi: password-secret needs a user name in the URL (iscsi://USER@HOST/...)")
		}
		if id := o["target-password-secret"]; id != "" {
			s, err := driver.LookupSecret(st.env.Secrets, id)
			if err != nil {
				driver.Wipe(a.Secret)
				return cfg, err
			}
			a.TargetSecret = s
			a.TargetUser = o["target-user"]
		}
		cfg.Auth = a
	} else if o["target-password-secret"] != "" {
		return cfg, driver.OptionErrorf("iscsi: mutual CHAP (target-password-secret) needs a user and password of the initiator too")
	}
	return cfg, nil
}

func wipeAuth(cfg *iscsi.Config) {
	if cfg.Auth != nil {
		driver.Wipe(cfg.Auth.Secret)
		driver.Wipe(cfg.Auth.TargetSecret)
	}
}

// Open connects and logs in; the name must be the storage's own.
func (st *Storage) Open(name string, flag driver.OpenFlag) (driver.File, error) {
	if name != st.loc.String() {
		loc, err := ParseURL(name)
		if err != nil || loc.Host != st.loc.Host || loc.Target != st.loc.Target || loc.LUN != st.loc.LUN {
			return nil, driver.Errorf(driver.ErrNotFound, name, -1, "an iSCSI storage holds only its LUN %s", st.loc)
		}
	}
	if st.loc.Target == "" {
		return nil, driver.Errorf(driver.ErrInvalidOption, st.loc.String(), -1, "no target IQN in the name (iscsi://HOST[:PORT]/TARGET-IQN/LUN); list targets with info --list")
	}
	if flag&driver.Excl != 0 {
		return nil, driver.Errorf(driver.ErrBusy, st.loc.String(), -1, "an iSCSI LUN always exists; it cannot be created exclusively")
	}
	f, err := openFile(context.Background(), st, flag&driver.ReadWrite == 0)
	if err != nil {
		return nil, err
	}
	st.track(f)
	return f, nil
}

// Remove is not possible on a LUN.
func (st *Storage) Remove(name string) error {
	return driver.Unsupportedf(name, "iSCSI LUNs cannot be removed")
}

// Rename is not possible on a LUN.
func (st *Storage) Rename(oldName, newName string) error {
	return driver.Unsupportedf(oldName, "iSCSI LUNs cannot be renamed")
}

// Stat connects to learn the LUN's size.
func (st *Storage) Stat(name string) (driver.FileInfo, error) {
	f, err := st.Open(name, driver.ReadOnly)
	if err != nil {
		return driver.FileInfo{}, err
	}
	defer f.Close()
	sz, _ := f.Size()
	return driver.FileInfo{Name: name, Size: sz, Allocated: -1}, nil
}

// FreeSpace is what a LUN can hold: its size.
func (st *Storage) FreeSpace(name string) (int64, error) {
	fi, err := st.Stat(st.loc.String())
	return fi.Size, err
}

// List is not a directory listing; see ListExports.
func (st *Storage) List(dir string) ([]string, error) {
	return nil, driver.Unsupportedf(dir, "iSCSI storage has no directories (use info --list)")
}

// ListExports runs SendTargets discovery on the portal, then logs in to
// each target to list its disk LUNs (REPORT LUNS, INQUIRY, READ
// CAPACITY). A target it cannot log in to (other credentials) is listed
// without LUNs.
func (st *Storage) ListExports(ctx context.Context, name string) ([]driver.ExportEntry, error) {
	cfg, err := st.config()
	if err != nil {
		return nil, err
	}
	defer wipeAuth(&cfg)
	targets, err := iscsi.Discover(ctx, cfg)
	if err != nil {
		return nil, mapError(err, "list", st.loc.String(), -1)
	}
	var out []driver.ExportEntry
	for _, t := range targets {
		loc := *st.loc
		loc.Target = t.Name
		portal := ""
		if len(t.Addresses) > 0 {
			portal = "portal " + strings.Join(t.Addresses, " ")
		}
		luns, err := listLUNs(ctx, cfg, t.Name)
		if err != nil || len(luns) == 0 {
			u := loc.String()
			e := driver.ExportEntry{Name: t.Name, Description: portal, URL: u[:strings.LastIndexByte(u, '/')]}
			if err != nil {
				e.Description = strings.TrimSpace(portal + " (LUNs not listed: " + err.Error() + ")")
			}
			out = append(out, e)
			continue
		}
		for _, d := range luns {
			loc.LUN = d.LUN
			desc := strings.TrimSpace(fmt.Sprintf("%s %s, %d bytes, %d-byte blocks", d.Inquiry.Vendor, d.Inquiry.Product, d.Size(), d.BlockSize))
			if d.LBPME {
				desc += ", thin"
			}
			out = append(out, driver.ExportEntry{Name: fmt.Sprintf("%s/%d", t.Name, d.LUN), Description: desc, URL: loc.String()})
		}
	}
	return out, nil
}

// listLUNs logs in to target and returns its disk LUNs.
func listLUNs(ctx context.Context, cfg iscsi.Config, target string) ([]*iscsi.Disk, error) {
	cfg.Target = target
	s, err := iscsi.Dial(ctx, cfg)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	luns, err := s.ReportLUNs(ctx)
	if err != nil {
		return nil, err
	}
	var out []*iscsi.Disk
	for _, lun := range luns {
		if d, err := iscsi.OpenDisk(ctx, s, lun); err == nil {
			out = append(out, d)
		}
	}
	return out, nil
}

// mapError turns initiator errors into driver errors naming the file and
// offset, keeping the iSCSI cause for errors.Is.
func mapError(err error, op, name string, off int64) error {
	if err == nil {
		return nil
	}
	var sentinel error
	switch {
	case errors.Is(err, iscsi.ErrWriteProtected):
		sentinel = driver.ErrReadOnly
	case errors.Is(err, iscsi.ErrLBAOutOfRange):
		sentinel = driver.ErrOutOfRange
	case errors.Is(err, iscsi.ErrClosed):
		sentinel = driver.ErrClosed
	case errors.Is(err, iscsi.ErrAuth):
		sentinel = driver.ErrInvalidOption
	case errors.Is(err, iscsi.ErrProtocol):
		sentinel = driver.ErrCorrupt
	case errors.Is(err, iscsi.ErrInvalidCommand):
		sentinel = driver.ErrUnsupported
	}
	if sentinel == nil {
		return &driver.Error{Op: op, File: name, Offset: off, Err: err}
	}
	return &driver.Error{Op: op, File: name, Offset: off, Reason: err.Error(), Err: &joined{sentinel, err}}
}

// joined matches both the driver sentinel and the iSCSI cause.
type joined struct{ sentinel, cause error }

func (j *joined) Error() string   { return j.sentinel.Error() }
func (j *joined) Unwrap() []error { return []error{j.sentinel, j.cause} }

var _ driver.Lister = (*Storage)(nil)
