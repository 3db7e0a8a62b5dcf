package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/control"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/nbd"
)

// serveHeapSlack is what the soft memory limit of `vdisk serve` allows
// beyond --memory-budget: the images' caches, the runtime, the control
// server.
const serveHeapSlack = 64 << 20

// snapshotFormats are the differencing formats --snapshot tries, in order;
// the first one registered is used for the throw-away overlay.
var snapshotFormats = []string{"qcow2", "vdi"}

// serveOptions are the flags of `vdisk serve`.
type serveOptions struct {
	format, exportName, description string
	exports                         []string
	readOnly, snapshot, persistent  bool
	shared                          int
	bind, socket                    string
	port                            int
	pidFile                         string
	fork                            bool
	tlsCert, tlsKey                 string
	tlsRequired                     bool
	tlsCA, tlsCreds                 string
	allowFrom                       []string
	handshakeLimit                  int
	idleTimeout                     time.Duration
	maxConnections                  int
	memoryBudget                    string
	control                         string
	allowUnsafePaths                bool
	prefetch                        bool
}

func (a *app) newServeCmd() *cobra.Command {
	var o serveOptions
	cmd := &cobra.Command{
		Use:   "serve [-f FMT] [-r] [-s] [-t] [-e N] [-k SOCKET | -b ADDR -p PORT] [-x NAME] [--export NAME=IMAGE]... [--control SOCKET] [IMAGE]",
		Short: "Serve images over NBD (like qemu-nbd)",
		Long: `Export IMAGE (and its backing chain) over the Network Block Device protocol,
as qemu-nbd does: under the name given by -x (default "", the default
export), plus any number of --export NAME=IMAGE. Clients such as qemu,
nbdcopy, nbdinfo, nbdfuse or the kernel's nbd-client connect to
nbd://127.0.0.1:10809/NAME, or with -k to nbd+unix:///NAME?socket=SOCKET.

The server listens on 127.0.0.1 port 10809 unless told otherwise: bind
another address with -b (0.0.0.0 for every interface) and restrict clients
with --allow-from. It serves -e clients at once (default 1, like qemu-nbd;
0 means no limit; further clients wait) and, without -t, exits once the
last client has disconnected. SIGINT and SIGTERM stop it after in-flight
requests finish; every image is flushed and closed. With --fork the
command returns once the server listens and leaves it in the background
(--pid-file records its PID).

Every connection to an export shares one open image, so with -e other than
1 the server advertises multi-connection support. -s serves a throw-away
overlay (the image itself is never written); it needs a differencing format
(qcow2 or vdi) in this build. TLS is offered with --tls-cert and --tls-key
(PEM files) and enforced with --tls-required. Clients are authenticated
by certificate with --tls-ca (clients must present a certificate signed by
one of its CAs), or with --tls-creds DIR, qemu's directory layout
(ca-cert.pem, server-cert.pem, server-key.pem; like qemu's default
verify-peer=on it requires client certificates); both imply --tls-required.

Limits against clients that misbehave: a client that sends nothing for
--idle-timeout while none of its requests runs, or does not read its
replies for that long, is disconnected (so with -e 1 an idle client
blocks the others for at most that long); at most --max-connections
clients are connected at once whatever -e says (further ones wait in the
listen backlog); the buffers of all connections and requests stay within
--memory-budget (requests wait for room; the largest READ/WRITE payload
advertised shrinks with a budget below 64 MiB). --allow-from filters TCP
clients by address; a unix socket (-k) is guarded by its file's
permissions instead, and the two cannot be combined.

File names the images record are followed under the strict path policy:
only to regular files in the image's directory or below, never to a URL.
A local overlay on a network base (a backing file s3://images/base.qcow2)
is served with the global --allow-backing-scheme s3, which admits backing
names of that scheme and nothing else (local names stay confined), usually
with --block-cache FILE to keep the base's blocks locally:
  vdisk serve --allow-backing-scheme s3 --block-cache base.vci vm1.qcow2
--allow-unsafe-paths follows every name, as qemu-nbd does.

--control SOCKET also listens on a unix socket (mode 0600) for the
control protocol: live commit, stream and external snapshots of the
exports while clients use them ('vdisk commit --server SOCKET', 'vdisk
stream --server', 'vdisk snapshot --server', 'vdisk jobs --server'), or
any client of its JSON lines (see package control). On exit the running
jobs are cancelled (the images read the same) before the images close.`,
		Args: rangeArgs(0, 1, "expecting at most one image file name (use --export NAME=IMAGE for more)"),
		RunE: func(cmd *cobra.Command, args []string) error {
			image := ""
			if len(args) == 1 {
				image = args[0]
			}
			return a.serve(image, &o)
		},
	}
	fl := cmd.Flags()
	addFormatFlag(cmd, &o.format, "format of the images (probed when not given)")
	fl.StringVarP(&o.exportName, "export-name", "x", "", "export name of IMAGE")
	fl.StringVarP(&o.description, "description", "D", "", "description of IMAGE's export")
	fl.StringArrayVar(&o.exports, "export", nil, "also export IMAGE under NAME (NAME=IMAGE; repeatable)")
	fl.BoolVarP(&o.readOnly, "read-only", "r", false, "export read-only")
	fl.BoolVarP(&o.snapshot, "snapshot", "s", false, "serve a temporary overlay: writes never reach the images")
	fl.BoolVarP(&o.persistent, "persistent", "t", false, "keep serving after the last client disconnects")
	fl.IntVarP(&o.shared, "shared", "e", 1, "serve at most N clients at once (0: up to --max-connections)")
	fl.StringVarP(&o.bind, "bind", "b", "127.0.0.1", "listen on this address")
	fl.IntVarP(&o.port, "port", "p", 10809, "listen on this TCP port")
	fl.StringVarP(&o.socket, "socket", "k", "", "listen on this unix socket instead of TCP")
	fl.StringVar(&o.pidFile, "pid-file", "", "write the process ID to this file while serving")
	fl.BoolVar(&o.fork, "fork", false, "serve in the background: the command returns once the server listens (like qemu-nbd --fork; stop it by the PID of --pid-file)")
	fl.StringVar(&o.tlsCert, "tls-cert", "", "TLS certificate (PEM) offered with NBD_OPT_STARTTLS")
	fl.StringVar(&o.tlsKey, "tls-key", "", "private key (PEM) of --tls-cert")
	fl.BoolVar(&o.tlsRequired, "tls-required", false, "refuse clients that do not start TLS")
	fl.StringVar(&o.tlsCA, "tls-ca", "", "require client certificates signed by a CA of this PEM file (implies --tls-required)")
	fl.StringVar(&o.tlsCreds, "tls-creds", "", "TLS credentials directory as qemu's (ca-cert.pem, server-cert.pem, server-key.pem); client certificates are required")
	fl.StringArrayVar(&o.allowFrom, "allow-from", nil, "accept TCP clients only from this address or CIDR network (repeatable; not with -k)")
	fl.IntVar(&o.handshakeLimit, "handshake-limit", 10, "seconds a client has to complete the handshake (0: no limit)")
	fl.DurationVar(&o.idleTimeout, "idle-timeout", nbd.DefaultIdleTimeout, "disconnect a client idle, or not reading its replies, for this long (0: never)")
	fl.IntVar(&o.maxConnections, "max-connections", nbd.DefaultMaxConnections, "connections served at once at most, whatever -e says")
	fl.StringVar(&o.memoryBudget, "memory-budget", "256M", "bound on the buffer memory of all connections and requests")
	fl.StringVar(&o.control, "control", "", "also serve the control protocol (live jobs) on this unix socket")
	fl.BoolVar(&o.prefetch, "prefetch", false, "pull the whole network base image into its block cache (--block-cache FILE) in the background while serving; with --control, a prefetch job in query-jobs")
	fl.BoolVar(&o.allowUnsafePaths, "allow-unsafe-paths", false, "follow file names the images record (backing files, extents, data files) wherever they point, as qemu-nbd does; by default only regular files in the image's directory or below are followed")
	var ignored bool
	fl.BoolVarP(&ignored, "allocation-depth", "A", false, "accepted for qemu-nbd compatibility: qemu:allocation-depth is always offered")
	return cmd
}

