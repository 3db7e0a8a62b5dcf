package main

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"strings"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
)

// parseObjects turns qemu's --object arguments into secrets. Only
// secret objects are known: secret,id=ID,data=VALUE|file=PATH[,format=raw|base64].
// A password on the command line is visible to every user of the machine;
// file= is the form the examples use.
func parseObjects(objs []string) (*driver.SecretMap, error) {
	s := &driver.SecretMap{}
	for _, arg := range objs {
		kvs, err := driver.SplitOptions(arg)
		if err != nil {
			return nil, usageErrorf("--object %q: %v", arg, err)
		}
		first := strings.SplitN(arg, ",", 2)[0]
		typ := first
		if strings.Contains(first, "=") {
			if len(kvs) == 0 || kvs[0].Key != "qom-type" {
				return nil, usageErrorf("--object %q: the first field must be the object type (secret)", arg)
			}
			typ = kvs[0].Value
		}
		if typ != "secret" {
			return nil, usageErrorf("--object %q: unknown object type %q (vdisk knows secret)", arg, typ)
		}
		var id, data, file, format string
		haveData := false
		for _, kv := range kvs[1:] {
			switch kv.Key {
			case "id":
				id = kv.Value
			case "data":
				data, haveData = kv.Value, true
			case "file":
				file = kv.Value
			case "format":
				format = kv.Value
			default:
				return nil, usageErrorf("--object %q: secret has no property %q (id, data, file, format)", arg, kv.Key)
			}
		}
		if id == "" {
			return nil, usageErrorf("--object %q: a secret needs id=", arg)
		}
		if haveData == (file != "") {
			return nil, usageErrorf("--object %q: a secret needs exactly one of data= and file=", arg)
		}
		val := []byte(data)
		if file != "" {
			b, err := os.ReadFile(file)
			if err != nil {
				return nil, fmt.Errorf("--object secret %s: %w", id, err)
			}
			val = b
		}
		switch format {
		case "", "raw":
		case "base64":
			dec, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(val)))
			driver.Wipe(val)
			if err != nil {
				return nil, usageErrorf("--object secret %s: format=base64 but the value is not base64: %v", id, err)
			}
			val = dec
		default:
			return nil, usageErrorf("--object secret %s: format=%s (raw or base64)", id, format)
		}
		s.Set(id, val)
		driver.Wipe(val)
	}
	return s, nil
}

// oo completes open options with what every command shares: the logger,
// the secrets of --object, the storage of the tests' hooks and the block
// cache of --block-cache.
func (a *app) oo(o vdisk.OpenOptions) *vdisk.OpenOptions {
	o.Logger = a.log
	if o.Storage == nil {
		o.Storage = a.hooks.storage
	}
	if o.Secrets == nil {
		o.Secrets = a.secretsOrNil()
	}
	if o.StorageOptions == nil {
		o.StorageOptions = a.storageOpts
	}
	if o.AllowSchemes == nil {
		o.AllowSchemes = a.allowSchemes
	}
	a.applyCache(&o)
	return &o
}

// co completes create options as oo does.
func (a *app) co(o vdisk.CreateOptions) *vdisk.CreateOptions {
	o.Logger = a.log
	if o.Storage == nil {
		o.Storage = a.hooks.storage
	}
	if o.Secrets == nil {
		o.Secrets = a.secretsOrNil()
	}
	if o.StorageOptions == nil {
		o.StorageOptions = a.storageOpts
	}
	if o.AllowSchemes == nil {
		o.AllowSchemes = a.allowSchemes
	}
	return &o
}

