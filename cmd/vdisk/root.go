package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/storage/cache"
)

// Main runs the vdisk command line with args (without the program name)
// and returns the process exit code. Every call builds its own command
// tree, so it can run many times in one process (tests do).
func Main(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return run(ctx, args, stdin, stdout, stderr, nil)
}

// hooks lets tests interpose at points of a command's run. Nil in
// production.
type hooks struct {
	// afterCreate runs right after convert created its target.
	afterCreate func()
	// storage, when set, holds the images instead of the local file
	// system (tests inject failures with it).
	storage driver.Storage
}

// app is the state of one run of the command line.
type app struct {
	ctx    context.Context
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
	hooks  *hooks

	debug bool
	// imageOpts: image arguments are option strings (--image-opts).
	imageOpts bool
	// untrusted (--untrusted): images come from someone else; every
	// file name they record is followed under the strict path policy.
	untrusted bool
	// name is "vdisk <command>", the prefix of every diagnostic line.
	name string
	log  *slog.Logger
	// objects are the --object arguments; secrets what they define.
	objects []string
	secrets *driver.SecretMap
	// storageOpts are settings for network storages (--image-opts keys
	// such as tls-creds).
	storageOpts map[string]string
	// cacheFile and cacheSize: --block-cache, --block-cache-size
	// (cacheBytes parsed).
	cacheFile  string
	cacheSize  string
	cacheBytes int64
	// allowSchemes (--allow-backing-scheme): URL schemes a backing file
	// name may use under the strict path policy.
	allowSchemes []string
}

func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer, h *hooks) int {
	if h == nil {
		h = &hooks{}
	}
	a := &app{ctx: ctx, stdin: stdin, stdout: stdout, stderr: stderr, hooks: h, name: "vdisk"}
	a.log = slog.New(newLineHandler(stderr, a.name, slog.LevelWarn))
	root := a.newRootCmd()
	if args == nil {
		args = []string{} // cobra would read os.Args for nil
	}
	root.SetArgs(args)
	cmd, err := root.ExecuteC()
	if err == nil {
		return 0
	}
	return a.fail(root, cmd, err)
}