// exportSpec is one image to export.
type exportSpec struct {
	name, image, description string
}

func (o *serveOptions) specs(image string) ([]exportSpec, error) {
	var specs []exportSpec
	if image != "" {
		specs = append(specs, exportSpec{o.exportName, image, o.description})
	}
	for _, e := range o.exports {
		name, img, ok := strings.Cut(e, "=")
		if !ok || img == "" {
			return nil, usageErrorf("--export %q: expecting NAME=IMAGE", e)
		}
		specs = append(specs, exportSpec{name: name, image: img})
	}
	if len(specs) == 0 {
		return nil, usageErrorf("expecting an image file name or --export NAME=IMAGE")
	}
	seen := map[string]bool{}
	for _, s := range specs {
		if seen[s.name] {
			return nil, usageErrorf("export name %q is given twice", s.name)
		}
		seen[s.name] = true
		if len(s.name) > 4096 {
			return nil, usageErrorf("export name longer than 4096 bytes")
		}
	}
	return specs, nil
}

func (a *app) serve(image string, o *serveOptions) (err error) {
	specs, err := o.specs(image)
	if err != nil {
		return err
	}
	if o.shared < 0 {
		return usageErrorf("--shared must be 0 (no limit) or more")
	}
	if o.handshakeLimit < 0 {
		return usageErrorf("--handshake-limit must be 0 (no limit) or more")
	}
	srv, err := a.newNBDServer(o)
	if err != nil {
		return err
	}
	if o.fork && os.Getenv(serveReadyEnv) == "" {
		return forkServe()
	}
	if os.Getenv("GOMEMLIMIT") == "" {
		// The budget bounds the buffers in use; a soft limit on the
		// heap keeps the garbage collector from letting freed ones
		// double the footprint before it runs.
		old := debug.SetMemoryLimit(srv.MemoryBudget + serveHeapSlack)
		defer debug.SetMemoryLimit(old)
	}

	// Open every image once (an image exported under two names shares its
	// Disk); close them all on the way out, which flushes them.
	var disks []*vdisk.Disk
	var tmpDirs []string
	defer func() {
		for _, d := range disks {
			if cerr := d.Close(); cerr != nil && err == nil {
				err = cerr
			}
		}
		for _, dir := range tmpDirs {
			os.RemoveAll(dir)
		}
	}()
	byPath := map[string]*vdisk.Disk{}
	var ctlExports []control.Export
	for _, s := range specs {
		key := s.image
		if abs, err := filepath.Abs(s.image); err == nil {
			key = abs
		}
		d := byPath[key]
		if d == nil {
			var tmp string
			d, tmp, err = a.openServed(s.image, o)
			if tmp != "" {
				tmpDirs = append(tmpDirs, tmp)
			}
			if err != nil {
				return err
			}
			disks = append(disks, d)
			byPath[key] = d
		}
		srv.Exports = append(srv.Exports, &nbd.Export{Name: s.name, Description: s.description, Disk: d, ReadOnly: o.readOnly})
		ctlExports = append(ctlExports, control.Export{Name: s.name, Disk: d, ReadOnly: o.readOnly, BackingReadOnly: o.snapshot})
	}

	l, err := listen(o)
	if err != nil {
		return err
	}
	var cs *control.Server
	if o.control != "" {
		// Registered after the disks' close: on the way out, jobs are
		// cancelled and waited for first.
		var stop func()
		cs, stop, err = a.serveControl(o.control, ctlExports)
		if err != nil {
			l.Close()
			return err
		}
		defer stop()
	}
	if o.prefetch {
		stop, err := a.startPrefetch(cs, ctlExports)
		if err != nil {
			l.Close()
			return err
		}
		defer stop()
	}
	if o.pidFile != "" {
		if err := os.WriteFile(o.pidFile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
			l.Close()
			return fmt.Errorf("writing the pid file: %w", err)
		}
		defer os.Remove(o.pidFile)
	}
	if o.fork {
		serveReady()
	}
	a.log.Debug("serving", "address", l.Addr().String(), "exports", len(srv.Exports))
	return srv.Serve(a.ctx, l)
}