// networkSpec turns the --image-opts keys of qemu's nbd and iscsi drivers
// (given under prefix: "" when driver=nbd, "file." when file.driver=nbd)
// into a URL name; the keys it used are removed from kvs.
func networkSpec(drv string, kvs map[string]string, extra map[string]string) (string, error) {
	take := func(k string) string {
		v := kvs[k]
		delete(kvs, k)
		return v
	}
	// Storage options that are not part of the URL, with either form.
	storageKeys := map[string][]string{
		"nbd":   {"reconnect-delay", "open-timeout", "open-retry", "allocation-depth"},
		"iscsi": {"open-retry"},
	}
	for _, k := range storageKeys[drv] {
		if v, ok := kvs[k]; ok {
			extra[k] = v
			delete(kvs, k)
		}
	}
	if f := take("filename"); f != "" {
		// qemu also takes the URL itself: file.driver=nbd,file.filename=nbd://...
		if s := driver.SchemeOf(f); s != drv && !strings.HasPrefix(s, drv+"+") && s != drv+"s" && !strings.HasPrefix(s, drv+"s+") {
			return "", driver.OptionErrorf("--image-opts: driver %s takes a %s:// URL as filename, not %q", drv, drv, f)
		}
		return f, nil
	}
	switch drv {
	case "nbd":
		typ, host, port, path := take("server.type"), take("server.host"), take("server.port"), take("server.path")
		export := take("export")
		tls := take("tls-creds")
		if h := take("tls-hostname"); h != "" {
			extra["tls-hostname"] = h
		}
		scheme := "nbd"
		if tls != "" {
			scheme = "nbds"
			extra["tls-creds"] = tls
		}
		switch typ {
		case "inet", "":
			if host == "" {
				return "", driver.OptionErrorf("--image-opts: driver=nbd needs server.host= (or server.type=unix,server.path=)")
			}
			hp := host
			if strings.Contains(host, ":") && !strings.HasPrefix(host, "[") {
				hp = "[" + host + "]"
			}
			if port != "" {
				hp += ":" + port
			}
			return scheme + "://" + hp + "/" + export, nil
		case "unix":
			if path == "" {
				return "", driver.OptionErrorf("--image-opts: server.type=unix needs server.path=")
			}
			return scheme + "+unix:///" + export + "?socket=" + url.QueryEscape(path), nil
		}
		return "", driver.OptionErrorf("--image-opts: server.type=%s (inet or unix)", typ)
	case "iscsi":
		if t := take("transport"); t != "" && t != "tcp" {
			return "", driver.OptionErrorf("--image-opts: iscsi transport=%s (only tcp)", t)
		}
		portal, target, lun := take("portal"), take("target"), take("lun")
		if portal == "" || target == "" {
			return "", driver.OptionErrorf("--image-opts: driver=iscsi needs portal= and target=")
		}
		if lun == "" {
			lun = "0"
		}
		user := take("user")
		for _, k := range []string{"password-secret", "initiator-name", "header-digest", "timeout"} {
			if v := take(k); v != "" {
				extra[k] = v
			}
		}
		if p := take("password"); p != "" {
			return "", driver.OptionErrorf("--image-opts: iscsi password= is not accepted (it would be visible to every user); give password-secret=ID with --object secret,id=ID,file=PATH")
		}
		u := "iscsi://"
		if user != "" {
			u += url.PathEscape(user) + "@"
		}
		return u + portal + "/" + target + "/" + lun, nil
	}
	return "", driver.OptionErrorf("--image-opts: unknown protocol driver %q", drv)
}

// applyCache puts the block cache of --block-cache in front of the network
// layer of o (vdisk.OpenOptions.Cache).
func (a *app) applyCache(o *vdisk.OpenOptions) {
	if a.cacheFile == "" || o.Cache != "" {
		return
	}
	o.Cache = a.cacheFile
	if o.CacheOptions.Size == 0 {
		o.CacheOptions.Size = a.cacheBytes
	}
}

// listExports prints what the server of a network URL offers (info --list).
func (a *app) listExports(name string, asJSON bool) error {
	scheme := driver.SchemeOf(name)
	if scheme == "" {
		return usageErrorf("--list needs a server URL such as nbd://HOST or iscsi://HOST, not %q", name)
	}
	open, ok := driver.LookupScheme(scheme)
	if !ok {
		return driver.Errorf(vdisk.ErrUnsupported, name, -1, "no storage handles %s:// names (known: %s)", scheme, strings.Join(driver.Schemes(), ", "))
	}
	st, _, err := open(a.ctx, name, &driver.SchemeEnv{Secrets: a.secretsOrNil(), Options: a.storageOpts, Logger: a.log})
	if err != nil {
		return driver.WithFile(err, "list", name)
	}
	l, ok := st.(driver.Lister)
	if !ok {
		return driver.Errorf(vdisk.ErrUnsupported, name, -1, "%s:// servers cannot list what they offer", scheme)
	}
	entries, err := l.ListExports(a.ctx, name)
	if err != nil {
		return driver.WithFile(err, "list", name)
	}
	if asJSON {
		if entries == nil {
			entries = []driver.ExportEntry{}
		}
		data, err := json.MarshalIndent(entries, "", "    ")
		if err != nil {
			return err
		}
		fmt.Fprintln(a.stdout, string(data))
		return nil
	}
	for _, e := range entries {
		line := e.Name
		if e.URL != "" {
			line += "\t" + e.URL
		}
		if e.Description != "" {
			line += "\t" + e.Description
		}
		fmt.Fprintln(a.stdout, line)
	}
	return nil
}

// secretsOrNil returns the --object secrets as an interface that is nil
// when none were given.
func (a *app) secretsOrNil() driver.Secrets {
	if a.secrets == nil {
		return nil
	}
	return a.secrets
}