func (a *app) newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "vdisk",
		Short: "vdisk is a virtual disk image toolkit compatible with qemu-img",
		Long: `vdisk inspects, creates, converts, maps and compares virtual disk images.
Its commands take the same names and flags as qemu-img's.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			return usageErrorf("missing command")
		},
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			a.name = "vdisk"
			if cmd != cmd.Root() {
				a.name = "vdisk " + cmd.Name()
			}
			level := slog.LevelWarn
			if a.debug {
				level = slog.LevelDebug
			}
			a.log = slog.New(newLineHandler(a.stderr, a.name, level))
			if len(a.objects) > 0 {
				s, err := parseObjects(a.objects)
				if err != nil {
					return err
				}
				a.secrets = s
			}
			if a.cacheSize != "" {
				n, err := parseImageSize(a.cacheSize)
				if err != nil {
					return usageErrorf("--block-cache-size %q: %v", a.cacheSize, err)
				}
				a.cacheBytes = n
			}
			for i, s := range a.allowSchemes {
				s = strings.ToLower(strings.TrimSpace(s))
				if _, ok := driver.LookupScheme(s); !ok {
					return usageErrorf("--allow-backing-scheme %q: not a scheme vdisk opens (known: %s)", s, strings.Join(driver.Schemes(), ", "))
				}
				a.allowSchemes[i] = s
			}
			return nil
		},
	}
	root.CompletionOptions.DisableDefaultCmd = true
	root.SetIn(a.stdin)
	root.SetOut(a.stdout)
	root.SetErr(a.stderr)
	root.PersistentFlags().BoolVar(&a.debug, "debug", false, "print debug messages of the library on stderr")
	root.PersistentFlags().BoolVar(&a.imageOpts, "image-opts", false, "image arguments are option strings, as in qemu-img: driver=FMT,file.filename=PATH,KEY=VALUE,... (KEY a format open option such as l2-cache-size)")
	root.PersistentFlags().BoolVar(&a.untrusted, "untrusted", false, "treat the images as untrusted: follow a file name an image records (backing file, extent, data file) only to a regular file in the image's directory or below, never through a link leading out, to an absolute path or a URL")
	root.PersistentFlags().StringArrayVar(&a.objects, "object", nil, "define an object, as qemu-img: secret,id=ID,file=PATH[,format=raw|base64] (or data=VALUE, visible to other users) for encrypted images (encrypt.key-secret=ID, key-secret=ID) and network disks (password-secret=ID)")
	root.PersistentFlags().StringVar(&a.cacheFile, "block-cache", "", "keep blocks read from network images (nbd://, iscsi://, s3://) in this local VCI cache file, reused by later runs (--cache/-t is qemu-img's cache mode)")
	root.PersistentFlags().StringSliceVar(&a.allowSchemes, "allow-backing-scheme", nil, "under the strict path policy (serve, --untrusted), also follow backing file names that are URLs of these schemes (comma-separated, e.g. s3 or s3,nbd): a local overlay on an s3:// base; local names stay confined to the image's directory")
	root.PersistentFlags().StringVar(&a.cacheSize, "block-cache-size", "", "bound the --block-cache file to this size (default 1G, e.g. 10G); least recently used blocks are evicted")
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	root.AddCommand(
		a.newInfoCmd(),
		a.newCreateCmd(),
		a.newConvertCmd(),
		a.newMapCmd(),
		a.newCompareCmd(),
		a.newFormatsCmd(),
		a.newCommitCmd(),
		a.newMergeCmd(),
		a.newRebaseCmd(),
		a.newResizeCmd(),
		a.newCheckCmd(),
		a.newRepairCmd(),
		a.newMeasureCmd(),
		a.newCompactCmd(),
		a.newSnapshotCmd(),
		a.newSetUUIDCmd(),
		a.newGeometryCmd(),
		a.newCommentCmd(),
		a.newAmendCmd(),
		a.newDDCmd(),
		a.newBenchCmd(),
		a.newServeCmd(),
		a.newStreamCmd(),
		a.newJobsCmd(),
	)
	return root
}

// usageError is a mistake in the command line: it is reported with a hint
// to the command's help.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usageErrorf(format string, args ...any) error {
	return usageError{fmt.Errorf(format, args...)}
}

// exitError ends a command with a given exit code. A nil err means the
// command already said what it had to (compare's "Content mismatch").
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string {
	if e.err == nil {
		return fmt.Sprintf("exit status %d", e.code)
	}
	return e.err.Error()
}

func (e *exitError) Unwrap() error { return e.err }

// fail reports err as one line on stderr and returns the exit code.
func (a *app) fail(root, cmd *cobra.Command, err error) int {
	name := "vdisk"
	if cmd != nil && cmd != root {
		name = "vdisk " + cmd.Name()
	}
	code := 1
	if cmd != nil && cmd.Name() == "compare" && cmd != root {
		code = 2 // qemu-img compare: 2 on errors
	}
	var ee *exitError
	if errors.As(err, &ee) {
		if ee.err != nil {
			fmt.Fprintf(a.stderr, "%s: %s\n", name, a.message(ee.err))
		}
		return ee.code
	}
	var ue usageError
	if errors.As(err, &ue) || cmd == nil || cmd == root {
		fmt.Fprintf(a.stderr, "%s: %s\n", name, a.message(err))
		fmt.Fprintf(a.stderr, "Try '%s --help' for more information.\n", name)
		return 1
	}
	fmt.Fprintf(a.stderr, "%s: %s\n", name, a.message(err))
	return code
}

// message renders err on one line.
func (a *app) message(err error) string {
	if errors.Is(err, context.Canceled) && a.ctx.Err() != nil {
		return "interrupted"
	}
	s := strings.TrimSpace(err.Error())
	s = strings.ReplaceAll(s, "\r", "")
	return strings.ReplaceAll(s, "\n", "; ")
}

// exactArgs requires n positional arguments, with qemu-img's wording.
func exactArgs(n int, msg string) cobra.PositionalArgs {
	return func(_ *cobra.Command, args []string) error {
		if len(args) != n {
			return usageErrorf("%s", msg)
		}
		return nil
	}
}

// rangeArgs requires between lo and hi positional arguments.
func rangeArgs(lo, hi int, msg string) cobra.PositionalArgs {
	return func(_ *cobra.Command, args []string) error {
		if len(args) < lo || len(args) > hi {
			return usageErrorf("%s", msg)
		}
		return nil
	}
}

// outputFormat validates --output.
func outputFormat(s string) (json bool, err error) {
	switch s {
	case "human", "":
		return false, nil
	case "json":
		return true, nil
	}
	return false, usageErrorf("--output must be used with human or json as argument")
}

// policy is the path policy for the images of a local command: trusted
// (qemu-img's behaviour) unless --untrusted.
func (a *app) policy() driver.PathPolicy {
	if a.untrusted {
		return driver.PathStrict
	}
	return driver.PathTrusted
}

// openRO opens an image chain read-only, as every read-only command does.
// Parent references are followed wherever they point, as qemu-img does,
// unless --untrusted.
func (a *app) openRO(name, format string, infoOnly bool) (*vdisk.Disk, error) {
	return a.open(name, vdisk.OpenOptions{
		Format:   format,
		ReadOnly: true,
		InfoOnly: infoOnly,
		Paths:    a.policy(),
	})
}

// open opens an image argument with o (Logger set here). With
// --image-opts the argument is qemu's option string: driver= names the
// format, file.filename= (or file=) the file, and the other keys are the
// format's open options (qemu's hyphens stand for underscores).
func (a *app) open(arg string, o vdisk.OpenOptions) (*vdisk.Disk, error) {
	name := arg
	if a.imageOpts {
		var err error
		if name, err = a.imageSpec(arg, &o); err != nil {
			return nil, err
		}
	}
	return vdisk.Open(a.ctx, name, a.oo(o))
}

// imageSpec parses an --image-opts argument into o and returns the file
// name. driver=nbd and driver=iscsi (or file.driver=nbd|iscsi under a
// format) take qemu's network keys and give a URL name.
func (a *app) imageSpec(arg string, o *vdisk.OpenOptions) (string, error) {
	if o.Format != "" {
		return "", driver.OptionErrorf("--image-opts and --format are mutually exclusive")
	}
	kvs, err := driver.SplitOptions(arg)
	if err != nil {
		return "", err
	}
	var name, fileDriver string
	var cacheKVs []driver.KV
	network := map[string]string{}
	for _, kv := range kvs {
		switch kv.Key {
		case "driver":
			o.Format = kv.Value
		case "file.driver":
			fileDriver = kv.Value
		}
	}
	proto := ""
	switch {
	case o.Format == "nbd" || o.Format == "iscsi":
		proto, o.Format = o.Format, "raw"
	case fileDriver == "nbd" || fileDriver == "iscsi":
		proto = fileDriver
	case fileDriver != "" && fileDriver != "file":
		return "", driver.OptionErrorf("--image-opts: file.driver=%s is not supported (file, nbd, iscsi)", fileDriver)
	}
	for _, kv := range kvs {
		key := kv.Key
		if proto != "" && fileDriver == proto && strings.HasPrefix(key, "file.") {
			network[strings.TrimPrefix(key, "file.")] = kv.Value
			continue
		}
		switch key {
		case "driver", "file.driver":
		case "file.filename", "file":
			name = kv.Value
		case "cache":
			// The block cache of a network layer (--block-cache), not
			// qemu's cache.* modes.
			if kv.Value == "" {
				return "", driver.OptionErrorf("--image-opts %q: cache= needs a cache file name", arg)
			}
			o.Cache = kv.Value
		case "cache-size", "cache-block-size", "cache-parallel":
			cacheKVs = append(cacheKVs, kv)
		case "file.locking", "file.aio", "cache.direct", "cache.no-flush", "read-only", "force-share":
			if key == "cache.direct" && kv.Value == "on" {
				o.Direct = true
			}
			if key == "read-only" && kv.Value == "on" {
				o.ReadOnly = true
			}
		default:
			if proto != "" && fileDriver != proto {
				network[key] = kv.Value
				continue
			}
			o.Options = append(o.Options, driver.KV{Key: imageOptKey(o.Format, key), Value: kv.Value})
		}
	}
	if proto != "" {
		delete(network, "driver")
		extra := map[string]string{}
		if name, err = networkSpec(proto, network, extra); err != nil {
			return "", err
		}
		for k := range network {
			return "", driver.OptionErrorf("--image-opts %q: driver %s has no key %q", arg, proto, k)
		}
		if len(extra) > 0 {
			merged := map[string]string{}
			for k, v := range o.StorageOptions {
				merged[k] = v
			}
			for k, v := range extra {
				merged[k] = v
			}
			o.StorageOptions = merged
		}
	}
	if name == "" {
		return "", driver.OptionErrorf("--image-opts %q names no file (file.filename=PATH)", arg)
	}
	if len(cacheKVs) > 0 {
		if o.Cache == "" && a.cacheFile == "" {
			return "", driver.OptionErrorf("--image-opts %q: %s= needs a block cache (cache=FILE or --block-cache FILE)", arg, cacheKVs[0].Key)
		}
		co, err := cache.ParseOptions(cacheKVs)
		if err != nil {
			return "", driver.OptionErrorf("--image-opts %q: %v", arg, err)
		}
		for _, kv := range cacheKVs {
			switch kv.Key {
			case "cache-size":
				o.CacheOptions.Size = co.Size
			case "cache-block-size":
				o.CacheOptions.BlockSize = co.BlockSize
			case "cache-parallel":
				o.CacheOptions.Parallel = co.Parallel
			}
		}
	}
	if o.Format == "" && len(o.Options) > 0 {
		return "", driver.OptionErrorf("--image-opts %q: open options need driver=FORMAT", arg)
	}
	return name, nil
}

// addFormatFlag declares -f.
func addFormatFlag(cmd *cobra.Command, p *string, usage string) {
	cmd.Flags().StringVarP(p, "format", "f", "", usage)
}

// addForceShareFlag declares -U/--force-share, accepted for qemu-img
// compatibility: read-only opens take shared locks anyway.
func addForceShareFlag(cmd *cobra.Command) {
	var ignored bool
	cmd.Flags().BoolVarP(&ignored, "force-share", "U", false, "open the image in shared mode (always the case for read-only opens)")
}

// imageOptKey maps an --image-opts key to the driver's option name: qemu
// spells runtime options with '-' where vdisk's declared names use '_',
// except names the driver declares with '-' (encrypt.key-secret,
// key-secret), which stay as they are.
func imageOptKey(format, key string) string {
	if f, err := driver.Lookup(format); err == nil {
		for _, opt := range f.OpenOptions {
			if opt.Name == key {
				return key
			}
		}
	}
	return strings.ReplaceAll(key, "-", "_")
}