// newNBDServer checks the server flags and builds the server (without
// exports).
func (a *app) newNBDServer(o *serveOptions) (*nbd.Server, error) {
	if (o.tlsCert == "") != (o.tlsKey == "") {
		return nil, usageErrorf("--tls-cert and --tls-key go together")
	}
	if o.tlsCreds != "" && (o.tlsCert != "" || o.tlsCA != "") {
		return nil, usageErrorf("--tls-creds holds the certificates: it does not go with --tls-cert, --tls-key or --tls-ca")
	}
	if o.tlsCA != "" && o.tlsCert == "" {
		return nil, usageErrorf("--tls-ca needs --tls-cert and --tls-key")
	}
	if o.tlsRequired && o.tlsCert == "" && o.tlsCreds == "" {
		return nil, usageErrorf("--tls-required needs --tls-cert and --tls-key, or --tls-creds")
	}
	if o.idleTimeout < 0 {
		return nil, usageErrorf("--idle-timeout must be 0 (no limit) or more")
	}
	if o.maxConnections < 1 {
		return nil, usageErrorf("--max-connections must be 1 or more")
	}
	budget, err := driver.ParseSize(o.memoryBudget)
	if err != nil || budget < nbd.MinMemoryBudget {
		return nil, usageErrorf("--memory-budget %q: expecting a size of at least %dM", o.memoryBudget, nbd.MinMemoryBudget>>20)
	}
	if len(o.allowFrom) > 0 && o.socket != "" {
		// Unix socket peers have no address to match; their access is
		// the socket file's permissions.
		return nil, usageErrorf("--allow-from filters TCP clients and does not go with -k (a unix socket is guarded by its file permissions)")
	}
	allow, err := parseAllowFrom(o.allowFrom)
	if err != nil {
		return nil, err
	}
	srv := &nbd.Server{
		MaxConns:         o.shared,
		MaxConnections:   o.maxConnections,
		MemoryBudget:     budget,
		IdleTimeout:      o.idleTimeout,
		Persistent:       o.persistent,
		TLSRequired:      o.tlsRequired,
		HandshakeTimeout: time.Duration(o.handshakeLimit) * time.Second,
		Allow:            allow,
		Logger:           a.log,
	}
	if o.handshakeLimit == 0 {
		srv.HandshakeTimeout = -1
	}
	if o.idleTimeout == 0 {
		srv.IdleTimeout = -1
	}
	switch {
	case o.tlsCreds != "":
		srv.TLSConfig, err = nbd.ServerTLSCreds(o.tlsCreds, true)
	case o.tlsCert != "":
		srv.TLSConfig, err = nbd.ServerTLSConfig(o.tlsCert, o.tlsKey, o.tlsCA)
	}
	if err != nil {
		return nil, err
	}
	return srv, nil
}

// serveControl serves the control protocol on a new unix socket until
// stop, which cancels the running jobs, waits for them and removes the
// socket.
func (a *app) serveControl(sock string, exports []control.Export) (cs *control.Server, stop func(), err error) {
	cs, err = control.NewServer(exports, &control.Options{Logger: a.log})
	if err != nil {
		return nil, nil, err
	}
	cl, err := control.Listen(sock)
	if err != nil {
		return nil, nil, fmt.Errorf("control socket: %w", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := cs.Serve(cl); err != nil && !errors.Is(err, control.ErrServerClosed) {
			a.log.Error("the control socket failed; live jobs can no longer be started", "socket", sock, "error", err)
		}
	}()
	a.log.Debug("serving the control protocol", "socket", sock)
	return cs, func() {
		cs.Close()
		<-done
	}, nil
}

// startPrefetch pulls the network base of every served disk that has a
// block cache (--block-cache) into it, in the background: as a prefetch job of
// the control server when there is one (query-jobs shows its progress,
// cancel stops it), else on its own, logged when it ends. stop cancels
// and waits.
func (a *app) startPrefetch(cs *control.Server, exports []control.Export) (stop func(), err error) {
	ctx, cancel := context.WithCancel(a.ctx)
	var wg sync.WaitGroup
	seen := map[*vdisk.Disk]bool{}
	for _, e := range exports {
		if seen[e.Disk] {
			continue
		}
		seen[e.Disk] = true
		if len(e.Disk.CacheStats()) == 0 {
			cancel()
			return nil, usageErrorf("--prefetch needs a network image with a block cache (--block-cache FILE): export %q has none", e.Name)
		}
		d, name := e.Disk, e.Name
		if cs != nil {
			id, err := cs.StartBackground(name, control.JobPrefetch, func(ctx context.Context, progress func(done, total int64)) error {
				return d.Prefetch(ctx, progress)
			})
			if err != nil {
				cancel()
				return nil, err
			}
			a.log.Debug("prefetching into the block cache", "export", name, "job", id)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := d.Prefetch(ctx, nil); err != nil && ctx.Err() == nil {
				a.log.Warn("prefetch into the block cache failed; reads still fetch what they need", "export", name, "error", err)
				return
			}
			a.log.Debug("prefetch ended", "export", name)
		}()
	}
	return func() {
		cancel()
		wg.Wait()
	}, nil
}

// openServed opens one image for serving: read-write unless -r, or as the
// base of a temporary overlay with -s (tmp is the directory to remove).
func (a *app) openServed(image string, o *serveOptions) (d *vdisk.Disk, tmp string, err error) {
	// Clients reach whatever the images name: strict paths unless the
	// images are vouched for (--allow-unsafe-paths).
	paths := driver.PathStrict
	if o.allowUnsafePaths {
		if a.untrusted {
			return nil, "", usageErrorf("--untrusted and --allow-unsafe-paths contradict each other")
		}
		paths = driver.PathTrusted
	}
	opts := a.oo(vdisk.OpenOptions{Format: o.format, ReadOnly: o.readOnly || o.snapshot, Paths: paths, Logger: a.log})
	d, err = vdisk.Open(a.ctx, image, opts)
	if err != nil || !o.snapshot {
		return d, "", err
	}
	// -s: learn the format (probing as Open did), then stack an overlay.
	baseFormat := d.Top().Format.Name
	size := d.Size()
	d.Close()
	var f *driver.Format
	for _, name := range snapshotFormats {
		if g, err := driver.Lookup(name); err == nil && g.Caps&driver.CapDiff != 0 && g.Create != nil {
			f = g
			break
		}
	}
	if f == nil {
		return nil, "", driver.Errorf(vdisk.ErrUnsupported, image, -1,
			"--snapshot needs a differencing image format (%s), and none is available in this build", strings.Join(snapshotFormats, " or "))
	}
	abs, err := filepath.Abs(image)
	if err != nil {
		return nil, "", err
	}
	tmp, err = os.MkdirTemp("", "vdisk-serve-")
	if err != nil {
		return nil, "", err
	}
	overlay := filepath.Join(tmp, "snapshot."+f.Name)
	d, err = vdisk.Create(a.ctx, overlay, a.co(vdisk.CreateOptions{
		Format: f.Name, Size: size, Backing: abs, BackingFormat: baseFormat, Paths: paths, Logger: a.log,
	}))
	if err != nil {
		return nil, tmp, err
	}
	a.log.Debug("serving a temporary overlay", "image", image, "overlay", overlay, "format", f.Name)
	return d, tmp, nil
}

// listen opens the unix socket (-k) or the TCP address (-b, -p). A stale
// socket file nobody listens on is replaced.
func listen(o *serveOptions) (net.Listener, error) {
	if o.socket != "" {
		l, err := net.Listen("unix", o.socket)
		if err != nil && errors.Is(err, syscall.EADDRINUSE) {
			if fi, serr := os.Lstat(o.socket); serr == nil && fi.Mode().Type() == fs.ModeSocket {
				if c, derr := net.Dial("unix", o.socket); derr == nil {
					c.Close()
				} else if os.Remove(o.socket) == nil {
					l, err = net.Listen("unix", o.socket)
				}
			}
		}
		return l, err
	}
	if o.port < 0 || o.port > 65535 {
		return nil, usageErrorf("invalid port %d", o.port)
	}
	return net.Listen("tcp", net.JoinHostPort(o.bind, strconv.Itoa(o.port)))
}

// parseAllowFrom turns --allow-from values into a filter of TCP clients;
// any other client (the library applies the filter on every connection)
// is refused.
func parseAllowFrom(list []string) (func(net.Addr) bool, error) {
	if len(list) == 0 {
		return nil, nil
	}
	var nets []*net.IPNet
	for _, s := range list {
		for _, item := range strings.Split(s, ",") {
			item = strings.TrimSpace(item)
			if _, n, err := net.ParseCIDR(item); err == nil {
				nets = append(nets, n)
				continue
			}
			ip := net.ParseIP(item)
			if ip == nil {
				return nil, usageErrorf("--allow-from %q: expecting an IP address or a CIDR network", item)
			}
			bits := 8 * len(ip)
			if ip4 := ip.To4(); ip4 != nil {
				ip, bits = ip4, 32
			}
			nets = append(nets, &net.IPNet{IP: ip, Mask: net.CIDRMask(bits, bits)})
		}
	}
	return func(addr net.Addr) bool {
		ta, ok := addr.(*net.TCPAddr)
		if !ok {
			return false
		}
		for _, n := range nets {
			if n.Contains(ta.IP) {
				return true
			}
		}
		return false
	}, nil
}

// serveReadyEnv tells a `serve --fork` child that it is the background
// server and which descriptor reports its readiness.
const serveReadyEnv = "VDISK_SERVE_READY_FD"

// forkServe runs the same command again as a background process in a new
// session and returns once it listens. What the child prints until then
// (its errors) is passed on; if it exits instead, its failure is the
// command's. Go cannot fork a running process, so the child is a new
// execution of this binary.
func forkServe() error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("--fork: %w", err)
	}
	readyR, readyW, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("--fork: %w", err)
	}
	defer readyR.Close()
	errR, errW, err := os.Pipe()
	if err != nil {
		readyW.Close()
		return fmt.Errorf("--fork: %w", err)
	}
	defer errR.Close()
	cmd := exec.Command(exe, os.Args[1:]...)
	cmd.Env = append(os.Environ(), serveReadyEnv+"=3")
	cmd.ExtraFiles = []*os.File{readyW}
	cmd.Stderr = errW
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	readyW.Close()
	errW.Close()
	if err != nil {
		return fmt.Errorf("--fork: starting the server: %w", err)
	}
	copied := make(chan struct{})
	go func() {
		io.Copy(os.Stderr, errR)
		close(copied)
	}()
	var b [1]byte
	if n, _ := readyR.Read(b[:]); n == 1 {
		// The child has put /dev/null in place of its standard error.
		<-copied
		cmd.Process.Release()
		return nil
	}
	werr := cmd.Wait()
	<-copied
	if werr == nil {
		werr = errors.New("it exited")
	}
	return &exitError{code: 1, err: fmt.Errorf("the background server did not start: %w", werr)}
}

// serveReady tells the parent of a --fork child that the server listens,
// and detaches the child's standard error from it.
func serveReady() {
	if os.Getenv(serveReadyEnv) != "3" {
		return
	}
	os.Unsetenv(serveReadyEnv)
	if null, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0); err == nil {
		unix.Dup3(int(null.Fd()), 2, 0)
		null.Close()
	}
	ready := os.NewFile(3, "ready")
	ready.Write([]byte{1})
	ready.Close()
}
